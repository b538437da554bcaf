"""Races and limits inside the engine, checked in-process (fast, no server).

- an alias resolution that was already reading the store when ``forget()`` ran must not be cached
  afterwards (else the replica serves the old version for a whole TTL after a promote);
- texts longer than the base's position table are cut to what the base takes (no 500).
"""

from __future__ import annotations

import threading

import pytest

from adapters_store import describe_base, open_store
from adapters_store.names import AdapterRef
from serving.engine.resolver import AliasResolver
from tests.helpers.bundles import head_bundle


class SlowStore:
    """Wraps a store; the first resolve of a selector waits until released (a slow S3 read)."""

    def __init__(self, store):
        self.store = store
        self.entered, self.release = threading.Event(), threading.Event()
        self.block = True

    def resolve(self, ref: AdapterRef):
        manifest = self.store.resolve(ref)  # read before the change...
        if self.block:
            self.block = False
            self.entered.set()
            self.release.wait(10)  # ...and returned after it
        return manifest


@pytest.fixture()
def store(tmp_path, tiny_bert_dir):
    s = open_store(tmp_path / "store")
    base = s.register_base(describe_base("tiny", tiny_bert_dir))
    for seed in (1, 2):
        s.put(head_bundle(base, tenant="acme", name="h", seed=seed))
    s.set_alias("acme", "h", "production", 1)
    return s


def test_forget_during_a_slow_resolve_is_not_undone(store):
    slow = SlowStore(store)
    resolver = AliasResolver(slow, ttl_s=60.0)
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("first", resolver.resolve("acme", "h")))
    reader.start()
    assert slow.entered.wait(10)
    store.set_alias("acme", "h", "production", 2)  # the promote...
    resolver.forget("acme", "h")  # ...and its invalidation, while the old answer is in flight
    slow.release.set()
    reader.join(10)
    assert got["first"].manifest.version == 1  # the in-flight request keeps the version it read
    assert resolver.resolve("acme", "h").manifest.version == 2, "stale alias cached after forget()"


@pytest.mark.parametrize("words", [40, 400])
def test_long_text_is_cut_to_the_base_positions(tiny_bert_dir, words):
    from serving.engine.backbone import encode_texts, load_backbone

    store = open_store(tiny_bert_dir.parent / "store-pos")
    entry = store.register_base(describe_base("tiny", tiny_bert_dir))
    backbone = load_backbone(entry)
    positions = backbone.model.config.max_position_embeddings  # 128 for the tiny base
    enc = encode_texts(backbone, ["refund my order " * words], 256)
    assert enc["input_ids"].shape[1] <= positions
    hidden = backbone.model(**enc).last_hidden_state
    assert hidden.shape[1] == enc["input_ids"].shape[1]
