"""The S3 store goes down under a running replica (a real SeaweedFS server, SIGKILLed, then restarted).

Warm tenants keep being served from the replica's cache -- also after their alias TTL has lapsed --,
a tenant never loaded gets 503 with ``Retry-After``, an upload is refused with 503 and stores nothing,
and once S3 is back everything is served again without a restart of the replica.
"""

from __future__ import annotations

import time

import httpx
import pytest

from adapters_store.errors import StoreUnavailable
from serving.engine.resolver import STORE_RETRY_S
from tests.helpers.bundles import save_peft_lora
from tests.service_support import ADMIN, seeded_store, serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.s3]

TTL_S = 0.5


def classify(url: str, tenant: str, adapter: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify",
        json={"items": [{"adapter": adapter, "text": "where is my parcel"}], "include": ["digest"]},
        headers=tenant_auth(tenant),
        timeout=60,
    )


@pytest.fixture(scope="module")
def own_seaweed(tmp_path_factory):
    """A server of this module's own: it is killed, which the session's shared one must never be."""
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed-outage"))
    yield server
    server.kill()


def test_s3_store_unreachable_is_store_unavailable(own_seaweed, tmp_path, tiny_bert_dir):
    store = seeded_store(own_seaweed.store_url(), tiny_bert_dir, tmp_path, ensure_bucket=True)
    own_seaweed.kill()
    with pytest.raises(StoreUnavailable):
        store.resolve("acme/intent@production")
    own_seaweed.restart()
    assert store.resolve("acme/intent@production").version == 1


def test_outage_warm_served_cold_503_then_recovers(own_seaweed, tmp_path, tiny_bert_dir):
    url = own_seaweed.store_url()
    store = seeded_store(url, tiny_bert_dir, tmp_path, ensure_bucket=True)
    server = serve_ready(
        "serving.service:LoraplexService",
        service_env(url, tmp_path, LORAPLEX_ALIAS_TTL_S=str(TTL_S)),
        tmp_path,
    )
    try:
        warm = classify(server.url, "acme", "intent")
        assert warm.status_code == 200, warm.text
        before = store.version_numbers("acme", "intent")

        own_seaweed.kill()
        time.sleep(TTL_S * 2)  # the warm tenant's alias answer is now expired: it must still be served
        for _ in range(3):
            again = classify(server.url, "acme", "intent")
            assert again.status_code == 200, again.text
            assert again.json()[0]["digest"] == warm.json()[0]["digest"]
        cold = classify(server.url, "globex", "sentiment")
        assert cold.status_code == 503, cold.text
        assert cold.headers["retry-after"].isdigit() and int(cold.headers["retry-after"]) > 0
        assert cold.json()["error"] == "store_unavailable", cold.text
        folder = save_peft_lora(tiny_bert_dir, tmp_path / "peft-new", num_labels=2, seed=7)
        upload = httpx.post(
            f"{server.url}/v1/admin/tenants/acme/adapters/intent/versions",
            files=[("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())],
            data={"labels": "a,b", "alias": "production"},
            headers=ADMIN,
            timeout=60,
        )
        assert upload.status_code == 503 and "retry-after" in upload.headers, upload.text
        promote = httpx.put(
            f"{server.url}/v1/admin/tenants/acme/adapters/intent/aliases/production",
            json={"version": 2},
            headers=ADMIN,
            timeout=60,
        )
        assert promote.status_code == 503 and "retry-after" in promote.headers, promote.text
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200  # the replica stays in

        own_seaweed.restart()
        back = time.monotonic()
        # The replica asks the store again at most STORE_RETRY_S after its last failure.
        while (recovered := classify(server.url, "globex", "sentiment")).status_code != 200:
            assert recovered.status_code == 503, recovered.text
            assert time.monotonic() - back < STORE_RETRY_S + 10, "did not recover"
            time.sleep(0.5)
        # Nothing the outage refused was half-done: production still points at version 1.
        assert store.resolve("acme/intent@production").version == 1
        assert store.version_numbers("acme", "intent") == before
        assert all(store.verify(f"acme/intent@{v}") for v in before)
    finally:
        server.stop()
