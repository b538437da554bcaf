"""Alias resolution races and text length limits."""

from __future__ import annotations

import threading
import time

import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from serving.engine.resolver import AliasResolver
from tests.test_engine_support import head_bundle

torch.set_num_threads(1)


class _SlowResolve:
    """The first resolve reads the store, then waits until released (a slow store read)."""

    def __init__(self, store):
        self.store, self.entered, self.release, self.first = store, threading.Event(), threading.Event(), True

    def resolve(self, ref):
        manifest = self.store.resolve(ref)
        if self.first:
            self.first = False
            self.entered.set()
            self.release.wait(10)
        return manifest


def test_forget_during_an_in_flight_resolve_is_not_undone(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    for seed in (1, 2):
        store.put(head_bundle(base, "acme", "h", seed, ["a", "b"])[0])
    store.set_alias("acme", "h", "production", 1)
    slow = _SlowResolve(store)
    resolver = AliasResolver(slow, ttl_s=60.0)
    got = {}
    reader = threading.Thread(
        target=lambda: got.setdefault("v", resolver.resolve("acme", "h").manifest.version)
    )
    reader.start()
    assert slow.entered.wait(10)
    store.set_alias("acme", "h", "production", 2)
    resolver.forget("acme", "h")
    slow.release.set()
    reader.join(10)
    assert got["v"] == 1  # the in-flight request keeps what it read...
    assert resolver.resolve("acme", "h").manifest.version == 2  # ...but it is not cached past the forget


def test_text_longer_than_the_position_table_is_cut_not_failed(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(head_bundle(base, "acme", "h", 1, ["a", "b"])[0])
    engine = Engine(store, base="tiny", settings=EngineSettings(max_seq_len=512, threads=1))  # tiny base: 128
    res = engine.infer([InferenceItem("acme", "h", "classify", text="refund my order " * 200)])
    assert isinstance(res[0], InferenceResult), res[0]


def test_an_expired_answer_for_the_same_version_keeps_its_digest_and_a_new_version_gets_its_own(
    tmp_path, tiny_bert_dir, monkeypatch
):
    from adapters_store.bundle import AdapterManifest

    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(head_bundle(base, "acme", "h", 1, ["a", "b"])[0])
    store.set_alias("acme", "h", "production", 1)
    hashed = []
    digest = AdapterManifest.digest.fget
    monkeypatch.setattr(AdapterManifest, "digest", property(lambda m: hashed.append(m.version) or digest(m)))
    resolver = AliasResolver(store, ttl_s=0.001)
    first = resolver.resolve("acme", "h")
    for _ in range(3):
        time.sleep(0.005)  # the answer expires: the store is read again, the manifest is not re-hashed
        again = resolver.resolve("acme", "h")
        assert again.digest == first.digest and again.manifest.version == 1
    assert hashed == [1]
    store.put(head_bundle(base, "acme", "h", 2, ["a", "b"])[0])
    store.set_alias("acme", "h", "production", 2)
    time.sleep(0.005)
    moved = resolver.resolve("acme", "h")
    assert moved.manifest.version == 2 and moved.digest == digest(moved.manifest) != first.digest
    assert hashed == [1, 2]
