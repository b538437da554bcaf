"""The OpenAI-compatible routes, fan-out and quotas against a real ``bentoml serve``, called with the
official ``openai`` client where it applies: answers equal ``/v1/embed`` and ``/v1/classify``."""

from __future__ import annotations

import re

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from tests.helpers.bundles import head_bundle
from tests.service_support import (
    ADMIN,
    BASE,
    TENANT_TOKENS,
    seeded_store,
    serve_ready,
    service_env,
    tenant_auth,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TEXTS = ["cancel my order please", "where is my parcel, it is late", "hi"]
HEADS = ["h1", "h2", "h3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("e2e-openai")
    store = seeded_store(tmp / "store", tiny_bert_dir, tmp)
    base = store.get_base(BASE)
    for i, name in enumerate(HEADS):
        store.put(head_bundle(base, tenant="acme", name=name, seed=10 + i))
    extra = {"LORAPLEX_QUOTA_REFRESH_S": "0.5", "LORAPLEX_MAX_FANOUT": "8"}
    server = serve_ready(
        "serving.service:LoraplexService", service_env(str(tmp / "store"), tmp, **extra), tmp
    )
    client = httpx.Client(base_url=server.url, timeout=60)
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=TENANT_TOKENS["acme"], max_retries=0)
    yield {"server": server, "client": client, "openai": oai, "store": store, "base_dir": tiny_bert_dir}
    client.close()
    assert server.stop() is not None


def embed(c: httpx.Client, adapter: str | None, texts: list[str], tenant: str = "acme") -> list[list[float]]:
    r = c.post(
        "/v1/embed",
        json={"items": [{"adapter": adapter, "text": t} for t in texts]},
        headers=tenant_auth(tenant),
    )
    assert r.status_code == 200, r.text
    return [x["embedding"] for x in r.json()]


def classify(c: httpx.Client, adapter: str, texts: list[str], tenant: str = "acme") -> list[dict]:
    r = c.post(
        "/v1/classify",
        json={"items": [{"adapter": adapter, "text": t} for t in texts], "include": ["digest"]},
        headers=tenant_auth(tenant),
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("model", ["intent", "intent@2", "intent@production", "h1", BASE])
def test_openai_client_embeddings_equal_v1_embed(env, model, fmt):
    got = env["openai"].embeddings.create(model=model, input=TEXTS, encoding_format=fmt)
    want = embed(env["client"], None if model == BASE else model, TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == model
    vectors = [d.embedding for d in got.data]
    if fmt == "base64":  # the client hands base64 back undecoded when asked for it explicitly
        vectors = [np.frombuffer(__import__("base64").b64decode(v), dtype="<f4").tolist() for v in vectors]
    np.testing.assert_allclose(np.array(vectors), np.array(want), atol=1e-6)
    tok = Tokenizer.from_file(str(env["base_dir"] / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    tokens = sum(len(tok.encode(t).ids) for t in TEXTS)
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens


def test_openai_client_default_encoding_and_one_string(env):
    got = env["openai"].embeddings.create(model="intent", input=TEXTS[0])  # the client asks for base64
    np.testing.assert_allclose(got.data[0].embedding, embed(env["client"], "intent", TEXTS[:1])[0], atol=1e-6)


def test_models_lists_the_tenants_adapters_and_the_base_only(env):
    ids = {m.id: m for m in env["openai"].models.list()}
    assert set(ids) == {"intent", *HEADS, BASE}  # not globex's or initech's
    assert ids["intent"].owned_by == "acme" and ids[BASE].owned_by == "loraplex"
    assert env["openai"].models.retrieve("h2").id == "h2"
    with pytest.raises(openai.NotFoundError):
        env["openai"].models.retrieve("sentiment")  # globex's: the same answer as a missing one


def test_errors_use_openais_shape(env):
    oai = env["openai"]
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="sentiment", input="x")
    assert e.value.body["code"] == "not_found" and "input[0]" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=oai.base_url, api_key="wrong-token-123", max_retries=0).models.list()
    c = env["client"]
    cases = [
        ({"model": "intent"}, 422),  # no input
        ({"model": "intent", "input": []}, 422),
        ({"model": "intent", "input": [1, 2, 3]}, 422),  # token arrays
        ({"model": "intent", "input": "x", "bogus": 1}, 422),
        ({"model": "intent", "input": "x", "dimensions": 3}, 400),
        ({"model": ["h1"] * 9, "input": "x"}, 422),  # over LORAPLEX_MAX_FANOUT
    ]
    for body, status in cases:
        r = c.post("/v1/embeddings", json=body, headers=tenant_auth("acme"))
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = c.post(
        "/v1/embeddings",
        content=b"{nope",
        headers={**tenant_auth("acme"), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = c.post("/v1/classifications", json={"model": BASE, "input": "x"}, headers=tenant_auth("acme"))
    assert r.status_code == 422 and "no classifier" in r.json()["error"]["message"]


def test_classifications_equal_v1_classify(env):
    r = env["client"].post(
        "/v1/classifications", json={"model": "intent", "input": TEXTS}, headers=tenant_auth("acme")
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = classify(env["client"], "intent", TEXTS)
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
    for entry, ref in zip(body["data"], want, strict=True):
        assert entry["labels"] == ref["labels"] and entry["label"] == ref["labels"][0]
        np.testing.assert_allclose(entry["scores"], ref["scores"], atol=1e-6)
        assert (entry["adapter"], entry["version"], entry["digest"]) == (
            ref["adapter"],
            ref["version"],
            ref["digest"],
        )
    # the same route through the openai client's generic request
    raw = env["openai"].post("/classifications", body={"model": "h1", "input": "hi"}, cast_to=object)
    assert raw["data"][0]["labels"] == classify(env["client"], "h1", ["hi"])[0]["labels"]


def test_fan_out_on_an_item_equals_separate_requests(env):
    c = env["client"]
    adapters = ["intent", *HEADS]
    r = c.post(
        "/v1/classify",
        json={"items": [{"adapters": adapters, "text": t} for t in TEXTS]},
        headers=tenant_auth("acme"),
    )
    assert r.status_code == 200, r.text
    for i, item in enumerate(r.json()):
        assert [x["adapter"] for x in item["results"]] == [f"acme/{a}" for a in adapters]
        for res, adapter in zip(item["results"], adapters, strict=True):
            ref = classify(c, adapter, [TEXTS[i]])[0]
            assert res["labels"] == ref["labels"]
            np.testing.assert_allclose(res["scores"], ref["scores"], atol=1e-6)
    r = c.post(
        "/v1/embed",
        json={"items": [{"adapters": [None, "h2"], "text": TEXTS[0]}]},
        headers=tenant_auth("acme"),
    )
    got = r.json()[0]["results"]
    np.testing.assert_allclose(got[0]["embedding"], embed(c, None, TEXTS[:1])[0], atol=1e-6)
    np.testing.assert_allclose(got[1]["embedding"], embed(c, "h2", TEXTS[:1])[0], atol=1e-6)
    # one failing adapter fails the item, naming it
    r = c.post(
        "/v1/classify",
        json={"items": [{"adapters": ["h1", "nope"], "text": "x"}]},
        headers=tenant_auth("acme"),
    )
    assert r.status_code == 404 and r.json()["message"].startswith("items[0]: adapters[1]:")
    r = c.post(
        "/v1/classify",
        json={"items": [{"adapter": "h1", "adapters": ["h2"], "text": "x"}]},
        headers=tenant_auth("acme"),
    )
    assert r.status_code == 422


def test_openai_route_with_several_models_fans_out(env):
    got = env["openai"].embeddings.create(
        model="intent", input=TEXTS[:2], encoding_format="float", extra_body={"model": ["intent", "h3", BASE]}
    )
    assert [(d.input_index, d.model) for d in got.data] == [
        (0, "intent"),
        (0, "h3"),
        (0, BASE),
        (1, "intent"),
        (1, "h3"),
        (1, BASE),
    ]
    for d in got.data:
        want = embed(env["client"], None if d.model == BASE else d.model, [TEXTS[d.input_index]])[0]
        np.testing.assert_allclose(d.embedding, want, atol=1e-6)


def _metric(text: str, name: str, tenant: str) -> float:
    return sum(float(v) for v in re.findall(rf'{name}\{{[^}}]*tenant="{tenant}"[^}}]*\}} (\S+)', text))


def test_quota_override_gives_429_with_retry_after_and_usage_counts_it(env):
    c = env["client"]
    url = "/v1/admin/tenants/initech/quota"
    r = c.put(url, json={"rps": 0.5, "burst": 2}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["quota"]["rps"] == 0.5, r.text
    assert env["store"].quotas()["initech"].burst == 2  # kept in the store: other replicas and restarts
    statuses = [classify_status(c, "initech") for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]
    r = c.post(
        "/v1/classify", json={"items": [{"adapter": "topics", "text": "x"}]}, headers=tenant_auth("initech")
    )
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "requests/s" in r.json()["message"]
    assert classify_status(c, "globex", "sentiment") == 200  # others unaffected
    oai = openai.OpenAI(base_url=env["openai"].base_url, api_key=TENANT_TOKENS["initech"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        oai.embeddings.create(model="topics", input="x")
    assert e.value.body["type"] == "rate_limit_error"
    usage = c.get("/v1/admin/usage", headers=ADMIN).json()["tenants"]
    assert (
        usage["initech"]["rejected"] >= 3 and usage["initech"]["rows"] >= 2 and usage["initech"]["tokens"] > 0
    )
    assert usage["initech"]["quota"]["rps"] == 0.5
    text = c.get("/metrics", headers=ADMIN).text
    assert _metric(text, "loraplex_tenant_rejected_total", "initech") >= 3
    assert _metric(text, "loraplex_tenant_rows_total", "initech") >= 2
    assert _metric(text, "loraplex_tenant_tokens_total", "acme") > 0
    assert c.delete(url, headers=ADMIN).status_code == 200
    assert "initech" not in c.get("/v1/admin/quotas", headers=ADMIN).json()["overrides"]
    assert classify_status(c, "initech") == 200
    r = c.put(url, json={"rps": -1}, headers=ADMIN)
    assert r.status_code == 422 and "initech" not in env["store"].quotas()  # refused: nothing stored
    assert c.get("/v1/admin/usage", headers=tenant_auth("acme")).status_code == 403


def test_rows_in_flight_limit_refuses_a_request_that_can_never_fit(env):
    c = env["client"]
    c.put("/v1/admin/tenants/globex/quota", json={"max_inflight_rows": 2}, headers=ADMIN)
    try:
        r = c.post(
            "/v1/classify",
            json={"items": [{"adapter": "sentiment", "text": t} for t in TEXTS]},
            headers=tenant_auth("globex"),
        )
        assert r.status_code == 422 and "at most 2 rows" in r.json()["message"]
    finally:
        c.delete("/v1/admin/tenants/globex/quota", headers=ADMIN)


def classify_status(c: httpx.Client, tenant: str, adapter: str = "topics") -> int:
    r = c.post(
        "/v1/classify", json={"items": [{"adapter": adapter, "text": "x"}]}, headers=tenant_auth(tenant)
    )
    return r.status_code


def test_routes_are_in_the_openapi_spec(env):
    spec = env["client"].get("/v1/openapi.json").json()["paths"]
    assert "requestBody" in spec["/v1/embeddings"]["post"] and "get" in spec["/v1/models"]
    assert "post" in spec["/v1/classifications"] and "put" in spec["/v1/admin/tenants/{tenant}/quota"]
    assert "get" in spec["/v1/admin/usage"]
    docs = env["client"].get("/docs.json").json()["paths"]
    assert "/v1/classify" in docs
