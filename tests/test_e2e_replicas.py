"""Two ``bentoml serve`` replicas sharing one S3 store (a real SeaweedFS server).

An adapter registered through replica 1 is served by replica 2; an alias moved through replica 1 is
followed by replica 2 within the documented bound: ``LORAPLEX_ALIAS_TTL_S`` (alias resolutions are
cached at most that long) plus one request.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers.bundles import save_peft_lora
from tests.service_support import ADMIN, seeded_store, serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.s3, pytest.mark.slow]

TTL_S = 1.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_bert_dir, seaweed):
    tmp = tmp_path_factory.mktemp("e2e-replicas")
    url = seaweed.store_url()
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
        json={"items": [{"adapter": adapter, "text": "where is my parcel"}], "include": ["digest"]},
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
