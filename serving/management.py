"""Management and listing routes (a Starlette app BentoML mounts at ``/v1``).

Admin (admin token): ``/v1/admin/...`` upload, list, show, promote/rollback aliases, delete, warm, pin,
cache status. Tenants (tenant token): ``/v1/adapters[/{name}]`` show their own adapters only; another
tenant's adapter and a missing one give the same 404. Every change makes this replica's engine resolve
that adapter afresh, so it serves the new state at once (a delete also frees what the deleted versions
had loaded); other replicas follow within the engine's alias TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError as PydanticValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters_store.base_models import BaseModelEntry
from adapters_store.errors import (
    InvalidRequest,
    LoraplexError,
    NotFound,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationError,
)
from adapters_store.names import LATEST, AdapterRef, validate_alias, validate_name, validate_settable_alias
from adapters_store.store import AdapterStore
from serving.api_docs import bentoml_service_spec, docs_page, route_spec, spec_document, with_service_routes
from serving.auth import Principal
from serving.error_responses import error_response
from serving.gateway import PRINCIPAL_KEY
from serving.quotas import UsageLedger
from serving.schemas import AliasRequest, RollbackRequest, version_view
from serving.settings import JobSettings, LimitSettings
from serving.uploads import bundle_from_upload, read_upload

logger = logging.getLogger("loraplex.management")
ADAPTER = "/admin/tenants/{tenant}/adapters/{name}"


@dataclass
class ManagementContext:
    """What the /v1 routes act on. One per app (``app.state.loraplex``), filled by the service instance
    that mounts it once the store is open and the engine built; nothing of it is module-global."""

    store: AdapterStore | None = None
    base: BaseModelEntry | None = None
    engine: Any = None
    tokens: Any = None  # serving.auth.TokenBook: token changes made here take effect at once
    max_upload_bytes: int = 600 << 20
    max_management: int = 2
    limits: LimitSettings = field(default_factory=LimitSettings)
    batcher: Any = None  # serving.fairness.FairBatcher: the OpenAI-style routes submit to it
    quota_book: Any = None  # serving.quotas.QuotaBook
    usage: UsageLedger = field(default_factory=UsageLedger)
    jobs_runner: Any = None  # serving.jobs.JobRunner
    job_settings: JobSettings | None = None
    _slots: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def slot(self) -> asyncio.Semaphore:
        """Management requests run a few at a time and queue for the rest: 32 concurrent uploads on one
        name took 2.4x longer than 4 and starved inference of the GIL (finding 12). One semaphore per
        event loop (a semaphore is bound to the loop it first waits on)."""
        loop = asyncio.get_running_loop()
        sem = self._slots.get(loop)
        if sem is None:
            sem = self._slots[loop] = asyncio.Semaphore(self.max_management)
        return sem

    def need_engine(self):
        if self.engine is None:
            raise ServiceUnavailable("the backbone is still loading; retry when /readyz is 200")
        return self.engine

    def need_store(self) -> AdapterStore:
        if self.store is None or self.base is None:
            raise ServiceUnavailable("the adapter store is not open yet; retry when /readyz is 200")
        return self.store

    def need_batcher(self):
        if self.batcher is None:
            raise ServiceUnavailable("the service is starting; retry when /readyz is 200")
        return self.batcher

    def need_book(self):
        if self.quota_book is None:
            raise ServiceUnavailable("quotas are not configured yet; retry when /readyz is 200")
        return self.quota_book

    def need_runner(self):
        if self.jobs_runner is None or self.job_settings is None:
            raise ServiceUnavailable("training jobs are not available yet; retry when /readyz is 200")
        return self.jobs_runner

    def changed(self, tenant: str, name: str) -> None:
        """A version was registered or an alias moved: resolve afresh, keep what is loaded."""
        if self.engine is not None:
            self.engine.forget_resolutions(tenant, name)

    def invalidate(self, tenant: str, name: str | None = None, version: int | None = None) -> None:
        """Something was deleted: resolve afresh and free what it had loaded."""
        if self.engine is not None:
            self.engine.invalidate(tenant, name, version)


def context_of(request: Request) -> ManagementContext:
    """The context of the app this request reached (``build_app`` gives every app its own)."""
    ctx = getattr(request.app.state, "loraplex", None)
    if not isinstance(ctx, ManagementContext):
        raise ServiceUnavailable("the service is starting; retry when /readyz is 200")
    return ctx


Handler = Callable[[Request, ManagementContext], Awaitable[Any]]


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get(PRINCIPAL_KEY)
    if not isinstance(principal, Principal):
        raise ServiceUnavailable("request reached a route without passing the gateway")
    return principal


def route(path: str, methods: list[str], role: str, status: int = 200):
    """Wrap a handler: check the role, run it in its turn; a LoraplexError it raises is rendered by
    the app's one handler (:mod:`serving.error_responses`)."""

    def deco(fn: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            p = principal_of(request)
            p.require_admin() if role == "admin" else p.require_tenant()
            ctx = context_of(request)
            async with ctx.slot():
                result = await fn(request, ctx)
            if isinstance(result, Response):  # files (a job's log, its curve PNG)
                return result
            return JSONResponse(result, status_code=status)

        endpoint.__doc__ = fn.__doc__
        endpoint.status_code = status  # type: ignore[attr-defined]  # for the OpenAPI document
        return Route(path, endpoint, methods=methods, name=fn.__name__)

    return deco


def path_names(request: Request) -> tuple[str, str]:
    p = request.path_params
    return validate_name(p["tenant"], "tenant"), validate_name(p["name"], "adapter name")


def path_version(request: Request) -> int:
    try:
        version = int(request.path_params["version"])
    except ValueError:
        raise InvalidRequest("version must be a positive integer") from None
    if version < 1:
        raise InvalidRequest("version must be a positive integer")
    return version


async def json_body(request: Request, model):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if not raw:
        try:
            return model()  # every field has a default (e.g. rollback's alias)
        except PydanticValidationError:
            raise ValidationError("this route needs a JSON body; see /v1/openapi.json") from None
    if ctype != "application/json":
        raise UnsupportedMediaType("send JSON with 'Content-Type: application/json'")
    try:
        return model.model_validate_json(raw)
    except Exception as e:
        raise ValidationError(f"invalid body: {str(e)[:400]}") from None


MAX_PAGE = 1000


def flag_query(request: Request, key: str) -> bool:
    """``?key=true|false|1|0`` (absent: false); anything else is a 400, never a silent false."""
    raw = request.query_params.get(key)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{key} must be true or false, got {raw[:40]!r}")
    return value in ("true", "1")


def page_query(request: Request) -> tuple[int | None, int | None]:
    """``?limit=N&before=V``: at most N versions older than V (newest of those), for long histories."""
    out = []
    for key, low, high in (("limit", 1, MAX_PAGE), ("before", 1, None)):
        raw = request.query_params.get(key)
        if raw is None:
            out.append(None)
            continue
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequest(f"{key} must be an integer, got {raw[:40]!r}") from None
        if value < low or (high is not None and value > high):
            raise InvalidRequest(f"{key} must be in {low}..{high or 'any'}, got {value}")
        out.append(value)
    return out[0], out[1]


def adapter_view(
    store: AdapterStore, tenant: str, name: str, limit: int | None = None, before: int | None = None
) -> dict[str, Any]:
    """Versions (oldest first) and aliases. With ``limit``, only that many manifests are read: the
    newest ones older than ``before``; ``next_before`` pages further back."""
    numbers = store.version_numbers(tenant, name)
    if not numbers:
        raise NotFound(f"adapter {name!r} not found")
    older = [v for v in numbers if before is None or v < before]
    page = older[-limit:] if limit else older
    versions = []
    for v in page:
        try:
            versions.append(store.resolve(AdapterRef(tenant, name, str(v))))
        except NotFound:
            continue  # deleted since the listing
    out = {
        "tenant": tenant,
        "name": name,
        "aliases": store.aliases(tenant, name),
        "versions": [version_view(m) for m in versions],
        "total_versions": len(numbers),
    }
    if len(page) < len(older):
        out["next_before"] = page[0]
    return out


# -- tenant routes -----------------------------------------------------------------------------------
@route("/adapters", ["GET"], "tenant")
async def list_own_adapters(request: Request, ctx: ManagementContext):
    """List the calling tenant's adapters with their aliases."""
    tenant, store = principal_of(request).require_tenant(), ctx.need_store()

    def work():
        return {
            "tenant": tenant,
            "adapters": [
                {"name": n, "aliases": store.aliases(tenant, n)} for n in store.list_adapters(tenant)
            ],
        }

    return await run_in_threadpool(work)


@route("/adapters/{name}", ["GET"], "tenant")
async def show_own_adapter(request: Request, ctx: ManagementContext):
    """One of the calling tenant's adapters: versions and aliases (404 if it is not theirs).

    ``?limit=N&before=V`` returns only the N newest versions older than V, and ``next_before``."""
    tenant, store = principal_of(request).require_tenant(), ctx.need_store()
    name = validate_name(request.path_params["name"], "adapter name")
    return await run_in_threadpool(adapter_view, store, tenant, name, *page_query(request))


# -- admin routes ------------------------------------------------------------------------------------
@route("/admin/tenants", ["GET"], "admin")
async def list_tenants(request: Request, ctx: ManagementContext):
    """Tenants that have at least one adapter."""
    return {"tenants": await run_in_threadpool(ctx.need_store().list_tenants)}


@route("/admin/tenants/{tenant}/adapters", ["GET"], "admin")
async def list_adapters(request: Request, ctx: ManagementContext):
    """A tenant's adapters with aliases."""
    tenant, store = validate_name(request.path_params["tenant"], "tenant"), ctx.need_store()

    def work():
        return {
            "tenant": tenant,
            "adapters": [
                {"name": n, "aliases": store.aliases(tenant, n)} for n in store.list_adapters(tenant)
            ],
        }

    return await run_in_threadpool(work)


@route(ADAPTER, ["GET"], "admin")
async def show_adapter(request: Request, ctx: ManagementContext):
    """Versions and aliases of one adapter.

    ``?limit=N&before=V`` returns only the N newest versions older than V, and ``next_before``."""
    tenant, name = path_names(request)
    return await run_in_threadpool(adapter_view, ctx.need_store(), tenant, name, *page_query(request))


@route(ADAPTER, ["DELETE"], "admin")
async def delete_adapter(request: Request, ctx: ManagementContext):
    """Delete every version and alias of an adapter."""
    tenant, name = path_names(request)
    n = await run_in_threadpool(ctx.need_store().delete_adapter, tenant, name)
    ctx.invalidate(tenant, name)
    return {"tenant": tenant, "name": name, "deleted_versions": n}


@route(ADAPTER + "/versions", ["POST"], "admin", status=201)
async def upload_version(request: Request, ctx: ManagementContext):
    """Register a new version from multipart files: a bundle (``manifest.json`` + weights) or a PEFT
    ``save_pretrained`` folder's files (form fields ``task``, ``labels``, ``pooling`` optional).
    Form field ``alias`` (e.g. ``production``) points that alias at the new version."""
    tenant, name = path_names(request)
    store = ctx.need_store()
    files, fields = await read_upload(request, ctx.max_upload_bytes)
    alias = validate_settable_alias(fields["alias"]) if fields.get("alias") else None
    bundle = bundle_from_upload(files, fields, tenant, name, ctx.base)
    # The alias is set by the same put, after every check: a refused alias stores nothing.
    manifest = await run_in_threadpool(store.put, bundle, [alias] if alias else [])
    ctx.changed(tenant, name)
    logger.info("registered %s/%s@%s (%s)", tenant, name, manifest.version, manifest.digest[:12])
    return {**version_view(manifest), "alias": alias}


@route(ADAPTER + "/versions/{version}", ["GET"], "admin")
async def show_version(request: Request, ctx: ManagementContext):
    """One stored version's manifest summary."""
    tenant, name = path_names(request)
    ref = AdapterRef(tenant, name, str(path_version(request)))
    return version_view(await run_in_threadpool(ctx.need_store().resolve, ref))


@route(ADAPTER + "/versions/{version}", ["DELETE"], "admin")
async def delete_version(request: Request, ctx: ManagementContext):
    """Delete one version. 409 if an alias points at it (the message names them); ``?force=true``
    deletes anyway, removes those aliases and lists them in ``removed_aliases``."""
    tenant, name = path_names(request)
    version = path_version(request)
    force = flag_query(request, "force")
    removed = await run_in_threadpool(ctx.need_store().delete_version, tenant, name, version, force)
    ctx.invalidate(tenant, name, version)
    return {"tenant": tenant, "name": name, "deleted_version": version, "removed_aliases": removed}


@route(ADAPTER + "/aliases/{alias}", ["PUT"], "admin")
async def set_alias(request: Request, ctx: ManagementContext):
    """Point an alias (e.g. ``production``) at a version: promote or roll back explicitly."""
    tenant, name = path_names(request)
    alias = validate_settable_alias(request.path_params["alias"])
    body = await json_body(request, AliasRequest)
    await run_in_threadpool(ctx.need_store().set_alias, tenant, name, alias, body.version)
    ctx.changed(tenant, name)
    return {"tenant": tenant, "name": name, "alias": alias, "version": body.version}


@route(ADAPTER + "/aliases/{alias}", ["DELETE"], "admin")
async def delete_alias(request: Request, ctx: ManagementContext):
    """Remove an alias (unaliased requests then fall back to ``latest``)."""
    tenant, name = path_names(request)
    alias = validate_alias(request.path_params["alias"])
    await run_in_threadpool(ctx.need_store().delete_alias, tenant, name, alias)
    ctx.changed(tenant, name)
    return {"tenant": tenant, "name": name, "deleted_alias": alias}


@route(ADAPTER + "/rollback", ["POST"], "admin")
async def rollback(request: Request, ctx: ManagementContext):
    """Move an alias to the newest version older than the one it points at now."""
    tenant, name = path_names(request)
    alias = validate_settable_alias((await json_body(request, RollbackRequest)).alias)
    store = ctx.need_store()
    target = await run_in_threadpool(rollback_target, store, tenant, name, alias)
    await run_in_threadpool(store.set_alias, tenant, name, alias, target[1])
    ctx.changed(tenant, name)
    return {"tenant": tenant, "name": name, "alias": alias, "from_version": target[0], "version": target[1]}


def rollback_target(store: AdapterStore, tenant: str, name: str, alias: str) -> tuple[int, int]:
    aliases = store.aliases(tenant, name)
    current = aliases.get(alias, aliases.get(LATEST)) if alias == "production" else aliases.get(alias)
    if current is None:
        raise NotFound(f"{tenant}/{name} has no alias {alias!r}")
    older = [v for v in store.version_numbers(tenant, name) if v < current]
    if not older:
        raise InvalidRequest(f"{tenant}/{name}@{alias} is at version {current}; there is no older version")
    return current, max(older)


@route(ADAPTER + "/warm", ["POST"], "admin")
async def warm(request: Request, ctx: ManagementContext):
    """Load an adapter into the engine cache now (query ``selector``, default production/latest)."""
    tenant, name = path_names(request)
    ref = ref_from_query(request, tenant, name)
    engine = ctx.need_engine()
    await run_in_threadpool(engine.warm, ref)
    return {"tenant": tenant, "name": name, "warmed": ref}


@route(ADAPTER + "/pin", ["PUT", "DELETE"], "admin")
async def pin(request: Request, ctx: ManagementContext):
    """PUT pins an adapter in the engine cache (never evicted); DELETE unpins it."""
    tenant, name = path_names(request)
    engine = ctx.need_engine()
    target = f"{tenant}/{name}"
    if request.method == "PUT":
        await run_in_threadpool(engine.pin, target)
    else:
        await run_in_threadpool(engine.unpin, target)
    return {"tenant": tenant, "name": name, "pinned": request.method == "PUT"}


@route("/admin/cache", ["GET"], "admin")
async def cache_status(request: Request, ctx: ManagementContext):
    """Engine cache counters (hits, misses, evictions, loads, bytes) and pins."""
    return jsonable(ctx.need_engine().cache_stats())


def ref_from_query(request: Request, tenant: str, name: str) -> str:
    """``tenant/name`` or ``tenant/name@selector``, the selector validated like any reference."""
    selector = request.query_params.get("selector")
    return str(AdapterRef.parse(f"{tenant}/{name}@{selector}")) if selector else f"{tenant}/{name}"


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "__dict__", str(o))))


ROUTES = [
    list_own_adapters,
    show_own_adapter,
    list_tenants,
    list_adapters,
    show_adapter,
    delete_adapter,
    upload_version,
    show_version,
    delete_version,
    set_alias,
    delete_alias,
    rollback,
    warm,
    pin,
    cache_status,
]


PAGED = {"show_adapter", "show_own_adapter"}


def all_routes(extra: Sequence[Route] = ()) -> list[Route]:
    """These routes, the tenant token routes (``serving.tokens_api``, which builds on ``route``) and
    ``extra`` (OpenAI-style inference, quotas, jobs, console helpers: the service passes them)."""
    from serving.tokens_api import TOKEN_ROUTES

    return [*ROUTES, *TOKEN_ROUTES, *(r for r in extra if r not in ROUTES)]


def openapi_spec(
    prefix: str = "/v1", extra: Sequence[Route] = (), extra_paths: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """OpenAPI 3 description of these routes (``/v1/openapi.json`` adds BentoML's classify and embed);
    ``extra_paths`` (keyed like ``/v1/embeddings``) replace the generic entries built from docstrings."""
    paths: dict[str, dict[str, Any]] = {}
    for r in all_routes(extra):
        params = PAGE_PARAMS if r.name in PAGED else QUERY_PARAMS.get(r.name, [])
        status = getattr(r.endpoint, "status_code", 200)
        paths.setdefault(prefix + r.path, {}).update(route_spec(r, status, params))
    paths.update(extra_paths or {})
    return spec_document(paths, "loraplex management API")


PAGE_PARAMS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
    {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
]
QUERY_PARAMS = {
    "delete_version": [{"name": "force", "in": "query", "schema": {"type": "boolean", "default": False}}],
    "warm": [{"name": "selector", "in": "query", "schema": {"type": "string"}}],
}


async def openapi_endpoint(request: Request) -> JSONResponse:
    spec = request.app.state.openapi()
    return JSONResponse(with_service_routes(spec, await run_in_threadpool(bentoml_service_spec)))


async def render_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, LoraplexError)
    return error_response(err, request.scope["path"])  # the full path: Mount keeps it


def build_app(
    ctx: ManagementContext | None = None,
    extra_routes: Sequence[Route] = (),
    extra_paths: dict[str, dict[str, Any]] | None = None,
) -> Starlette:
    """The Starlette app the service mounts at ``/v1`` (BentoML's own routes take precedence), with its
    own context in ``app.state.loraplex`` (the service instance fills it in)."""
    docs = [
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
    ]
    routes = all_routes(extra_routes)
    app = Starlette(routes=[*routes, *docs], exception_handlers={LoraplexError: render_error})
    app.router.redirect_slashes = False  # never a 307: see serving.gateway.check_path
    app.state.loraplex = ctx if ctx is not None else ManagementContext()
    app.state.openapi = lambda: openapi_spec(extra=extra_routes, extra_paths=extra_paths)
    return app
