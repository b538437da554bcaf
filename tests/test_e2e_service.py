"""End to end: one real ``bentoml serve`` process (local store, tiny base) shared by this module."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers.bundles import head_bundle, save_peft_lora
from tests.service_support import (
    ADMIN,
    TENANT_TOKENS,
    auth,
    seeded_store,
    serve_ready,
    service_env,
    tenant_auth,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMITS = {
    "LORAPLEX_MAX_BODY_BYTES": "65536",
    "LORAPLEX_MAX_INPUTS": "16",
    "LORAPLEX_MAX_CHARS": "2000",
    "LORAPLEX_MAX_UPLOAD_BYTES": "1048576",
    "LORAPLEX_ALIAS_TTL_S": "1",
}
SEEDED = {"acme": "intent", "globex": "sentiment", "initech": "topics"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("e2e-service")
    store = seeded_store(tmp / "store", tiny_bert_dir, tmp)
    server = serve_ready(
        "serving.service:LoraplexService", service_env(str(tmp / "store"), tmp, **LIMITS), tmp
    )
    client = httpx.Client(base_url=server.url, timeout=60)
    yield {"server": server, "client": client, "store": store, "tmp": tmp, "base_dir": tiny_bert_dir}
    client.close()
    assert server.stop() is not None


def classify(c: httpx.Client, tenant: str, adapter: str, text: str = "cancel my order please", **kw):
    return c.post(
        "/v1/classify",
        json={"items": [{"adapter": adapter, "text": text}], "include": ["digest"]},
        headers=tenant_auth(tenant),
        **kw,
    )


def upload_peft(env, tenant: str, name: str, seed: int, **fields):
    folder = save_peft_lora(
        env["base_dir"], env["tmp"] / f"up-{tenant}-{name}-{seed}", num_labels=2, seed=seed
    )
    files = [
        ("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())
    ]
    return env["client"].post(
        f"/v1/admin/tenants/{tenant}/adapters/{name}/versions",
        files=files,
        data={"labels": "neg,pos", **fields},
        headers=ADMIN,
    )


def test_probes_metrics_and_openapi(env):
    c = env["client"]
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    paths = c.get("/docs.json").json()["paths"]
    assert "/v1/classify" in paths and "/v1/embed" in paths
    admin_paths = c.get("/v1/openapi.json").json()["paths"]
    assert "post" in admin_paths["/v1/admin/tenants/{tenant}/adapters/{name}/versions"]
    assert "loraplex_ready 1.0" in c.get("/metrics", headers=ADMIN).text


def test_classify_names_the_exact_version_and_digest(env):
    c, store = env["client"], env["store"]
    prod, v2 = store.resolve("acme/intent@production"), store.resolve("acme/intent@2")
    r1 = classify(c, "acme", "intent")  # no '@': production (v1), not latest (v2)
    assert r1.status_code == 200, r1.text
    a = r1.json()[0]
    assert (a["version"], a["digest"]) == (1, prod.digest) and sorted(a["labels"]) == ["l0", "l1", "l2"]
    assert sum(a["scores"]) == pytest.approx(1.0, abs=1e-4) and "embedding" not in a
    b = classify(c, "acme", "intent@2").json()[0]
    assert (b["version"], b["digest"]) == (2, v2.digest) and b["scores"] != a["scores"]
    assert classify(c, "acme", "intent@latest").json()[0]["version"] == 2
    g = classify(c, "globex", "sentiment").json()[0]
    assert g["labels"][0] in ("c0", "c1", "c2") and g["digest"] == store.resolve("globex/sentiment").digest


def test_answers_carry_labels_and_scores_and_extras_only_when_asked(env):
    c, store = env["client"], env["store"]
    items = [{"adapter": "intent", "text": "where is my parcel"}, {"adapters": ["intent@2"], "text": "hi"}]
    lean = c.post("/v1/classify", json={"items": items}, headers=tenant_auth("acme"))
    assert lean.status_code == 200, lean.text
    assert set(lean.json()[0]) == {"adapter", "version", "labels", "scores"}
    assert set(lean.json()[1]["results"][0]) == {"adapter", "version", "labels", "scores"}
    full = c.post(
        "/v1/classify", json={"items": items, "include": ["digest", "logits"]}, headers=tenant_auth("acme")
    ).json()
    first, manifest = full[0], store.resolve("acme/intent@production")
    assert first["digest"] == manifest.digest and full[1]["results"][0]["digest"]
    # Logits in the adapter's label order; their softmax is the (sorted) scores.
    logits = np.asarray(first["logits"])
    probs = dict(zip(manifest.labels, (np.exp(logits) / np.exp(logits).sum()).tolist(), strict=True))
    assert [probs[label] for label in first["labels"]] == pytest.approx(first["scores"], abs=1e-5)
    embed = c.post(
        "/v1/embed", json={"items": [{"adapter": None, "text": "x"}]}, headers=tenant_auth("acme")
    ).json()[0]
    assert "digest" not in embed and len(embed["embedding"]) > 0
    bad = c.post("/v1/classify", json={"items": items, "include": ["weights"]}, headers=tenant_auth("acme"))
    assert bad.status_code == 422 and "include" in bad.json()["message"]


def test_batch_of_inputs_in_one_request_and_embed(env):
    c = env["client"]
    items = [{"adapter": "intent", "text": t} for t in ("hello", "refund my money", "where is my parcel")]
    items.append({"adapter": "intent@2", "text": "hello"})
    r = c.post("/v1/classify", json={"items": items}, headers=tenant_auth("acme"))
    assert r.status_code == 200 and [x["version"] for x in r.json()] == [1, 1, 1, 2]
    e = c.post(
        "/v1/embed",
        json={"items": [{"text": "hello"}, {"text": "refund my money"}]},
        headers=tenant_auth("globex"),
    )
    assert e.status_code == 200, e.text
    vecs = [x["embedding"] for x in e.json()]
    assert len(vecs[0]) == 32 and vecs[0] != vecs[1]
    assert sum(v * v for v in vecs[0]) == pytest.approx(1.0, abs=1e-3)  # bare base: normalised


def test_register_over_http_then_serve_at_once(env):
    c, store = env["client"], env["store"]
    r = upload_peft(env, "initech", "fresh", seed=11, alias="production")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["version"], body["alias"], body["kind"], body["labels"]) == (
        1,
        "production",
        "lora",
        ["neg", "pos"],
    )
    served = classify(c, "initech", "fresh")
    assert served.status_code == 200 and served.json()[0]["digest"] == body["digest"]
    # A full bundle (manifest + head weights) uploads too, and a second version is servable at once.
    head = head_bundle(store.get_base("tiny"), tenant="globex", name="sentiment", seed=12)
    files = [("files", (n, d, "application/octet-stream")) for n, d in head.files.items()]
    files.append(("files", ("manifest.json", head.manifest.to_json(), "application/json")))
    r2 = c.post("/v1/admin/tenants/globex/adapters/sentiment/versions", files=files, headers=ADMIN)
    assert r2.status_code == 201 and r2.json()["version"] == 2, r2.text
    assert classify(c, "globex", "sentiment@2").json()[0]["digest"] == head.manifest.digest
    listed = c.get("/v1/adapters/fresh", headers=tenant_auth("initech")).json()
    assert listed["aliases"] == {"production": 1, "latest": 1} and len(listed["versions"]) == 1
    paged = c.get("/v1/admin/tenants/globex/adapters/sentiment?limit=1", headers=ADMIN).json()
    assert [v["version"] for v in paged["versions"]] == [2] and paged["next_before"] == 2
    for query in ("limit=0", "limit=x", "before=-1", f"limit={10**6}"):
        bad = c.get(f"/v1/admin/tenants/globex/adapters/sentiment?{query}", headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request", (query, bad.text)


def test_alias_promote_and_rollback(env):
    c = env["client"]
    base = "/v1/admin/tenants/acme/adapters/intent"
    assert classify(c, "acme", "intent").json()[0]["version"] == 1
    r = c.put(f"{base}/aliases/production", json={"version": 2}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert classify(c, "acme", "intent").json()[0]["version"] == 2  # this replica: immediately
    rb = c.post(f"{base}/rollback", json={"alias": "production"}, headers=ADMIN)
    assert rb.status_code == 200 and (rb.json()["from_version"], rb.json()["version"]) == (2, 1)
    assert classify(c, "acme", "intent").json()[0]["version"] == 1
    assert c.put(f"{base}/aliases/production", json={"version": 99}, headers=ADMIN).status_code == 404
    assert c.put(f"{base}/aliases/latest", json={"version": 1}, headers=ADMIN).status_code == 409
    shown = c.get(base, headers=ADMIN).json()
    assert shown["aliases"]["production"] == 1 and [v["version"] for v in shown["versions"]] == [1, 2]


def test_delete_while_other_tenants_keep_being_served(env):
    c = env["client"]
    assert upload_peft(env, "initech", "doomed", seed=21).status_code == 201
    assert classify(c, "initech", "doomed").status_code == 200
    statuses: list[int] = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(base_url=env["server"].url, timeout=60) as h:
            while not stop.is_set():
                statuses.append(classify(h, "globex", "sentiment").status_code)

    def wait_for(n: int) -> None:
        for _ in range(600):
            if len(statuses) >= n:
                return
            stop.wait(0.05)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_for(3)
        d = c.delete("/v1/admin/tenants/initech/adapters/doomed", headers=ADMIN)
        assert d.status_code == 200 and d.json()["deleted_versions"] == 1
        seen = len(statuses)
        gone = classify(c, "initech", "doomed")
        assert gone.status_code == 404 and gone.json()["error"] == "not_found"
        wait_for(seen + 3)
    finally:
        stop.set()
        t.join()
    assert len(statuses) >= 6 and set(statuses) == {200}


ROUTES = [
    ("POST", "/v1/classify", {"json": {"items": [{"adapter": "intent", "text": "x"}]}}),
    ("POST", "/v1/embed", {"json": {"items": [{"text": "x"}]}}),
    ("GET", "/v1/adapters", {}),
    ("GET", "/v1/adapters/intent", {}),
    ("GET", "/v1/admin/tenants", {}),
    ("GET", "/v1/admin/tenants/acme/adapters", {}),
    ("GET", "/v1/admin/tenants/acme/adapters/intent", {}),
    ("GET", "/v1/admin/tenants/acme/adapters/intent/versions/1", {}),
    ("POST", "/v1/admin/tenants/acme/adapters/intent/versions", {"files": {"files": ("a.json", b"{}")}}),
    ("PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production", {"json": {"version": 1}}),
    ("POST", "/v1/admin/tenants/acme/adapters/intent/rollback", {"json": {}}),
    ("DELETE", "/v1/admin/tenants/acme/adapters/intent", {}),
    ("POST", "/v1/admin/tenants/acme/adapters/intent/warm", {}),
    ("PUT", "/v1/admin/tenants/acme/adapters/intent/pin", {}),
    ("GET", "/v1/admin/cache", {}),
    ("GET", "/no/such/route", {}),
]


def test_auth_matrix(env):
    c = env["client"]
    for method, path, kw in ROUTES:
        for headers in ({}, auth("wrong-token-123"), {"Authorization": "Basic YWRtaW46YWRtaW4="}):
            r = c.request(method, path, headers=headers, **kw)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (method, path, r.text)
        if path.startswith("/v1/admin"):
            r = c.request(method, path, headers=tenant_auth("acme"), **kw)
            assert r.status_code == 403, (method, path, r.text)
    assert c.post("/v1/classify", json=ROUTES[0][2]["json"], headers=ADMIN).status_code == 403


def test_tenants_cannot_use_list_or_probe_each_other(env):
    c = env["client"]
    missing = classify(c, "acme", "no-such-adapter").json()
    for caller in TENANT_TOKENS:
        own = c.get("/v1/adapters", headers=tenant_auth(caller)).json()
        assert own["tenant"] == caller and {a["name"] for a in own["adapters"]} >= {SEEDED[caller]}
        for owner, name in SEEDED.items():
            if owner == caller:
                continue
            assert name not in {a["name"] for a in own["adapters"]}
            for ref in (name, f"{name}@1", f"{name}@production", f"{name}@latest"):
                r = classify(c, caller, ref)  # exactly what an adapter that exists nowhere answers
                assert r.status_code == 404 and r.json()["error"] == missing["error"] == "not_found", r.text
                assert owner not in r.json()["message"]
            r = classify(c, caller, f"{owner}/{name}")  # naming another tenant is refused outright
            assert r.status_code == 400 and r.json()["error"] == "invalid_name"
            shown = c.get(f"/v1/adapters/{name}", headers=tenant_auth(caller))
            assert shown.status_code == 404 and shown.json()["error"] == "not_found"
    # The body cannot choose the tenant: unknown fields are refused.
    r = c.post(
        "/v1/classify",
        json={"items": [{"adapter": "sentiment", "text": "x", "tenant": "globex"}]},
        headers=tenant_auth("acme"),
    )
    assert r.status_code == 422


def test_limits(env):
    c = env["client"]
    h = tenant_auth("acme")
    big = json.dumps({"items": [{"adapter": "intent", "text": "x" * 70000}]})
    r = c.post("/v1/classify", content=big, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit applies while streaming
        yield b'{"items": [{"adapter": "intent", "text": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}]}'

    r = c.post("/v1/classify", content=chunks(), headers={**h, "content-type": "application/json"})
    assert r.status_code == 413, r.text
    r = c.post("/v1/classify", json={"items": [{"adapter": "intent", "text": "x"}] * 17}, headers=h)
    assert r.status_code == 422 and "limit is 16" in r.json()["message"]
    r = c.post("/v1/classify", json={"items": [{"adapter": "intent", "text": "x" * 2001}]}, headers=h)
    assert r.status_code == 422 and "2001 characters" in r.json()["message"]
    r = c.post(
        "/v1/admin/tenants/acme/adapters/big/versions",
        headers=ADMIN,
        files={"files": ("adapter_model.safetensors", b"0" * (1100 * 1024))},
    )
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"{}", "headers": {}}, 415, "unsupported_media_type"),
        ({"json": {"items": [{"text": "no adapter"}]}}, 422, "validation_error"),
        ({"json": {"items": [{"adapter": "intent"}]}}, 422, "validation_error"),
        ({"json": {"items": []}}, 422, "validation_error"),
        ({"json": [1, 2]}, 422, "validation_error"),
        ({"json": {"items": [{"adapter": "Bad Name!", "text": "x"}]}}, 400, "invalid_name"),
        ({"json": {"items": [{"adapter": "intent", "image_b64": "%%%"}]}}, 400, "invalid_request"),
    ],
)
def test_malformed_requests_get_4xx_with_error_and_message(env, kwargs, status, code):
    r = env["client"].post(
        "/v1/classify", headers={**tenant_auth("acme"), **kwargs.pop("headers", {})}, **kwargs
    )
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "message"} and r.json()["error"] == code


def test_bad_uploads(env):
    c = env["client"]
    url = "/v1/admin/tenants/acme/adapters/bad/versions"
    r = c.post(url, json={"x": 1}, headers=ADMIN)
    assert r.status_code == 415
    r = c.post(url, files={"files": ("adapter_model.bin", b"pickle")}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"] == "unsafe_format"
    r = c.post(
        url,
        files=[
            ("files", ("adapter_config.json", b"{nope")),
            ("files", ("adapter_model.safetensors", b"garbage")),
        ],
        headers=ADMIN,
    )
    assert r.status_code in (400, 422) and set(r.json()) == {"error", "message"}
    r = c.post(
        "/v1/admin/tenants/Bad!/adapters/x/versions", files={"files": ("a.json", b"{}")}, headers=ADMIN
    )
    assert r.status_code in (400, 404)


def test_concurrent_requests_of_different_tenants_merge_into_one_engine_batch(env):
    url = env["server"].url
    tenants = list(SEEDED)

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:

            async def one(i: int):
                tenant = tenants[i % 3]
                body = {"items": [{"adapter": SEEDED[tenant], "text": f"message number {i}"}]}
                return (await ac.post("/v1/classify", json=body, headers=tenant_auth(tenant))).status_code

            return await asyncio.gather(*[one(i) for i in range(48)])

    # Fresh alias answers first: a tenant whose answer expired (2 s) is re-resolved off the event loop,
    # so its requests would reach the queue as one clump per tenant, each taken alone by an idle worker.
    for tenant in tenants:
        classify(env["client"], tenant, SEEDED[tenant])
    before = _histogram(
        env["client"].get("/metrics", headers=ADMIN).text, "loraplex_engine_batch_tenants", "classify"
    )
    assert set(asyncio.run(fire())) == {200}
    after = _histogram(
        env["client"].get("/metrics", headers=ADMIN).text, "loraplex_engine_batch_tenants", "classify"
    )
    merged = (after["count"] - after["le_1"]) - (before["count"] - before["le_1"])
    assert merged >= 1, (before, after)  # at least one engine call held rows of 2+ tenants
    text = env["client"].get("/metrics", headers=ADMIN).text
    rows = float(re.search(r'loraplex_engine_batch_rows_sum\{task="classify"\} (\S+)', text).group(1))
    calls = float(re.search(r'loraplex_engine_batch_rows_count\{task="classify"\} (\S+)', text).group(1))
    assert rows / calls > 1.0  # the fair queue merged requests into engine calls


def _histogram(text: str, name: str, task: str) -> dict[str, float]:
    def value(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0

    return {
        "count": value(rf'{name}_count\{{task="{task}"\}} (\S+)'),
        "le_1": value(rf'{name}_bucket\{{le="1.0",task="{task}"\}} (\S+)'),
    }


def test_per_tenant_metrics(env):
    c = env["client"]
    classify(c, "globex", "sentiment")
    text = c.get("/metrics", headers=ADMIN).text
    assert re.search(r'loraplex_requests_total\{route="classify",status="200",tenant="globex"\} [1-9]', text)
    assert re.search(
        r'loraplex_request_duration_seconds_count\{route="classify",tenant="globex"\} [1-9]', text
    )
    assert re.search(
        r'loraplex_inference_items_total\{outcome="ok",task="classify",tenant="globex"\} [1-9]', text
    )
    assert 'loraplex_cache{stat="loads"}' in text


def test_inference_is_answered_by_the_gateway_on_uvloop_and_httptools(env):
    """Issue 18, a lean HTTP path: the server runs on uvloop and httptools; /v1/classify and /v1/embed
    are answered by our gateway, never by BentoML's API wrapper (which stamps a ``Server: BentoML
    Service/...`` header on every answer of its own), and skip BentoML's access log and tracing."""
    c = env["client"]
    answer = classify(c, "acme", "intent", text="a lean path")
    embedded = c.post("/v1/embed", json={"items": [{"text": "x"}]}, headers=tenant_auth("acme"))
    assert answer.status_code == 200 and embedded.status_code == 200, (answer.text, embedded.text)
    assert "server" not in answer.headers and "server" not in embedded.headers
    assert "x-bentoml-request-id" not in answer.headers
    assert c.get("/v1/adapters", headers=tenant_auth("acme")).status_code == 200
    time.sleep(0.5)  # let the log lines reach the file
    log = env["server"].log_tail(10_000_000)
    assert "HTTP: event loop uvloop.Loop, HTTP parser uvicorn.protocols.http.httptools_impl" in log
    access = [line for line in log.splitlines() if "(scheme=http,method=" in line]  # BentoML access log
    assert any("/v1/adapters" in line for line in access), log[-3000:]
    assert not any("/v1/classify" in line or "/v1/embed" in line for line in access)


def test_warm_pin_and_cache_status(env):
    c = env["client"]
    base = "/v1/admin/tenants/initech/adapters/topics"
    assert c.post(f"{base}/warm", params={"selector": "1"}, headers=ADMIN).status_code == 200
    assert c.put(f"{base}/pin", headers=ADMIN).status_code == 200
    stats = c.get("/v1/admin/cache", headers=ADMIN).json()
    assert stats["pinned"] >= 1 and stats["loads"] >= 1 and stats["entries"] >= 1
    assert c.delete(f"{base}/pin", headers=ADMIN).status_code == 200
    assert c.post("/v1/admin/tenants/initech/adapters/nope/warm", headers=ADMIN).status_code == 404


def test_bentoml_sync_client(env):
    import bentoml

    with bentoml.SyncHTTPClient(env["server"].url, token=TENANT_TOKENS["acme"]) as client:
        out = client.classify(items=[{"adapter": "intent@2", "text": "hello"}])
    assert out[0]["version"] == 2 and len(out[0]["labels"]) == 3


def test_not_ready_until_the_backbone_loads(tmp_path, tiny_bert_dir):
    """A base whose weights cannot load: /livez answers, /readyz stays 503, inference says 503 unavailable."""
    import shutil

    from tests.service_support import start_serve

    broken = tmp_path / "base-copy"
    shutil.copytree(tiny_bert_dir, broken)
    seeded_store(tmp_path / "store", broken, tmp_path)
    (broken / "model.safetensors").unlink()  # registered, then its weights vanish
    server = start_serve(
        "serving.service:LoraplexService", service_env(str(tmp_path / "store"), tmp_path), tmp_path
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, server.log_tail()
            try:
                if httpx.get(server.url + "/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
        while "loading the engine failed" not in server.log_tail(50000):  # the load has been tried
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.25)
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
        r = classify(httpx.Client(base_url=server.url, timeout=30), "acme", "intent")
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
    finally:
        server.stop()


def test_insecure_dev_mode_serves_without_tokens_and_says_so(tmp_path, tiny_bert_dir):
    seeded_store(tmp_path / "store", tiny_bert_dir, tmp_path)
    env = service_env(str(tmp_path / "store"), tmp_path, LORAPLEX_INSECURE_DEV="1")
    for key in ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_TENANT_TOKENS"):
        env.pop(key)
    server = serve_ready("serving.service:LoraplexService", env, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            body = {"items": [{"adapter": "intent", "text": "hello"}]}
            r = c.post("/v1/classify", json=body, headers={"X-Loraplex-Tenant": "acme"})
            assert r.status_code == 200 and r.json()[0]["adapter"] == "acme/intent"
            assert c.get("/v1/admin/tenants").json()["tenants"] == ["acme", "globex", "initech"]
            assert (
                c.post("/v1/classify", json=body, headers={"X-Loraplex-Tenant": "globex"}).status_code == 404
            )
            assert (
                c.post("/v1/classify", json=body).status_code == 403
            )  # no tenant header: admin, not a tenant
        assert "LORAPLEX INSECURE DEV MODE" in server.log_tail(50000)
    finally:
        server.stop()
