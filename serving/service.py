"""The BentoML service: wiring and routes only (engine, auth, limits and management live elsewhere).

Start it with environment variables only (see serving/settings.py); they are read once, when BentoML
loads this module (:data:`SETTINGS`), and that one settings object gives the ``@bentoml.service``
arguments, the engine settings, the limits and the queue of the service instance::

    LORAPLEX_STORE=/path/to/store LORAPLEX_BASE=minilm LORAPLEX_ADMIN_TOKEN=... \\
    LORAPLEX_TENANT_TOKENS="acme:tok-a,globex:tok-g" \\
    bentoml serve serving.service:LoraplexService --host 127.0.0.1 --port 3000

Routes: ``POST /v1/classify`` and ``POST /v1/embed`` (concurrent requests of any tenants merge into
one engine call through the fair queue, :mod:`serving.fairness`), the OpenAI-style ``/v1/embeddings``,
``/v1/classifications`` and ``/v1/models`` (:mod:`serving.openai_api`), ``/v1/adapters`` (tenant
listing), ``/v1/admin/...`` (management, quotas and usage), and BentoML's ``/livez``, ``/readyz``
(503 until the backbone is loaded) and ``/metrics``.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time

import bentoml

from adapters_store.base_models import BaseModelEntry
from adapters_store.errors import InvalidRequest, LoraplexError
from adapters_store.quotas import TenantQuota
from serving import metrics
from serving.auth import TokenRefresher
from serving.console_app import CONSOLE_ROUTES, console_app
from serving.fairness import FairBatcher
from serving.gateway import GatewayMiddleware, GatewayState
from serving.http_io import ClassifyInput, EmbedInput, ResultsOutput, inference_handler, without_extras
from serving.inference import error_result, row_count, run_jobs, runs_alone
from serving.jobs import JobRunner
from serving.jobs_routes import JOB_ROUTES
from serving.limits import InflightLimiter, TokenCounter
from serving.management import ManagementContext, build_app
from serving.openai_api import OPENAI_ROUTES, ClassificationsRequest, EmbeddingsRequest, openapi_paths
from serving.preflight import check_startup, token_counter_file
from serving.preload import ColdLoads
from serving.quota_routes import QUOTA_ROUTES
from serving.quotas import QuotaBook, UsageLedger
from serving.schemas import ClassifyItem, EmbedItem, ItemResult
from serving.settings import LimitSettings, ServiceSettings, bentoml_config
from serving.shutdown import install_drain_handler

logger = logging.getLogger("loraplex.service")


def settings_at_load() -> tuple[ServiceSettings | None, LoraplexError | None]:
    """The one read of the environment, when BentoML loads this module. A bad setting does not stop
    the import (the decorator then takes the defaults): the service refuses to start with that error."""
    try:
        return ServiceSettings.from_env(), None
    except LoraplexError as e:
        return None, e


SETTINGS, SETTINGS_ERROR = settings_at_load()
# The /v1 app: management, OpenAI-style, quota, job and console routes. Its state (``app.state``) is
# filled by the service instance; nothing here holds per-service state.
V1_APP = build_app(
    extra_routes=[*OPENAI_ROUTES, *QUOTA_ROUTES, *JOB_ROUTES, *CONSOLE_ROUTES], extra_paths=openapi_paths()
)


def enable_logging() -> None:
    """BentoML's logging dictConfig disables loggers created before it, which includes our module-level
    ``loraplex.*`` loggers: turn them back on and give them their own stderr handler (INFO), so load
    failures and the insecure-dev banner always show in the server's output."""
    for name, log in logging.root.manager.loggerDict.items():
        if isinstance(log, logging.Logger) and (name == "loraplex" or name.startswith("loraplex.")):
            log.disabled = False
    root = logging.getLogger("loraplex")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_loraplex", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        handler._loraplex = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def http_stack() -> str:
    """The event loop this worker runs on and the HTTP parser uvicorn's ``http="auto"`` resolves to
    (BentoML starts uvicorn with loop and http on auto): uvloop and httptools, both dependencies, cost
    the server less CPU per request than asyncio's own loop and the pure-Python h11."""
    import asyncio

    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    try:
        loop = type(asyncio.get_running_loop())
        loop_name = f"{loop.__module__}.{loop.__qualname__}"
    except RuntimeError:  # an in-process instance outside any loop
        loop_name = "none running"
    return f"event loop {loop_name}, HTTP parser {AutoHTTPProtocol.__module__}.{AutoHTTPProtocol.__name__}"


def token_limit(settings: ServiceSettings, base: BaseModelEntry | None) -> int:
    """``max_tokens``, but never more than the base's position table holds (a longer input would crash
    the forward pass instead of being truncated)."""
    positions = (base.tensors.get("embeddings.position_embeddings.weight") if base else None) or [None]
    n = positions[0]
    if base is not None and base.model_type in ("roberta", "xlm-roberta", "camembert") and n:
        n -= 2  # these models start positions after the padding index
    return min(settings.limits.max_tokens, n) if n else settings.limits.max_tokens


def effective_limits(settings: ServiceSettings, base: BaseModelEntry | None = None) -> LimitSettings:
    """The limits every layer applies: the configured ones, ``max_tokens`` capped by the base."""
    return settings.limits.model_copy(update={"max_tokens": token_limit(settings, base)})


def engine_settings(settings: ServiceSettings, base: BaseModelEntry | None = None):
    """Service settings -> EngineSettings; a runtime the engine does not run is refused at start."""
    from serving.engine import EngineSettings

    fields = dict(
        cache_bytes=settings.cache_bytes,
        pins=settings.pins,
        alias_ttl_s=settings.alias_ttl_s,
        threads=settings.threads,
        max_batch_rows=settings.max_batch_size,
        max_seq_len=token_limit(settings, base),
    )
    try:
        return EngineSettings(**fields, runtime=settings.runtime)
    except ValueError as e:
        raise InvalidRequest(
            f"LORAPLEX_RUNTIME={settings.runtime!r} is not supported by this engine: {e}"
        ) from None


@bentoml.asgi_app(console_app(), path="/console", name="loraplex-console")
@bentoml.asgi_app(V1_APP, path="/v1", name="loraplex-management")
@bentoml.service(name="loraplex", **bentoml_config(SETTINGS))
class LoraplexService:
    """Many tenants' adapters on one shared backbone."""

    @bentoml.on_deployment
    def check_before_workers() -> None:
        """Runs once in the ``bentoml serve`` process before any worker starts: a bad setting stops
        the server with one line and exit status 2, instead of a worker restarted every ~10 s forever."""
        try:
            if SETTINGS_ERROR is not None:
                raise SETTINGS_ERROR
            check_startup(settings=SETTINGS)
        except LoraplexError as e:
            print(f"error: {e.message} [{e.code}]", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def __init__(self, settings: ServiceSettings | None = None, v1_app=None) -> None:
        """``settings``: default the ones this module read at load (the decorator's); ``v1_app``: the
        app whose ``state`` this instance fills (default the mounted one)."""
        if settings is None and SETTINGS_ERROR is not None:
            raise SETTINGS_ERROR
        enable_logging()
        logger.info("HTTP: %s", http_stack())
        checked = check_startup(settings=settings or SETTINGS)
        settings = checked.settings
        self.settings = settings
        self.engine = None
        self.load_error: str | None = None
        self.store, self.base = checked.store, checked.base
        self.engine_settings = engine_settings(settings, self.base)
        # The reject policy counts against what the engine will really feed the base.
        self.limits = effective_limits(settings, self.base)
        self.draining = False
        self.usage = UsageLedger()  # this replica's per-tenant usage (GET /v1/admin/usage)
        install_drain_handler(settings.drain_s, self._start_draining)
        TokenRefresher(checked.tokens, settings.token_refresh_s).start()
        self.tokens = self._token_counter()
        self.context = ManagementContext(
            store=self.store,
            base=self.base,
            tokens=checked.tokens,
            max_upload_bytes=self.limits.max_upload_bytes,
            max_management=self.limits.max_management,
            limits=self.limits,
            usage=self.usage,
        )
        self.gateway = GatewayState(
            tokens=checked.tokens,
            limits=self.limits,
            validators={
                "/v1/classify": ClassifyInput,
                "/v1/embed": EmbedInput,
                "/v1/embeddings": EmbeddingsRequest,
                "/v1/classifications": ClassificationsRequest,
            },
            is_ready=self.__is_ready__,
            cache_stats=lambda: self.engine.cache_stats() if self.engine is not None else {},
            resident=lambda: self.engine.resident() if self.engine is not None else [],
            limiter=InflightLimiter(self.limits.max_inflight),
            preload=ColdLoads(lambda: self.engine),
            inference=inference_handler(self._answer),
            metrics_public=settings.metrics_auth == "public" or settings.insecure_dev,
            base_name=self.base.name,
        )
        self._setup_fairness()
        self._start_jobs(settings)
        app = V1_APP if v1_app is None else v1_app
        app.state.loraplex, app.state.gateway = self.context, self.gateway
        metrics.set_ready(False)
        # Load the backbone off the startup path: /livez answers at once, /readyz once it is loaded.
        threading.Thread(target=self._load_engine, name="loraplex-engine-load", daemon=True).start()

    def _start_jobs(self, settings: ServiceSettings) -> None:
        """Training jobs run as subprocesses of this replica (``serving.jobs``); records in the store."""
        runner = JobRunner(
            self.store, settings.store, settings.base, settings.jobs, on_registered=self.context.changed
        )
        self.context.job_settings, self.context.jobs_runner = settings.jobs, runner
        runner.start()

    def _setup_fairness(self) -> None:
        """Per-tenant quotas in the gateway; one fair queue in front of the engine for every route."""
        limits = self.limits
        defaults = TenantQuota(
            rps=limits.tenant_rps,
            burst=limits.tenant_burst,
            max_inflight_rows=limits.tenant_max_inflight_rows,
        )
        book = QuotaBook(defaults, self.store.quotas, limits.quota_refresh_s, usage=self.usage)
        book.refresh(force=True)
        threading.Thread(target=_refresh_forever, args=(book, limits.quota_refresh_s), daemon=True).start()
        self.gateway.quotas = self.context.quota_book = book
        self.batcher = FairBatcher(
            lambda jobs: run_jobs(self.engine, jobs, self.limits, self.tokens, self.usage),
            max_rows=self.settings.max_batch_size,
            max_wait_s=limits.max_queue_ms / 1000,
            on_expired=lambda job: self.usage.rejected(job.tenant, "queue"),
            runs_alone=lambda job: runs_alone(self.engine, job),
        )
        self.context.batcher = self.batcher

    async def _answer(self, task: str, items: list) -> list[ItemResult]:
        try:
            return await self.batcher.submit(items[0].tenant, row_count(items), (task, items))
        except LoraplexError as err:  # e.g. 429: waited longer than max_queue_ms
            return [error_result(err) for _ in items]

    def _token_counter(self) -> TokenCounter | None:
        """Only for ``token_policy='reject'``; the base's own tokenizer counts (a missing one fails the start)."""
        path = token_counter_file(self.settings, self.base)
        return None if path is None else TokenCounter(str(path))

    def _load_engine(self) -> None:
        from serving.engine import Engine

        try:
            engine = Engine(self.store, base=self.settings.base, settings=self.engine_settings)
        except Exception as e:  # keep /readyz at 503 and say why in the log
            self.load_error = f"{type(e).__name__}: {e}"
            logger.exception("loading the engine failed")
            return
        freeze_startup_heap()
        self.engine = self.context.engine = engine
        metrics.set_ready(True)
        logger.info(
            "loraplex ready: base %s (%s...), runtime %s: %s",
            self.base.name,
            self.base.fingerprint[:12],
            engine.runtime,
            engine.runtime_note,
        )

    def _start_draining(self) -> None:
        self.draining = True
        metrics.set_ready(False)
        if self.context.jobs_runner is not None:
            self.context.jobs_runner.stop()

    def __is_ready__(self) -> bool:
        return self.engine is not None and not self.draining

    @bentoml.api(route="/v1/classify", input_spec=ClassifyInput, output_spec=ResultsOutput)
    async def classify(self, items: list[ClassifyItem], include: list[str]) -> list[ItemResult]:
        """Classify texts or images with your adapters: labels (most probable first) and scores.
        ``adapters: [...]`` instead of ``adapter`` fans one input out to several adapters;
        ``include: ["digest", "logits"]`` adds those to every answer."""
        return without_extras(await self._answer("classify", items), include)

    @bentoml.api(route="/v1/embed", input_spec=EmbedInput, output_spec=ResultsOutput)
    async def embed(self, items: list[EmbedItem], include: list[str]) -> list[ItemResult]:
        """Embed texts with your adapter (or the bare shared backbone when ``adapter`` is null).
        ``adapters: [...]`` instead of ``adapter`` fans one input out to several adapters;
        ``include: ["digest"]`` adds the adapter's digest to every answer."""
        return without_extras(await self._answer("embed", items), include)


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now (the backbone, tokenizer, libraries: ~460k
    tracked objects with MiniLM) out of the cyclic collector's reach; returns how many. A full
    collection walked all of them holding the GIL: ~360 ms on this 2-core host, and in a storm of cold
    loads (each creates long-lived objects, which is what triggers one) every warm request in flight
    stalled ~0.6 s at once (bench_cold.py round 1, three runs). Objects created later (resident
    adapters, their modules) are still collected as usual."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _refresh_forever(book: QuotaBook, every_s: float) -> None:
    """Quota overrides changed on another replica (or in the store) apply here within ``every_s``."""
    while every_s > 0:
        time.sleep(every_s)
        book.refresh()


LoraplexService.add_asgi_middleware(GatewayMiddleware, source=V1_APP)
