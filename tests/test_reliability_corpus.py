"""The bad-input corpus (tests/reliability_corpus.py) against one real ``bentoml serve``.

Every case must get its specific 4xx with an ``{"error", "message"}`` body, never a 5xx; the server
stays ready and keeps the same processes; the canary a pickle would create never appears; no file
outside the store changes (symlinks planted in the store included). Oversized bodies (lying
``Content-Length``, chunked with no length) are refused while streaming, without being buffered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapters_store import open_store
from tests.helpers.bundles import head_bundle, save_peft_lora
from tests.helpers.models import make_tiny_bert
from tests.reliability_corpus import CorpusInputs, build_corpus, plant_symlinks
from tests.reliability_support import (
    proc_status,
    process_tree,
    raw_request,
    record,
    send_case,
    serving_worker,
    stream_until_answer,
    token_header,
    tree_snapshot,
)
from tests.service_support import seeded_store, serve_ready, service_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UPLOAD_LIMIT = 4 << 20
BODY_LIMIT = 65536
LIMITS = {
    "LORAPLEX_MAX_BODY_BYTES": str(BODY_LIMIT),
    "LORAPLEX_MAX_INPUTS": "16",
    "LORAPLEX_MAX_CHARS": "2000",
    "LORAPLEX_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
}


def corpus_inputs(tmp: Path, base_dir: Path, store) -> CorpusInputs:
    peft = save_peft_lora(base_dir, tmp / "peft-valid", seed=7)
    wide = make_tiny_bert(tmp / "wide-base", hidden=64)
    other = save_peft_lora(wide, tmp / "peft-wide", seed=8)
    head = head_bundle(store.get_base("tiny"), tenant="acme", name="newhead", seed=9)
    return CorpusInputs(
        peft_config=(peft / "adapter_config.json").read_bytes(),
        peft_weights=(peft / "adapter_model.safetensors").read_bytes(),
        head_files={"manifest.json": head.manifest.to_json(), **head.files},
        other_peft_weights=(other / "adapter_model.safetensors").read_bytes(),
        canary=tmp / "canary-made-by-unpickling",
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("rel-corpus")
    store_root = tmp / "store"
    store = seeded_store(store_root, tiny_bert_dir, tmp)
    inputs = corpus_inputs(tmp, tiny_bert_dir, store)
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("must never change")
    plant_symlinks(store_root, outside, store.resolve("acme/intent@1").to_json())
    server = serve_ready("serving.service:LoraplexService", service_env(str(store_root), tmp, **LIMITS), tmp)
    skip = (store_root, tmp / "bentoml-home")
    before = tree_snapshot(tmp, skip)
    pids = process_tree(server.proc.pid)
    yield {"server": server, "store": open_store(store_root), "inputs": inputs, "tmp": tmp, "skip": skip}
    try:
        assert process_tree(server.proc.pid) == pids, "server processes changed (a crash or restart)"
        assert tree_snapshot(tmp, skip) == before, "a file outside the store changed"
        assert not inputs.canary.exists(), "a pickle was unpickled"
    finally:
        server.stop()


def check_answer(case, resp) -> str | None:
    """None if the answer is right, else what is wrong."""
    if resp.status not in case.expect:
        return f"status {resp.status}, expected {sorted(case.expect)}: {resp.body[:300]!r}"
    if case.protocol and resp.status == 400:
        return None  # refused by the HTTP parser before any route: plain text is all it can say
    try:
        body = resp.json()
    except ValueError:
        return f"status {resp.status} with a non-JSON body {resp.body[:200]!r}"
    if not (isinstance(body, dict) and set(body) == {"error", "message"} and body["message"]):
        return f"error body is not {{error, message}}: {resp.body[:300]!r}"
    if case.error_code and body["error"] != case.error_code:
        return f"error code {body['error']!r}, expected {case.error_code!r}"
    return None


def test_corpus_every_case_gets_its_4xx(env):
    server, inputs = env["server"], env["inputs"]
    cases = build_corpus(inputs)
    assert len(cases) >= 200
    failures = []
    for case in cases:
        try:
            resp = send_case(server.port, case)
        except (ConnectionError, OSError) as e:
            failures.append(f"{case.id}: no answer ({e})")
            continue
        problem = check_answer(case, resp)
        if problem:
            failures.append(f"{case.id}: {problem}")
        if server.proc.poll() is not None:
            pytest.fail(f"server died on {case.id}:\n{server.log_tail()}")
    groups = sorted({c.group for c in cases})
    record("corpus_cases", len(cases), "cases", f"{len(failures)} wrong answers; groups: {', '.join(groups)}")
    ready = raw_request(server.port, "GET", "/readyz", {})
    assert ready.status == 200
    assert not inputs.canary.exists(), "a pickle was unpickled"
    assert not failures, f"{len(failures)}/{len(cases)} corpus cases failed:\n" + "\n".join(failures)


def _classify(port: int, tenant: str, adapter: str):
    body = json.dumps({"items": [{"adapter": adapter, "text": "x"}]}).encode()
    headers = {**token_header(tenant), "Content-Type": "application/json"}
    return raw_request(port, "POST", "/v1/classify", headers, body)


@pytest.mark.parametrize(
    "foreign, missing",
    [("sentiment", "nosuch"), ("topics@1", "nosuch@1"), ("sentiment@production", "nosuch@production")],
)
def test_cross_tenant_404_is_indistinguishable_from_missing(env, foreign, missing):
    port = env["server"].port
    a, b = _classify(port, "acme", foreign), _classify(port, "acme", missing)
    assert a.status == b.status == 404
    norm = lambda r, name: re.sub(re.escape(name.split("@")[0]), "<name>", r.json()["message"])  # noqa: E731
    assert norm(a, foreign) == norm(b, missing)
    assert "globex" not in a.body.decode() and "initech" not in a.body.decode()


@pytest.mark.parametrize("route", ["upload", "classify"])
def test_lying_content_length_refused_before_reading(env, route):
    server = env["server"]
    path = "/v1/admin/tenants/acme/adapters/big/versions" if route == "upload" else "/v1/classify"
    tok = "admin" if route == "upload" else "acme"
    ctype = "multipart/form-data; boundary=zzz" if route == "upload" else "application/json"
    headers = {**token_header(tok), "Content-Type": ctype}
    r = stream_until_answer(
        server.port, path, headers, b"x" * 1024, total=64 << 10, chunked=False, declared_length=10 << 30
    )
    assert r.status == 413 and r.bytes_sent <= 64 << 10 and r.seconds < 10


@pytest.mark.parametrize("route", ["upload", "classify"])
def test_chunked_body_without_length_cut_at_limit(env, route):
    server = env["server"]
    worker = serving_worker(server.proc.pid)
    rss0 = proc_status(worker)["VmRSS"]
    upload = route == "upload"
    path = "/v1/admin/tenants/acme/adapters/big/versions" if upload else "/v1/classify"
    ctype = "multipart/form-data; boundary=zzz" if upload else "application/json"
    headers = {**token_header("admin" if upload else "acme"), "Content-Type": ctype}
    limit = UPLOAD_LIMIT if upload else BODY_LIMIT
    prefix = (
        b'--zzz\r\nContent-Disposition: form-data; name="files"; filename="a.json"\r\n\r\n' if upload else b""
    )
    total = 128 << 20
    r = stream_until_answer(server.port, path, headers, b"y" * (64 << 10), total=total, prefix=prefix)
    grown_mb = (proc_status(worker)["VmRSS"] - rss0) / 1024
    assert r.status == 413, r
    record(f"chunked_413_{route}", round(r.bytes_sent / (1 << 20), 2), "MiB sent",
           f"limit {limit / (1 << 20):.2f} MiB, worker RSS +{grown_mb:.0f} MB, of {total >> 20} MiB offered")  # fmt: skip
    # Answered long before the whole body: at the limit plus what the socket buffers held.
    assert r.bytes_sent < limit + (16 << 20) and r.bytes_sent < total // 4, r
    assert grown_mb < 64, f"worker RSS grew {grown_mb:.0f} MB while refusing a streamed body"
