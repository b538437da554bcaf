"""Issue 11 over a real ``bentoml serve``: bad names in URLs are refused before any redirect (and
following redirects deletes nothing), a refused request changes nothing stored, aliased versions are
not deleted by accident, numbers are never reused, and ``loraplex serve`` finds a relative store."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys

import httpx
import pytest

from tests.helpers.bundles import save_peft_lora
from tests.service_support import (
    ADMIN,
    ADMIN_TOKEN,
    REPO,
    ServeProcess,
    free_port,
    seeded_store,
    service_env,
    tenant_auth,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VICTIM = "/v1/admin/tenants/acme/adapters/victim"

# The attack and its relatives: each would decode or redirect into another resource. Sent
# byte for byte (http.client does not normalise paths); every one must be a 400/404, never a 3xx.
TRAVERSALS = [
    ("DELETE", f"{VICTIM}/versions/..%2F"),
    ("DELETE", f"{VICTIM}/versions/..%2f"),
    ("DELETE", f"{VICTIM}/versions/%2e%2e%2f"),
    ("DELETE", f"{VICTIM}/versions/%2E%2E%2F"),
    ("DELETE", f"{VICTIM}/versions/%2e%2e"),
    ("DELETE", f"{VICTIM}/versions/.."),
    ("DELETE", f"{VICTIM}/versions/1/"),
    ("DELETE", f"{VICTIM}/aliases/..%2F"),
    ("DELETE", f"{VICTIM}/aliases/%2e%2e%2f"),
    ("DELETE", f"{VICTIM}/aliases/production/"),
    ("DELETE", f"{VICTIM}/"),
    ("DELETE", "/v1/admin/tenants/acme/adapters/..%2Fadapters%2Fvictim"),
    ("DELETE", "/v1/admin/tenants/acme/adapters/victim%2F"),
    ("PUT", f"{VICTIM}/aliases/..%2F"),
    ("GET", f"{VICTIM}/versions/..%2F"),
    ("GET", "/v1/adapters/..%2F"),
    ("GET", "/v1/adapters/victim/"),
]


def start_loraplex_serve(cwd, env: dict[str, str], workdir) -> ServeProcess:
    """``loraplex serve --store store`` run from ``cwd``, the way a user starts it (tokens from env)."""
    port = free_port()
    log = workdir / f"loraplex-serve-{port}.log"
    env = {k: v for k, v in env.items() if k != "LORAPLEX_STORE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "training.cli", "serve", "--store", "store", "--base", "tiny"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ServeProcess(proc, port, log, env)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("e2e-safe-ops")
    store = seeded_store(tmp / "store", tiny_bert_dir, tmp)
    server = start_loraplex_serve(tmp, service_env("unused", tmp), tmp)
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    client = httpx.Client(base_url=server.url, timeout=60)
    peft = save_peft_lora(tiny_bert_dir, tmp / "peft", num_labels=2, seed=5)
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(peft.iterdir())]
    yield {"server": server, "client": client, "store": store, "files": files, "tmp": tmp}
    client.close()
    assert server.stop() is not None


def upload(env, name: str, **fields) -> httpx.Response:
    return env["client"].post(
        f"/v1/admin/tenants/acme/adapters/{name}/versions",
        files=env["files"],
        data={"labels": "neg,pos", **fields},
        headers=ADMIN,
    )


def state(env, name: str):
    return env["store"].version_numbers("acme", name), env["store"].aliases("acme", name)


def raw_request(url: str, method: str, path: str, token: str = ADMIN_TOKEN) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = b'{"version": 1}' if method == "PUT" else None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_bad_names_in_urls_are_refused_before_any_redirect(env):
    for _ in range(2):
        assert upload(env, "victim").status_code == 201
    env["client"].put(f"{VICTIM}/aliases/production", json={"version": 1}, headers=ADMIN)
    before = state(env, "victim")
    assert before == ([1, 2], {"production": 1, "latest": 2})
    url = env["server"].url
    for method, path in TRAVERSALS:
        token = "acme-token-0123456789" if path.startswith("/v1/adapters") else ADMIN_TOKEN
        status, headers, body = raw_request(url, method, path, token)
        assert status in (400, 404), (method, path, status, body)
        assert "location" not in {k.lower() for k in headers}, (method, path, headers)
        assert set(httpx.Response(status, content=body).json()) == {"error", "message"}
    # A client that follows redirects (curl -L) reaches nothing either. (A literal '..' is resolved by
    # the client itself before sending, as curl without --path-as-is does: no server can refuse that.)
    with httpx.Client(base_url=url, timeout=30, follow_redirects=True, headers=ADMIN) as follow:
        for method, path in [(m, p) for m, p in TRAVERSALS if not p.endswith("/..")]:
            r = follow.request(method, path, json={"version": 1} if method == "PUT" else None)
            assert r.status_code in (400, 404) and not r.history, (method, path, r.status_code)
    assert state(env, "victim") == before  # nothing was deleted or moved
    assert env["client"].get(VICTIM, headers=ADMIN).json()["total_versions"] == 2


def test_upload_with_a_reserved_or_bad_alias_stores_nothing(env):
    assert upload(env, "guarded", alias="production").status_code == 201
    before = state(env, "guarded")
    for alias, status in (("latest", 409), ("Bad Alias", 400), ("../x", 400), ("7", 400)):
        r = upload(env, "guarded", alias=alias)
        assert r.status_code == status and r.json()["error"] in ("conflict", "invalid_name"), (alias, r.text)
        assert state(env, "guarded") == before, alias
    assert before == ([1], {"production": 1, "latest": 1})


def test_empty_selector_and_non_integer_alias_versions_are_refused(env):
    c = env["client"]
    for adapter in ("intent@", "intent@@"):
        r = c.post(
            "/v1/classify", json={"items": [{"adapter": adapter, "text": "hi"}]}, headers=tenant_auth("acme")
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_name", (adapter, r.text)
    path = "/v1/admin/tenants/acme/adapters/intent/aliases/production"
    before = state(env, "intent")
    for raw in ("true", "1.0", '"1"', "false", "null"):
        r = c.put(
            path, content=f'{{"version": {raw}}}', headers={**ADMIN, "Content-Type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"] == "validation_error", (raw, r.text)
    assert state(env, "intent") == before


def test_deleting_the_version_production_points_at_is_refused_then_forced(env):
    """The issue's story: promote v2, roll back to v1, delete v1: production used to fall back to v2."""
    c, path = env["client"], "/v1/admin/tenants/acme/adapters/rolled"
    for _ in range(2):
        assert upload(env, "rolled", alias="production").status_code == 201
    assert c.post(f"{path}/rollback", json={"alias": "production"}, headers=ADMIN).json()["version"] == 1
    refused = c.delete(f"{path}/versions/1", headers=ADMIN)
    assert refused.status_code == 409 and "production" in refused.json()["message"], refused.text
    served = c.post(
        "/v1/classify", json={"items": [{"adapter": "rolled", "text": "hi"}]}, headers=tenant_auth("acme")
    )
    assert served.json()[0]["version"] == 1  # still the rolled-back version
    assert c.delete(f"{path}/versions/1?force=maybe", headers=ADMIN).status_code == 400
    forced = c.delete(f"{path}/versions/1?force=true", headers=ADMIN)
    assert forced.status_code == 200 and forced.json()["removed_aliases"] == {"production": 1}
    assert state(env, "rolled") == ([2], {"latest": 2})


def test_version_numbers_continue_after_deleting_the_whole_adapter(env):
    c = env["client"]
    first = upload(env, "reborn").json()
    assert c.delete("/v1/admin/tenants/acme/adapters/reborn", headers=ADMIN).status_code == 200
    again = upload(env, "reborn").json()
    assert (first["version"], again["version"]) == (1, 2)
    assert c.get("/v1/admin/tenants/acme/adapters/reborn/versions/1", headers=ADMIN).status_code == 404


def test_openapi_says_201_for_uploads_and_the_docs_page_lists_every_route(env):
    c = env["client"]
    spec = c.get("/v1/openapi.json").json()
    upload_op = spec["paths"]["/v1/admin/tenants/{tenant}/adapters/{name}/versions"]["post"]
    assert "201" in upload_op["responses"] and "200" not in upload_op["responses"]
    assert {"/v1/classify", "/v1/embed"} <= set(spec["paths"])  # one page for every route
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    page = c.get("/v1/docs")
    assert page.status_code == 200 and "/v1/openapi.json" in page.text and "swagger" in page.text.lower()
    for asset in ("/static_content/swagger-ui.css", "/static_content/swagger-ui-bundle.js"):
        assert asset in page.text and c.get(asset).status_code == 200, asset


def test_loraplex_serve_opens_a_relative_store_in_the_current_directory(env):
    """The module's server is ``loraplex serve --store store`` run from the folder holding ``store``.
    BentoML runs it from the project folder, so it used to open (and create) an empty store there."""
    tenants = env["client"].get("/v1/admin/tenants", headers=ADMIN).json()["tenants"]
    assert {"acme", "globex", "initech"} <= set(tenants)
    assert not (REPO / "store").exists()
