"""Per-adapter residency: which adapter versions a replica holds, for adapter-aware routing.

``Engine.resident()`` lists them; ``metrics.publish_residency`` exports them as
``loraplex_adapter_resident_bytes{tenant,adapter,version}`` only when /metrics is token-protected.
"""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from serving import metrics
from serving.auth import TokenBook
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.engine.cache import AdapterCache
from serving.gateway import GatewayMiddleware, GatewayState
from tests.service_support import seeded_store


def _value(tenant: str, adapter: str, version: int) -> float | None:
    return REGISTRY.get_sample_value(
        "loraplex_adapter_resident_bytes", {"tenant": tenant, "adapter": adapter, "version": str(version)}
    )


def test_engine_lists_the_adapters_it_holds(tmp_path, tiny_bert_dir):
    store = seeded_store(tmp_path / "store", tiny_bert_dir, tmp_path)
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    assert engine.resident() == []
    answers = engine.infer(
        [
            InferenceItem(tenant="acme", adapter="intent", task="classify", text="hi"),
            InferenceItem(tenant="globex", adapter="sentiment", task="classify", text="hi"),
        ]
    )
    assert all(not isinstance(a, Exception) for a in answers), answers
    resident = {(r["tenant"], r["name"], r["version"]): r for r in engine.resident()}
    assert set(resident) == {("acme", "intent", 1), ("globex", "sentiment", 1)}
    assert resident[("acme", "intent", 1)]["digest"] == store.resolve("acme/intent@1").digest
    assert all(r["bytes"] > 0 for r in resident.values())


def test_residency_gauge_only_when_metrics_are_protected_and_evictions_drop_to_zero():
    one = {"tenant": "t-res", "name": "a", "version": 1, "digest": "d1", "bytes": 1234}
    two = {"tenant": "t-res", "name": "b", "version": 4, "digest": "d2", "bytes": 99}
    metrics.publish_residency([one], protected=False)
    assert _value("t-res", "a", 1) is None  # public /metrics: tenant names never appear
    metrics.publish_residency([one, two], protected=True)
    assert (_value("t-res", "a", 1), _value("t-res", "b", 4)) == (1234.0, 99.0)
    metrics.publish_residency([two], protected=True)  # "a" evicted
    assert (_value("t-res", "a", 1), _value("t-res", "b", 4)) == (0.0, 99.0)


def test_metrics_scrape_publishes_residency_through_the_gateway():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(msg):
        return None

    resident = [{"tenant": "t-scrape", "name": "x", "version": 2, "digest": "d", "bytes": 7}]
    books = TokenBook(["admin-secret-123"], {})
    scope = {"type": "http", "path": "/metrics", "headers": [(b"authorization", b"Bearer admin-secret-123")]}
    public = GatewayState(tokens=books, resident=lambda: resident, metrics_public=True)
    asyncio.run(GatewayMiddleware(app, public)(scope, None, noop))
    assert _value("t-scrape", "x", 2) is None  # a public /metrics never names tenants
    protected = GatewayState(tokens=books, resident=lambda: resident, metrics_public=False)
    asyncio.run(GatewayMiddleware(app, protected)(scope, None, noop))
    assert _value("t-scrape", "x", 2) == 7.0


def test_cache_lists_resident_entries_least_recently_used_first():
    cache = AdapterCache(max_bytes=100)
    for i in range(3):
        cache.acquire(f"d{i}", ("acme", f"a{i}"), lambda i=i: (f"v{i}", 40)).release()
    # 120 bytes > 100: the least recently used entry was evicted
    assert cache.resident() == [(("acme", "a1"), "v1", 40), (("acme", "a2"), "v2", 40)]
