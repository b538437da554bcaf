"""``/v1/classify`` and ``/v1/embed`` are answered in the gateway (issue 18, "the fewest layers between
the socket and the engine"): once a request is authenticated, parsed, admitted and preloaded, the
gateway submits its items and writes the answer itself; nothing behind it (Starlette's router,
BentoML's API wrapper and IO descriptors) sees the request. Status codes, bodies and headers are those
of the routes it replaces, errors rendered by the one renderer.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry.util.http import ExcludeList

from adapters_store.errors import NotFound, ServiceUnavailable, TooManyRequests
from serving.auth import TokenBook
from serving.gateway import GatewayMiddleware, GatewayState
from serving.http_io import ClassifyInput, EmbedInput, inference_handler
from serving.inference import error_result
from serving.schemas import ItemResult
from serving.settings import BENTOML_LOG_SKIP_PATHS, INFERENCE_ROUTES, ServiceSettings, bentoml_config

TOKEN = "acme-secret-0123456789"


async def _nothing_behind(scope, receive, send):
    raise AssertionError(f"{scope['path']} reached the app behind the gateway")


def _post(answer, path: str, body: dict, app=_nothing_behind) -> httpx.Response:
    state = GatewayState(
        tokens=TokenBook([], {"acme": [TOKEN]}),
        validators={"/v1/classify": ClassifyInput, "/v1/embed": EmbedInput},
        is_ready=lambda: True,
        inference=inference_handler(answer),
    )
    transport = httpx.ASGITransport(app=GatewayMiddleware(app, state))

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})

    return asyncio.run(go())


def _answered(adapter: str = "intent") -> ItemResult:
    return ItemResult(
        adapter=adapter,
        version=3,
        digest="d" * 64,
        labels=["pos", "neg"],
        scores=[0.75, 0.25],
        logits=[1.0, 0.0],
    )


def test_classify_is_answered_by_the_gateway_for_the_tokens_tenant():
    seen = []

    async def answer(task, items):
        seen.append((task, [(i.tenant, i.adapter, i.text) for i in items]))
        return [_answered() for _ in items]

    body = {"items": [{"adapter": "intent", "text": "hi"}, {"adapter": "intent@3", "text": "yo"}]}
    r = _post(answer, "/v1/classify", body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    # Extras only when asked; no nulls.
    assert (
        r.json()
        == [{"adapter": "intent", "version": 3, "labels": ["pos", "neg"], "scores": [0.75, 0.25]}] * 2
    )
    assert seen == [("classify", [("acme", "intent", "hi"), ("acme", "intent@3", "yo")])]
    r = _post(answer, "/v1/classify", {**body, "include": ["digest"]})
    assert r.json()[0]["digest"] == "d" * 64 and "logits" not in r.json()[0]


def test_embed_and_fan_out_go_to_the_embed_task():
    seen = []

    async def answer(task, items):
        seen.append(task)
        fanned = ItemResult(results=[ItemResult(adapter=None, version=None, embedding=[0.5, 0.5])] * 2)
        return [fanned]

    r = _post(answer, "/v1/embed", {"items": [{"adapters": [None, None], "text": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json() == [{"results": [{"embedding": [0.5, 0.5]}] * 2}]
    assert seen == ["embed"]


@pytest.mark.parametrize(
    "err, status, code, retry_after",
    [
        (TooManyRequests("over your quota", retry_after=2.2), 429, "too_many_requests", "3"),
        (ServiceUnavailable("the backbone is still loading"), 503, "unavailable", "5"),
        (NotFound("adapter 'nope' not found"), 404, "not_found", None),
    ],
)
def test_a_failed_item_fails_the_request_with_its_status_code_and_headers(err, status, code, retry_after):
    async def answer(task, items):
        return [_answered(), error_result(err)]

    body = {"items": [{"adapter": "intent", "text": "a"}, {"adapter": "nope", "text": "b"}]}
    r = _post(answer, "/v1/classify", body)
    assert r.status_code == status
    assert r.json() == {"error": code, "message": f"items[1]: {err.message}"}
    assert r.headers.get("retry-after") == retry_after


def test_an_error_raised_while_answering_is_rendered_in_our_shape():
    async def raises_ours(task, items):
        raise TooManyRequests("queue full", retry_after=1)

    async def crashes(task, items):
        raise RuntimeError("bug")

    body = {"items": [{"adapter": "intent", "text": "a"}]}
    r = _post(raises_ours, "/v1/classify", body)
    assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (429, "too_many_requests", "1")
    r = _post(crashes, "/v1/classify", body)
    assert r.status_code == 500 and r.json()["error"] == "internal_error" and "bug" not in r.text


def test_a_body_the_gateway_refuses_never_reaches_the_handler():
    async def answer(task, items):
        raise AssertionError("answered a refused body")

    r = _post(answer, "/v1/classify", {"items": [{"adapter": "intent", "text": "a", "tenant": "globex"}]})
    assert r.status_code == 422 and r.json()["error"] == "validation_error"


# -- BentoML's per-request telemetry on the inference routes (a setting, off by default) ----------------
def test_inference_routes_skip_bentomls_access_log_and_tracing_unless_asked():
    config = bentoml_config(ServiceSettings(store="x"))
    skipped = config["logging"]["access"]["skip_paths"]
    assert {"/metrics", "/livez", "/readyz", *INFERENCE_ROUTES} <= set(skipped)
    excluded = ExcludeList(config["tracing"]["excluded_urls"])  # as BentoML builds it
    for route in INFERENCE_ROUTES:
        assert excluded.url_disabled(f"http://127.0.0.1:3000{route}")
    for other in ("/v1/adapters", "/v1/admin/tenants", "/v1/classify/x", "/v1/models"):
        assert not excluded.url_disabled(f"http://127.0.0.1:3000{other}")
    on = bentoml_config(
        ServiceSettings.from_env({"LORAPLEX_STORE": "x", "LORAPLEX_INFERENCE_TELEMETRY": "1"})
    )
    assert "logging" not in on and "tracing" not in on


def test_the_kept_skip_list_is_the_installed_bentomls_default():
    # Our access-log skip list replaces BentoML's: it must still carry every path BentoML's own
    # default skips, or an upgrade that adds one would start logging it again.
    from importlib.resources import files

    import yaml

    default = yaml.safe_load(
        files("bentoml._internal.configuration.v2").joinpath("default_configuration.yaml").read_text()
    )
    assert set(default["services"]["logging"]["access"]["skip_paths"]) <= set(BENTOML_LOG_SKIP_PATHS)
