"""Two ``bentoml serve`` replicas sharing one S3 store (a real SeaweedFS server).

An adapter registered through replica 1 is served by replica 2; an alias moved through replica 1 is
followed by replica 2 within the documented bound: ``LORAPLEX_ALIAS_TTL_S`` (alias resolutions are
cached at most that long) plus one request.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.helpers.bundles import save_peft_lora
from tests.service_support import ADMIN, seeded_store, serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.s3, pytest.mark.slow]

TTL_S = 1.0


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """SeaweedFS as in tests/helpers/seaweed.py, but with its fixed-port extras (Lance namespace on 9101,
    Iceberg catalog on 8181) turned off: with those on, a second weed server on the machine dies at start."""
    from tests.helpers import seaweed as sw

    workdir = tmp_path_factory.mktemp("replicas-weed")
    sw.s3_env()
    taken: set[int] = set()
    ports = {}
    for role in ("s3", "master", "volume", "filer"):
        ports[role] = sw.free_port_pair(taken)
        taken |= {ports[role], ports[role] + 10000}
    (workdir / "data").mkdir()
    cmd = [
        sw.weed_binary(),
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={ports['s3']}",
        "-s3.port.lance=0",
        "-s3.port.iceberg=0",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-volume.max=32",
        "-master.volumeSizeLimitMB=64",
    ]
    log_path = workdir / "weed.log"
    proc = subprocess.Popen(
        cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    server = sw.SeaweedServer(f"http://127.0.0.1:{ports['s3']}", proc, log_path)
    try:
        sw._wait_ready(server, 60.0)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_bert_dir, s3_server):
    tmp = tmp_path_factory.mktemp("e2e-replicas")
    url = s3_server.store_url()
    seeded_store(url, tiny_bert_dir, tmp, ensure_bucket=True)
    env = service_env(url, tmp, LORAPLEX_ALIAS_TTL_S=str(TTL_S))
    servers = []
    try:
        for i in range(2):
            servers.append(serve_ready("serving.service:LoraplexService", env, tmp / f"r{i}"))
        yield servers, tmp, tiny_bert_dir
    finally:
        for s in servers:
            s.stop()


def classify(url: str, tenant: str, adapter: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify",
        json={"items": [{"adapter": adapter, "text": "where is my parcel"}]},
        headers=tenant_auth(tenant),
        timeout=30,
    )


def until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (polling every 50 ms); fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not true within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_registered_on_replica_1_served_by_replica_2(replicas):
    (r1, r2), tmp, base_dir = replicas
    folder = save_peft_lora(base_dir, tmp / "peft-new", num_labels=2, seed=31)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    up = httpx.post(
        f"{r1.url}/v1/admin/tenants/globex/adapters/churn/versions",
        files=files,
        data={"labels": "stay,leave"},
        headers=ADMIN,
        timeout=60,
    )
    assert up.status_code == 201, up.text
    digest = up.json()["digest"]
    # Never seen by replica 2 before: nothing cached there, so it is served on the first request.
    answer = classify(r2.url, "globex", "churn")
    assert answer.status_code == 200 and answer.json()[0]["digest"] == digest


def test_alias_moved_on_replica_1_is_followed_by_replica_2_within_the_ttl(replicas):
    (r1, r2), _, _ = replicas
    assert classify(r2.url, "acme", "intent").json()[0]["version"] == 1  # production -> 1, now cached
    moved = httpx.put(
        f"{r1.url}/v1/admin/tenants/acme/adapters/intent/aliases/production",
        json={"version": 2},
        headers=ADMIN,
        timeout=30,
    )
    assert moved.status_code == 200
    assert classify(r1.url, "acme", "intent").json()[0]["version"] == 2  # replica 1: at once
    lag = until(lambda: classify(r2.url, "acme", "intent").json()[0]["version"] == 2, timeout=TTL_S + 5)
    assert lag <= TTL_S + 1.0, f"replica 2 followed after {lag:.2f}s"


def test_delete_on_replica_1_reaches_replica_2(replicas):
    (r1, r2), _, _ = replicas
    assert classify(r2.url, "initech", "topics").status_code == 200
    assert (
        httpx.delete(
            f"{r1.url}/v1/admin/tenants/initech/adapters/topics", headers=ADMIN, timeout=30
        ).status_code
        == 200
    )
    until(lambda: classify(r2.url, "initech", "topics").status_code == 404, timeout=TTL_S + 5)
