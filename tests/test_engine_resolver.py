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


def _reads(store, monkeypatch) -> list[int]:
    """Versions whose manifest ``store`` reads from now on."""
    seen: list[int] = []
    real = store._manifest
    monkeypatch.setattr(store, "_manifest", lambda t, n, v: seen.append(v) or real(t, n, v))
    return seen


def test_an_expired_answer_rechecks_the_alias_only_and_notices_another_process_promoting(
    tmp_path, tiny_bert_dir, monkeypatch
):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    for seed in (1, 2, 3):
        store.put(head_bundle(base, "acme", "h", seed, ["a", "b"])[0])
    store.set_alias("acme", "h", "production", 1)
    other = open_store(tmp_path / "store")  # another replica / the CLI: no forget() reaches us
    resolver = AliasResolver(store, ttl_s=0.001)
    reads = _reads(store, monkeypatch)
    for adapter in ("h", "h@production", "h@latest"):
        resolver.resolve("acme", adapter)
    assert reads == [1, 1, 3]
    for _ in range(3):
        time.sleep(0.005)  # expired, same version: the alias (or the listing) is read, no manifest
        assert [resolver.resolve("acme", a).manifest.version for a in ("h", "h@production", "h@latest")] == [
            1,
            1,
            3,
        ]
    assert reads == [1, 1, 3]
    other.set_alias("acme", "h", "production", 2)  # promote
    other.put(head_bundle(base, "acme", "h", 4, ["a", "b"])[0])  # a new latest
    time.sleep(0.005)
    moved = [resolver.resolve("acme", a) for a in ("h", "h@production", "h@latest")]
    assert [r.manifest.version for r in moved] == [2, 2, 4]
    assert moved[0].digest == other.resolve("acme/h@2").digest
    other.set_alias("acme", "h", "production", 1)  # rollback
    time.sleep(0.005)
    assert resolver.resolve("acme", "h").manifest.version == 1
    other.delete_version("acme", "h", 1, force=True)  # the alias goes with it: 'h' falls back to latest
    time.sleep(0.005)
    assert resolver.resolve("acme", "h").manifest.version == 4


def test_the_manifest_is_read_in_full_at_least_every_full_recheck_s(tmp_path, tiny_bert_dir, monkeypatch):
    """A store replaced under a running server starts its numbers at 1 again: the alias check alone
    cannot tell its v1 from the old v1, the periodic full read does (by the manifest's whole content:
    the new v1 here even carries the old one's creation time, which is stamped to the second)."""
    import dataclasses
    import shutil
    import types

    from serving.engine import resolver as resolver_module

    clock = [1000.0]
    monkeypatch.setattr(resolver_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    root = tmp_path / "store"
    store = open_store(root)
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(head_bundle(base, "acme", "h", 1, ["a", "b"])[0])
    resolver = AliasResolver(store, ttl_s=1.0)
    first = resolver.resolve("acme", "h")
    shutil.rmtree(root / "tenants")
    replaced = head_bundle(base, "acme", "h", 2, ["a", "b"])[0]  # version 1 again, other weights,
    stamp = {"created_at": first.manifest.created_at}  # put within the same second as the old v1
    store.put(dataclasses.replace(replaced, manifest=replaced.manifest.model_copy(update=stamp)))
    clock[0] += 2.0  # expired, within FULL_RECHECK_S: the alias check alone keeps the old answer
    assert resolver.resolve("acme", "h").digest == first.digest
    clock[0] += resolver_module.FULL_RECHECK_S
    again = resolver.resolve("acme", "h")
    assert again.manifest.version == 1 and again.digest == store.resolve("acme/h").digest != first.digest
