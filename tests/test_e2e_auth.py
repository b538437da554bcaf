"""Secrets, tokens and start-up checks against real processes: one ``bentoml serve`` (local store, tiny
base) shared by the module, a second one for the metrics folders, real ``loraplex serve`` and
``bentoml serve`` start failures, and SeaweedFS for S3 endpoint and credential errors.

The sweep (issue 17) runs known sentinel secrets through every settings error, every auth failure,
wrong S3 endpoints and credentials and a normal session with request logging on, then searches
everything printed, logged and returned for any 6-character piece of any sentinel.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from adapters_store.tokens import TenantTokenRegistry
from tests.service_support import REPO, free_port, seeded_store, serve_ready, service_env
from training.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_rng = random.Random(17)
# Letters that no log line, digest or generated token uses in a run of 6: a hit is a leak, not chance.
_ALPHABET = "QXZJKVWqxzjkvw"


def _sentinel(n: int = 24) -> str:
    return "".join(_rng.choice(_ALPHABET) for _ in range(n))


S = {
    name: _sentinel()
    for name in (
        "admin",
        "acme",
        "globex",
        "metrics",
        "file_admin",
        "file_tenant",
        "aws_key",
        "aws_secret",
        "unknown",
    )
}
S["short"] = _sentinel(7)  # too short to be a token: refused, and never printed either
REFRESH_S = 1.0


def leaks(text: str) -> list[str]:
    """Every 6-character piece of any sentinel found in ``text``."""
    return sorted({s[i : i + 6] for s in S.values() for i in range(len(s) - 5) if s[i : i + 6] in text})


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("e2e-auth")
    store = seeded_store(tmp / "store", tiny_bert_dir, tmp)
    tokens_file = tmp / "tokens.json"
    tokens_file.write_text(
        json.dumps({"admin": [S["file_admin"]], "tenants": {"initech": [S["file_tenant"]]}})
    )
    server_env = service_env(
        str(tmp / "store"),
        tmp,
        LORAPLEX_ADMIN_TOKEN=S["admin"],
        LORAPLEX_TENANT_TOKENS=f"acme:{S['acme']},globex:{S['globex']}",
        LORAPLEX_METRICS_TOKEN=S["metrics"],
        LORAPLEX_TOKENS_FILE=str(tokens_file),
        LORAPLEX_TOKEN_REFRESH_S=str(REFRESH_S),
        AWS_ACCESS_KEY_ID=S["aws_key"],
        AWS_SECRET_ACCESS_KEY=S["aws_secret"],
        BENTOML_CONFIG_OPTIONS="api_server.logging.access.enabled=true",
        LORAPLEX_INFERENCE_TELEMETRY="1",  # the inference routes' access-log lines are swept too
    )
    server = serve_ready("serving.service:LoraplexService", server_env, tmp)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield {"server": server, "client": client, "store": store, "tmp": tmp, "env": server_env}
    client.close()
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def classify(c: httpx.Client, token: str, adapter: str = "intent") -> httpx.Response:
    return c.post(
        "/v1/classify", json={"items": [{"adapter": adapter, "text": "hello"}]}, headers=bearer(token)
    )


def wait_for_status(c: httpx.Client, token: str, adapter: str, status: int, limit: float) -> float:
    """Seconds until classify with ``token`` answers ``status`` (fails after ``limit``)."""
    start = time.monotonic()
    while (got := classify(c, token, adapter).status_code) != status:
        assert time.monotonic() - start < limit, f"still {got} after {limit}s"
        time.sleep(0.1)
    return time.monotonic() - start


# -- tenant tokens without a restart (issue 11, item 16) ------------------------------------------------
def test_tenant_tokens_are_created_rotated_and_revoked_without_a_restart(env):
    c, admin = env["client"], bearer(S["admin"])
    # Over the admin API: the token works on this replica at once.
    r = c.post("/v1/admin/tenants/acme/tokens", headers=admin)
    assert r.status_code == 201, r.text
    created = r.json()
    assert classify(c, created["token"]).status_code == 200
    listed = c.get("/v1/admin/tenants/acme/tokens", headers=admin).json()["tokens"]
    assert [t["id"] for t in listed] == [created["id"]] and set(listed[0]) == {"id", "tenant", "created_at"}
    rotated = c.post(f"/v1/admin/tenants/acme/tokens/{created['id']}/rotate", headers=admin).json()
    assert (
        classify(c, created["token"]).status_code == 401 and classify(c, rotated["token"]).status_code == 200
    )
    # Through the store, as another replica or the CLI would: seen within the refresh interval.
    registry = TenantTokenRegistry(env["store"])
    record, token = registry.create("globex")
    seen = wait_for_status(c, token, "sentiment", 200, limit=REFRESH_S + 10)
    assert classify(c, token, "sentiment").json()[0]["adapter"] == "globex/sentiment"
    registry.revoke("globex", record.id)
    gone = wait_for_status(c, token, "sentiment", 401, limit=REFRESH_S + 10)
    print(f"store token usable after {seen:.2f}s, refused after {gone:.2f}s (refresh {REFRESH_S}s)")
    assert c.delete(f"/v1/admin/tenants/acme/tokens/{rotated['id']}", headers=admin).status_code == 200
    assert classify(c, rotated["token"]).status_code == 401
    # The environment's and the tokens file's tokens keep working; a tenant cannot manage tokens.
    assert classify(c, S["acme"]).status_code == 200
    assert classify(c, S["file_tenant"], "topics").status_code == 200
    assert c.post("/v1/admin/tenants/acme/tokens", headers=bearer(S["acme"])).status_code == 403
    assert c.delete("/v1/admin/tenants/acme/tokens/nothex", headers=admin).status_code == 400


# -- /metrics (issue 11, items 6 and 10) ------------------------------------------------------------------
def test_metrics_need_the_admin_or_metrics_token(env):
    c = env["client"]
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=bearer(S["acme"])).status_code == 403
    for token in (S["metrics"], S["admin"]):
        r = c.get("/metrics", headers=bearer(token))
        assert r.status_code == 200 and "loraplex_ready 1.0" in r.text
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200


def _requests_by(text: str, tenant: str) -> float:
    found = re.findall(
        rf'loraplex_requests_total\{{route="classify",status="200",tenant="{tenant}"\}} (\S+)', text
    )
    return float(found[0]) if found else 0.0


def test_two_servers_on_one_host_keep_their_own_metrics(env, tiny_bert_dir):
    """Same BENTOML_HOME: BentoML empties its shared multiprocess folder when a server starts."""
    c, metrics = env["client"], bearer(S["metrics"])
    assert classify(c, S["globex"], "sentiment").status_code == 200
    before = c.get("/metrics", headers=metrics).text
    assert "loraplex_ready 1.0" in before and _requests_by(before, "globex") >= 1
    second = serve_ready("serving.service:LoraplexService", env["env"], env["tmp"])
    try:
        with httpx.Client(base_url=second.url, timeout=60) as c2:
            assert classify(c2, S["acme"]).status_code == 200
            theirs = c2.get("/metrics", headers=metrics).text
        ours = c.get("/metrics", headers=metrics).text
    finally:
        second.stop()
    assert "loraplex_ready 1.0" in ours and _requests_by(ours, "globex") >= _requests_by(before, "globex")
    assert "loraplex_ready 1.0" in theirs and _requests_by(theirs, "globex") == 0
    shared = Path(env["env"]["BENTOML_HOME"]) / "prometheus_multiproc_dir"
    assert not list(shared.glob("*")), "loraplex metrics must not live in BentoML's shared folder"


# -- fail fast (issue 11, item 7) -------------------------------------------------------------------------
def _bad_tokens_env(env) -> dict[str, str]:
    # The case from issue 17: one token too short next to another tenant's valid token.
    return {**env["env"], "LORAPLEX_TENANT_TOKENS": f"acme:{S['acme']},globex:{S['short']}"}


def _run(cmd: list[str], run_env: dict[str, str], timeout: float = 180) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _one_error_line(output: str, variable: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and variable in errors[0], output
    assert "Traceback" not in output and "input_value" not in output, output


def test_bentoml_serve_exits_with_one_line_on_a_settings_error(env):
    """Before the fix the worker was restarted every ~10 s forever; now the server exits 2."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:LoraplexService", "--port", port]
    rc, output, seconds = _run(cmd, _bad_tokens_env(env))
    assert rc == 2, output
    _one_error_line(output, "LORAPLEX_TENANT_TOKENS: entry 2 (tenant 'globex')")
    env.setdefault("outputs", []).append(output)


def test_loraplex_serve_checks_before_launching_bentoml(env):
    """The real command (one process: it imports torch; other errors go through it in-process below)."""
    cmd = [sys.executable, "-m", "training.cli", "serve", "--port", str(free_port())]
    rc, output, _ = _run(cmd, {**env["env"], "LORAPLEX_BASE": "nobase"})
    assert rc == 2, output
    _one_error_line(output, "LORAPLEX_BASE: base 'nobase' is not registered")
    env.setdefault("outputs", []).append(output)


# -- the sweep (issue 17) -----------------------------------------------------------------------------------
def settings_error_cases(env) -> list[dict[str, str]]:
    tmp = env["tmp"]
    broken_json = tmp / "broken-tokens.json"
    broken_json.write_text('{"admin": ["' + S["file_admin"] + '"] "tenants": {}}')  # a comma missing
    bad_hash = tmp / "bad-hash-tokens.json"
    bad_hash.write_text(json.dumps({"tenants": {"acme": [f"sha256:{S['file_tenant']}"]}}))
    broken_yaml = tmp / "broken.yaml"
    broken_yaml.write_text(f"admin_token: {S['file_admin']}: {S['file_tenant']}\n")
    short_in_file = tmp / "short.json"
    short_in_file.write_text(json.dumps({"admin_token": S["short"], "metrics_token": S["metrics"]}))
    return [
        {"LORAPLEX_TENANT_TOKENS": f"acme:{S['acme']},globex:{S['short']}"},
        {"LORAPLEX_TENANT_TOKENS": f"acme:{S['acme']},{S['globex']}"},  # an entry without a tenant
        {"LORAPLEX_TENANT_TOKENS": f"{S['globex']}:{S['acme']}"},  # a token where the tenant goes
        {"LORAPLEX_TENANT_TOKENS": f"acme:{S['acme']},globex:{S['acme']}"},  # the same token twice
        {"LORAPLEX_TENANT_TOKENS": f"acme:sha256:{S['acme']}"},
        {"LORAPLEX_ADMIN_TOKEN": S["short"]},
        {"LORAPLEX_METRICS_TOKEN": S["short"]},
        {"LORAPLEX_ADMIN_TOKEN": S["acme"]},  # admin token == a tenant's
        {"LORAPLEX_TOKENS_FILE": str(broken_json)},
        {"LORAPLEX_TOKENS_FILE": str(bad_hash)},
        {"LORAPLEX_CONFIG": str(broken_yaml)},
        {"LORAPLEX_CONFIG": str(short_in_file), "LORAPLEX_ADMIN_TOKEN": ""},
        {"LORAPLEX_INSECURE_DEV": S["unknown"]},
        {"LORAPLEX_STORE": str(tmp / "no-such-store")},
        {"LORAPLEX_BASE": "nobase"},
        {
            "LORAPLEX_ADMIN_TOKEN": "",
            "LORAPLEX_TENANT_TOKENS": "",
            "LORAPLEX_TOKENS_FILE": "",
        },  # metrics only
    ]


def _cli(monkeypatch, args: list[str], run_env: dict[str, str]) -> tuple[int, str]:
    import os

    import boto3

    def no_exec(*a):  # a case that unexpectedly passes must fail here, not replace pytest
        raise AssertionError("the start-up checks passed")

    monkeypatch.setattr(os, "execvpe", no_exec)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # credentials as a fresh process reads them
    for key in [k for k in os.environ if k.startswith(("LORAPLEX_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in run_env.items():
        if key.startswith(("LORAPLEX_", "AWS_")) and value:
            monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def locked_seaweed(tmp_path_factory):
    """A SeaweedFS that accepts one key pair only (the session's accepts any)."""
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed(
        tmp_path_factory.mktemp("seaweed-locked"), credentials=("loraplex-ok", "loraplex-ok-secret")
    )
    yield server
    server.stop()


@pytest.mark.s3
def test_s3_errors_are_one_line(env, monkeypatch, locked_seaweed):
    """Wrong endpoint, missing and wrong credentials: the CLI's ``error: ... [code]``, no traceback."""
    outputs = env.setdefault("outputs", [])
    aws = {
        "AWS_ACCESS_KEY_ID": S["aws_key"],
        "AWS_SECRET_ACCESS_KEY": S["aws_secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    closed = f"s3://bucket/prefix?endpoint=http://127.0.0.1:{free_port()}"
    locked = locked_seaweed.store_url()
    no_creds = {
        "AWS_SHARED_CREDENTIALS_FILE": str(env["tmp"] / "none"),
        "AWS_CONFIG_FILE": str(env["tmp"] / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    cases = [
        (["adapters", "list", "--store", closed], aws, "cannot connect"),
        (["serve", "--store", closed], {**env["env"], **aws}, "LORAPLEX_STORE: S3 store"),
        (["tokens", "list", "--store", locked], aws, "credentials were refused"),
        (["serve", "--store", locked], {**env["env"], **aws}, "credentials were refused"),
        (["adapters", "list", "--store", locked], no_creds, "no S3 credentials"),
    ]
    for args, run_env, needle in cases:
        rc, output = _cli(monkeypatch, args, run_env)
        assert rc == 2, output
        assert output.count("\n") == 1 and output.startswith("error:") and "[store_unavailable]" in output, (
            output
        )
        assert needle in output, output
        outputs.append(output)


def test_no_secret_in_any_output(env, monkeypatch, caplog):
    """Must run after the tests above (it also searches what they printed). Fails on the code before
    issue 17: pydantic's error showed the first characters of another tenant's token."""
    c, outputs = env["client"], list(env.get("outputs", []))
    caplog.set_level("INFO")
    # Every settings error, through `loraplex serve` (checks before launching BentoML).
    for case in settings_error_cases(env):
        rc, output = _cli(monkeypatch, ["serve", "--port", str(free_port())], {**env["env"], **case})
        assert rc == 2 and output.startswith("error:") and "Traceback" not in output, (case, output)
        outputs.append(output)
    # Every auth failure.
    attempts = [
        ("POST", "/v1/classify", {"Authorization": f"Bearer {S['unknown']}"}, 401),
        ("POST", "/v1/classify", {"Authorization": f"Basic {S['acme']}"}, 401),
        ("POST", "/v1/classify", {"Authorization": f"Bearer {S['acme']}x"}, 401),
        ("POST", "/v1/classify", {"Authorization": S["acme"]}, 401),
        ("POST", "/v1/classify", {"X-Loraplex-Tenant": S["unknown"]}, 401),
        ("POST", "/v1/classify", bearer(S["admin"]), 403),
        ("POST", "/v1/classify", bearer(S["metrics"]), 403),
        ("GET", "/v1/admin/tenants", bearer(S["acme"]), 403),
        ("GET", "/v1/admin/tenants", bearer(S["file_tenant"]), 403),
        ("GET", "/v1/admin/tenants", bearer(S["metrics"]), 403),
        ("GET", "/v1/admin/tenants", {"Authorization": f"Bearer {S['short']}"}, 401),
        ("GET", "/metrics", bearer(S["globex"]), 403),
        ("GET", "/metrics", {"Authorization": f"Bearer {S['unknown']}"}, 401),
    ]
    body = {"items": [{"adapter": "intent", "text": "hello"}]}
    for method, path, headers, status in attempts:
        r = c.request(method, path, headers=headers, json=body if method == "POST" else None)
        assert r.status_code == status, (path, headers.keys(), r.status_code, r.text)
        outputs.append(f"{r.status_code} {dict(r.headers)} {r.text}")
    # A normal session (request logging on): inference, listings, management, tokens, docs, metrics.
    created = c.post("/v1/admin/tenants/globex/tokens", headers=bearer(S["file_admin"])).json()
    session = [
        ("POST", "/v1/classify", bearer(S["acme"]), "intent"),
        ("POST", "/v1/embed", bearer(S["globex"]), None),
        ("POST", "/v1/classify", bearer(created["token"]), "sentiment"),
        ("GET", "/v1/adapters", bearer(S["acme"]), None),
        ("GET", "/v1/admin/tenants", bearer(S["admin"]), None),
        ("GET", "/v1/admin/tenants/acme/adapters/intent", bearer(S["admin"]), None),
        ("GET", "/v1/admin/tenants/globex/tokens", bearer(S["admin"]), None),
        ("GET", "/v1/admin/cache", bearer(S["admin"]), None),
        ("GET", "/metrics", bearer(S["metrics"]), None),
        ("GET", "/docs.json", {}, None),
        ("GET", "/v1/openapi.json", {}, None),
    ]
    for method, path, headers, adapter in session:
        json_body = {"items": [{"adapter": adapter, "text": "hello"}]} if method == "POST" else None
        r = c.request(method, path, headers=headers, json=json_body)
        assert r.status_code == 200, (path, r.text)
        outputs.append(f"{r.status_code} {dict(r.headers)} {r.text}")
    c.delete(f"/v1/admin/tenants/globex/tokens/{created['id']}", headers=bearer(S["admin"]))
    time.sleep(1.0)  # let the access log reach the file
    log = env["server"].log_tail(10_000_000)
    assert "/v1/classify" in log, "request logging must be on for this sweep"
    outputs += [log, caplog.text]
    found = {i: leaks(text) for i, text in enumerate(outputs) if leaks(text)}
    assert not found, {i: (pieces, outputs[i][:2000]) for i, pieces in found.items()}
    # A created token appears once, in the response that created it, and never in the log.
    assert created["token"] not in log
