"""Cache policy (LRU, byte budget, pins, leases, load-before-evict) and the engine's use of it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from serving.engine.cache import AdapterCache
from tests.test_engine_support import head_bundle

torch.set_num_threads(1)


def _loader(value, nbytes, log=None):
    def load():
        if log is not None:
            log.append(value)
        return value, nbytes

    return load


def _fill(cache, keys, nbytes=10):
    for k in keys:
        cache.acquire(k, ("t", k), _loader(k, nbytes)).release()


def test_lru_evicts_least_recently_used_within_byte_budget():
    cache = AdapterCache(max_bytes=30)
    _fill(cache, "abc")
    cache.acquire("a", ("t", "a"), _loader("a", 10)).release()  # a is now most recent
    _fill(cache, "d")
    assert "b" not in cache and all(k in cache for k in "acd")
    s = cache.stats()
    assert (s["hits"], s["misses"], s["loads"], s["evictions"], s["bytes_used"]) == (1, 4, 4, 1, 30)


def test_pinned_owners_are_never_evicted():
    cache = AdapterCache(max_bytes=20, pins=["t/a"])
    _fill(cache, "abcd")
    assert "a" in cache and "d" in cache and "b" not in cache
    cache.unpin("t/a")
    _fill(cache, "e")
    assert "a" not in cache


def test_leased_entry_survives_and_budget_is_restored_on_release():
    cache = AdapterCache(max_bytes=10)
    held = cache.acquire("a", ("t", "a"), _loader("a", 10))
    lease_b = cache.acquire("b", ("t", "b"), _loader("b", 10))  # nothing evictable: admitted over budget
    assert "a" in cache and "b" in cache and cache.stats()["bytes_used"] == 20
    assert held.value == "a"
    held.release()
    assert "a" not in cache and cache.stats()["bytes_used"] == 10
    lease_b.release()
    lease_b.release()  # idempotent
    assert cache.stats()["leased"] == 0


def test_failed_load_evicts_nothing():
    cache = AdapterCache(max_bytes=10)
    _fill(cache, "a")

    def bad():
        raise ValueError("corrupt")

    with pytest.raises(ValueError):
        cache.acquire("b", ("t", "b"), bad)
    assert "a" in cache and cache.stats()["load_failures"] == 1 and cache.stats()["evictions"] == 0


def test_concurrent_misses_load_once():
    cache = AdapterCache(max_bytes=100)
    log: list[str] = []
    gate = threading.Event()

    def slow():
        gate.wait(2)
        log.append("x")
        return "x", 1

    leases = []
    threads = [
        threading.Thread(target=lambda: leases.append(cache.acquire("x", ("t", "x"), slow))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert log == ["x"] and len(leases) == 4 and all(le.value == "x" for le in leases)
    assert cache.stats()["leased"] == 1
    for le in leases:
        le.release()
    assert cache.stats()["leased"] == 0


def test_invalidate_while_leased_then_reload_keeps_counts_apart():
    cache = AdapterCache(max_bytes=100)
    old = cache.acquire("a", ("t", "a"), _loader("old", 10))
    assert cache.invalidate(lambda owner, _value: owner == ("t", "a")) == 1
    new = cache.acquire("a", ("t", "a"), _loader("new", 10))
    assert old.value == "old" and new.value == "new"
    old.release()  # must not release the new entry's lease
    assert cache.stats()["leased"] == 1
    new.release()


def test_entry_count_bound():
    cache = AdapterCache(max_bytes=1 << 40, max_entries=1)
    _fill(cache, "ab")
    assert "a" not in cache and "b" in cache


# -- engine-level -----------------------------------------------------------------------------------
@pytest.fixture()
def head_store(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    return store, base


def test_repush_under_alias_serves_new_version_after_ttl(head_store):
    store, base = head_store
    store.put(head_bundle(base, "acme", "intent", 1, ["a", "b"])[0])
    store.set_alias("acme", "intent", "production", 1)
    engine = Engine(store, base="tiny", settings=EngineSettings(alias_ttl_s=0.3, threads=1))
    item = InferenceItem("acme", "intent", "classify", text="hello there")
    [r1] = engine.infer([item])
    v2 = store.put(head_bundle(base, "acme", "intent", 2, ["a", "b"])[0])
    store.set_alias("acme", "intent", "production", v2.version)
    [r_cached] = engine.infer([item])
    assert (r_cached.version, r_cached.digest) == (1, r1.digest)  # within the TTL
    time.sleep(0.35)
    [r2] = engine.infer([item])
    assert (r2.version, r2.digest) == (2, v2.digest) and r2.digest != r1.digest
    assert r2.logits != r1.logits
    [r_pinned_version] = engine.infer([InferenceItem("acme", "intent@1", "classify", text="hello there")])
    assert r_pinned_version.logits == r1.logits
    assert engine.cache_stats()["loads"] == 2


def test_without_at_production_wins_over_latest(head_store):
    store, base = head_store
    store.put(head_bundle(base, "acme", "intent", 1, ["a", "b"])[0])
    store.put(head_bundle(base, "acme", "intent", 2, ["a", "b"])[0])
    engine = Engine(store, base="tiny", settings=EngineSettings(alias_ttl_s=0.0, threads=1))
    item = InferenceItem("acme", "intent", "classify", text="hi")
    assert engine.infer([item])[0].version == 2  # no production alias yet: latest
    store.set_alias("acme", "intent", "production", 1)
    assert engine.infer([item])[0].version == 1
    assert engine.infer([InferenceItem("acme", "intent@latest", "classify", text="hi")])[0].version == 2


def test_budget_pins_invalidate_and_stats(head_store):
    store, base = head_store
    for i in range(4):
        store.put(head_bundle(base, f"t{i}", "h", i, ["a", "b"])[0])
    one = 2 * 32 * 4 + 2 * 4  # a 2-label head on 32 features, fp32
    engine = Engine(store, base="tiny", settings=EngineSettings(cache_bytes=2 * one, pins=("t0",), threads=1))
    for i in range(4):
        engine.infer([InferenceItem(f"t{i}", "h", "classify", text="x")])
    stats = engine.cache_stats()
    assert (stats["entries"], stats["bytes_used"], stats["pinned"], stats["evictions"]) == (2, 2 * one, 1, 2)
    assert stats["load_time_s"] > 0 and stats["misses"] == 4
    engine.infer([InferenceItem("t0", "h", "classify", text="x")])
    assert engine.cache_stats()["hits"] == 1
    assert engine.invalidate("t0") == 1
    assert engine.cache_stats()["entries"] == 1
    manifest = engine.warm("t1/h@1")
    assert manifest.version == 1 and engine.cache_stats()["entries"] == 2


def test_concurrent_infer_with_evictions_answers_every_row_correctly(head_store):
    store, base = head_store
    for i in range(6):
        store.put(head_bundle(base, f"t{i}", "h", i, ["a", "b"])[0])
    engine = Engine(store, base="tiny", settings=EngineSettings(cache_bytes=600, threads=1))
    expected = {
        i: engine.infer([InferenceItem(f"t{i}", "h", "classify", text="same text")])[0].logits
        for i in range(6)
    }
    errors: list[str] = []

    def worker(seed: int):
        for k in range(8):
            ids = [(seed + k + j) % 6 for j in range(3)]
            res = engine.infer([InferenceItem(f"t{i}", "h", "classify", text="same text") for i in ids])
            for i, r in zip(ids, res, strict=True):
                if (
                    not isinstance(r, InferenceResult)
                    or max(abs(a - b) for a, b in zip(r.logits, expected[i], strict=True)) > 1e-5
                ):
                    errors.append(f"t{i}: {r}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = engine.cache_stats()
    assert stats["evictions"] > 0 and stats["leased"] == 0 and stats["bytes_used"] <= 600


def test_register_and_alias_moves_keep_loaded_versions_deletes_free_them(head_store):
    """Finding 12: every admin change used to drop the adapter's loaded versions, so under churn each
    request cold-loaded. Versions are content-addressed: only a delete needs to free anything."""
    store, base = head_store
    store.put(head_bundle(base, "acme", "intent", 1, ["a", "b"])[0])
    engine = Engine(store, base="tiny", settings=EngineSettings(alias_ttl_s=60.0, threads=1))
    item = InferenceItem("acme", "intent", "classify", text="hi")
    assert engine.infer([item])[0].version == 1
    store.put(head_bundle(base, "acme", "intent", 2, ["a", "b"])[0])
    engine.forget_resolutions("acme", "intent")  # what the register route does
    assert engine.infer([item])[0].version == 2
    store.set_alias("acme", "intent", "production", 1)
    engine.forget_resolutions("acme", "intent")
    assert engine.infer([item])[0].version == 1
    stats = engine.cache_stats()
    assert (stats["loads"], stats["entries"], stats["hits"]) == (2, 2, 1)  # v1 came back from the cache
    store.delete_version("acme", "intent", 1, force=True)
    assert engine.invalidate("acme", "intent", version=1) == 1
    assert engine.infer([item])[0].version == 2  # production went with v1: latest answers
    assert engine.cache_stats()["entries"] == 1 and engine.cache_stats()["loads"] == 2
