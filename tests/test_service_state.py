"""The HTTP layer's contract (issue 12 step 5, issue 18 "a lean HTTP path"):

one settings object gives the BentoML decorator, the engine and the limits; importing serving reads no
environment; per-service state lives on the service instance and its app, never in module globals;
errors are rendered in one place; each inference body is parsed once.
"""

from __future__ import annotations

import ast
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from adapters_store import describe_base, open_store
from serving.settings import JobSettings, LimitSettings, ServiceSettings, bentoml_config
from tests.helpers.bundles import head_bundle

REPO = Path(__file__).resolve().parents[1]
TOKEN = "acme-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"


# -- one settings object -----------------------------------------------------------------------------
def test_one_settings_object_gives_the_decorator_the_engine_and_the_limits():
    from serving.service import effective_limits, engine_settings

    settings = ServiceSettings(
        store="x",
        threads=3,
        workers=2,
        request_timeout_s=33,
        max_batch_size=7,
        limits=LimitSettings(max_tokens=100, max_queue_ms=50, max_inputs=5),
    )
    config = bentoml_config(settings)
    assert {k: config[k] for k in ("workers", "traffic", "resources")} == {
        "workers": 2,
        "traffic": {"timeout": 33.0},
        "resources": {"cpu": "3"},
    }
    assert set(config) == {
        "workers",
        "traffic",
        "resources",
        "logging",
        "tracing",
    }  # see test_gateway_inference
    engine = engine_settings(settings)
    assert (engine.threads, engine.max_batch_rows, engine.max_seq_len) == (3, 7, 100)
    limits = effective_limits(settings)
    assert (limits.max_queue_ms, limits.max_inputs, limits.max_tokens) == (50, 5, 100)
    # Without settings (a bad environment) the decorator takes the defaults and the start fails later.
    assert bentoml_config(None)["workers"] == 1


_SPY = """
import os, sys
read = set()
def note(k):
    if "/serving/" in sys._getframe(2).f_code.co_filename:  # read by a serving module's own code
        read.add(k)
class Spy(dict):
    def __getitem__(self, k):
        note(k); return dict.__getitem__(self, k)
    def get(self, k, d=None):
        note(k); return dict.get(self, k, d)
    def __contains__(self, k):
        note(k); return dict.__contains__(self, k)
os.environ = Spy(os.environ)
import importlib, pkgutil, serving
names = sorted(m.name for m in pkgutil.iter_modules(serving.__path__, "serving."))
for name in names:
    if name != "serving.service":
        importlib.import_module(name)
print(sorted(k for k in read if k.startswith("LORAPLEX_")))
import serving.service as svc
print(svc.SETTINGS is None, type(svc.SETTINGS_ERROR).__name__, svc.LoraplexService.config["traffic"])
"""


def test_importing_serving_reads_no_loraplex_variable_and_a_bad_one_stops_only_the_start(tmp_path):
    poisoned = {
        k: "poison" for k in ("LORAPLEX_MAX_BATCH_SIZE", "LORAPLEX_REQUEST_TIMEOUT_S", "LORAPLEX_THREADS")
    }
    env = {"PYTHONPATH": str(REPO), "HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "b"), **poisoned}
    env.update(BENTOML_DO_NOT_TRACK="True", LORAPLEX_STORE=str(tmp_path), PATH="/usr/bin:/bin")
    out = subprocess.run(
        [sys.executable, "-c", _SPY], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    modules_read, service_line = out.stdout.strip().splitlines()[-2:]
    assert modules_read == "[]"  # no serving module but serving.service touches LORAPLEX_* at import
    # serving.service reads the environment once; a bad value keeps the import alive (defaults in the
    # decorator) and is the error the service then refuses to start with.
    assert service_line == "True InvalidSettings {'timeout': 120.0}"


def test_the_decorator_takes_the_settings_the_service_module_read(tmp_path):
    code = (
        "import serving.service as s; c = s.LoraplexService.config; "
        "print(c['workers'], c['traffic']['timeout'], c['resources']['cpu'], s.SETTINGS.max_batch_size)"
    )
    env = {"PYTHONPATH": str(REPO), "HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "b")}
    env.update(
        BENTOML_DO_NOT_TRACK="True",
        PATH="/usr/bin:/bin",
        LORAPLEX_STORE=str(tmp_path),
        LORAPLEX_WORKERS="3",
        LORAPLEX_REQUEST_TIMEOUT_S="45",
        LORAPLEX_THREADS="4",
        LORAPLEX_MAX_BATCH_SIZE="9",
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "45.0", "4", "9"]


# -- per-instance state --------------------------------------------------------------------------------
def _store_with(tmp_path: Path, tiny_bert_dir: Path, name: str):
    store = open_store(str(tmp_path / name))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(head_bundle(base, tenant="acme", name=name, seed=3))
    return store


def _settings(store_dir: Path) -> ServiceSettings:
    return ServiceSettings(
        store=str(store_dir),
        base="tiny",
        admin_token=ADMIN_TOKEN,
        tenant_tokens={"acme": (TOKEN,)},
        threads=1,
        token_refresh_s=300,
        limits=LimitSettings(quota_refresh_s=0),
        jobs=JobSettings(max_concurrent=0),
    )


class _Stack:
    """One service instance with its own /v1 app and gateway, as BentoML would stack them."""

    def __init__(self, settings: ServiceSettings):
        from serving.gateway import GatewayMiddleware
        from serving.management import build_app
        from serving.openai_api import OPENAI_ROUTES
        from serving.quota_routes import QUOTA_ROUTES
        from serving.service import LoraplexService

        self.v1 = build_app(extra_routes=[*OPENAI_ROUTES, *QUOTA_ROUTES])
        self.service = LoraplexService.inner(settings=settings, v1_app=self.v1)
        self.asgi = GatewayMiddleware(Starlette(routes=[Mount("/v1", app=self.v1)]), source=self.v1)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.service.engine is None:
            assert self.service.load_error is None and time.monotonic() < deadline, self.service.load_error
            time.sleep(0.05)

    async def call(self, method: str, path: str, token: str = TOKEN, **kw) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)


@pytest.fixture
def keep_sigterm():
    previous = signal.getsignal(signal.SIGTERM)  # the service installs its drain handler
    yield
    signal.signal(signal.SIGTERM, previous)


def test_two_service_instances_in_one_process_share_no_state(tmp_path, tiny_bert_dir, keep_sigterm):
    _store_with(tmp_path, tiny_bert_dir, "alpha")
    _store_with(tmp_path, tiny_bert_dir, "beta")
    a, b = _Stack(_settings(tmp_path / "alpha")), _Stack(_settings(tmp_path / "beta"))
    assert a.v1.state.loraplex is not b.v1.state.loraplex and a.v1.state.gateway is not b.v1.state.gateway
    assert a.service.usage is not b.service.usage and a.service.batcher is not b.service.batcher
    a.wait_ready()
    b.wait_ready()

    async def scenario():
        listed = [(await s.call("GET", "/v1/adapters")).json()["adapters"] for s in (a, b)]
        embedded = await a.call("POST", "/v1/embeddings", json={"model": "tiny", "input": ["hello"]})
        usage = [(await s.call("GET", "/v1/admin/usage", token=ADMIN_TOKEN)).json() for s in (a, b)]
        return listed, embedded, usage

    listed, embedded, usage = asyncio.run(scenario())
    assert [[x["name"] for x in names] for names in listed] == [["alpha"], ["beta"]]
    assert embedded.status_code == 200, embedded.text
    assert usage[0]["tenants"]["acme"]["rows"] == 1 and "acme" not in usage[1]["tenants"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_bert_dir):
    previous = signal.getsignal(signal.SIGTERM)
    tmp = tmp_path_factory.mktemp("stack")
    _store_with(tmp, tiny_bert_dir, "alpha")
    served = _Stack(_settings(tmp / "alpha"))
    served.wait_ready()
    yield served
    signal.signal(signal.SIGTERM, previous)


# -- errors rendered in one place ----------------------------------------------------------------------
def test_every_error_response_comes_from_the_one_renderer(stack, monkeypatch):
    from serving import error_responses

    rendered = []
    original = error_responses.render

    def counting(err, path=""):
        rendered.append((type(err).__name__, path))
        return original(err, path)

    monkeypatch.setattr(error_responses, "render", counting)

    async def calls():
        return [
            await stack.call("GET", "/v1/models/nope"),  # OpenAI route raises NotFound
            await stack.call("GET", "/v1/adapters/nope"),  # management route raises NotFound
            await stack.call("POST", "/v1/embeddings", json={"model": "tiny", "input": []}),  # gateway 422
            await stack.call("GET", "/v1/adapters", token="wrong-token-0123456789"),  # gateway 401
            await stack.call("POST", "/v1/classifications", json={"model": "missing", "input": ["x"]}),
        ]

    models, adapters, empty, unauth, missing = asyncio.run(calls())
    assert models.status_code == 404 and models.json()["error"]["type"] == "not_found_error"
    assert adapters.status_code == 404 and adapters.json()["error"] == "not_found"
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "validation_error"
    assert unauth.status_code == 401 and unauth.json()["error"] == "unauthorized"
    # A failed row of an answered batch is raised again by the route and rendered the same way.
    assert missing.status_code == 404 and missing.json()["error"]["message"].startswith("input[0]: ")
    assert [path for _, path in rendered] == [
        "/v1/models/nope",
        "/v1/adapters/nope",
        "/v1/embeddings",
        "/v1/adapters",
        "/v1/classifications",
    ]


def _builds_error_response(node: ast.Call) -> bool:
    """``JSONResponse(..., status_code=4xx/5xx)``, or a body made with ``to_dict()``/``openai_error``."""
    name = getattr(node.func, "id", getattr(node.func, "attr", ""))
    if name in ("to_dict", "openai_error", "openai_error_bytes"):
        return True
    if name.endswith("Response"):
        for kw in node.keywords:
            if kw.arg == "status_code" and isinstance(kw.value, ast.Constant) and kw.value.value >= 400:
                return True
    return False


def test_no_serving_module_but_the_renderer_builds_an_error_body():
    allowed = {"error_responses.py", "openai_errors.py"}
    offenders = []
    for path in sorted((REPO / "serving").rglob("*.py")):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _builds_error_response(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# -- each body parsed once; OpenAI-style requests preloaded --------------------------------------------
def test_an_openai_request_body_is_parsed_once_and_its_models_preloaded(stack, monkeypatch):
    from serving.openai_api import ClassificationsRequest

    parses = []
    original = ClassificationsRequest.model_validate_json.__func__

    def counting(cls, data, *args, **kwargs):
        parses.append(len(data))
        return original(cls, data, *args, **kwargs)

    monkeypatch.setattr(ClassificationsRequest, "model_validate_json", classmethod(counting))
    preloaded = []
    preload = stack.service.gateway.preload

    async def recording(tenant, refs):
        preloaded.append((tenant, list(refs)))
        return await preload(tenant, refs)

    monkeypatch.setattr(stack.service.gateway, "preload", recording)
    stack.service.engine.invalidate("acme")  # cold again
    body = {"model": "alpha", "input": ["one text"]}
    answer = asyncio.run(stack.call("POST", "/v1/classifications", json=body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["adapter"] == "acme/alpha"
    assert len(parses) == 1  # the gateway's parse; the route reads the parsed object
    assert preloaded == [("acme", ["alpha"])]
    assert stack.service.engine.is_resident("acme", "alpha")
    # The base's own name is no adapter: nothing to load for it.
    asyncio.run(stack.call("POST", "/v1/embeddings", json={"model": "tiny", "input": ["x"]}))
    assert preloaded[-1] == ("acme", [None])


def test_the_inference_routes_take_the_gateways_parsed_body_without_reading_it():
    from starlette.requests import Request

    from serving.auth import Principal
    from serving.gateway import PARSED_KEY, PRINCIPAL_KEY
    from serving.http_io import ClassifyInput

    parsed = ClassifyInput.model_validate_json(b'{"items": [{"adapter": "a", "text": "t"}]}')

    async def receive():
        raise AssertionError("the body was read a second time")

    state = {PRINCIPAL_KEY: Principal("tenant", "acme"), PARSED_KEY: parsed}
    request = Request({"type": "http", "method": "POST", "headers": [], "state": state}, receive)
    got = asyncio.run(ClassifyInput.from_http_request(request, None))
    assert got is parsed and got.items[0].tenant == "acme"


def test_the_service_answers_classify_in_its_gateway_with_usage_counted(stack, monkeypatch):
    """The stack mounts no BentoML route: /v1/classify is answered by the gateway's handler, through
    the service's fair batcher, with the caller's usage counted."""
    monkeypatch.setattr(type(stack.service), "classify", None)  # the @bentoml.api method is not on the path
    before = stack.service.usage.snapshot()["tenants"].get("acme", {}).get("rows", 0)
    body = {"items": [{"adapter": "alpha", "text": "one"}, {"adapter": "alpha", "text": "two"}]}
    answer = asyncio.run(stack.call("POST", "/v1/classify", json=body))
    assert answer.status_code == 200, answer.text
    assert [r["adapter"] for r in answer.json()] == ["acme/alpha"] * 2 and "digest" not in answer.json()[0]
    assert stack.service.usage.snapshot()["tenants"]["acme"]["rows"] == before + 2
    missing = asyncio.run(
        stack.call("POST", "/v1/classify", json={"items": [{"adapter": "nope", "text": "x"}]})
    )
    assert missing.status_code == 404 and missing.json()["message"].startswith("items[0]: ")


def test_the_service_batcher_answers_shared_rows_before_a_full_fine_tunes_own_pass(
    tmp_path, tiny_bert_dir, keep_sigterm
):
    """A full fine-tune's rows run a second backbone; the warm rows taken in the same batch go first."""
    from types import SimpleNamespace

    from serving.fairness import Job
    from tests.test_engine_kinds import _full_bundle

    store = _store_with(tmp_path, tiny_bert_dir, "alpha")
    store.put(_full_bundle(tiny_bert_dir, store.get_base("tiny"), "acme", seed=5)[0])
    stack = _Stack(_settings(tmp_path / "alpha"))
    stack.wait_ready()
    answered = asyncio.run(stack.call("POST", "/v1/classifications", json={"model": "ft", "input": ["a"]}))
    assert answered.status_code == 200, answered.text  # now the engine knows "ft" is a full fine-tune

    def job(adapter: str) -> Job:
        item = SimpleNamespace(tenant="acme", adapter=adapter, targets=None)
        return Job("acme", 1, ("classify", [item]), enqueued=0.0)

    full, warm, other = job("ft"), job("alpha"), job("alpha")
    parts = stack.service.batcher._split([full, warm, other])
    assert parts == ([warm, other], [full])  # shared first; the full pass goes to its own thread
