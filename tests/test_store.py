"""AdapterStore guarantees, each against the local store and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import contextlib
import threading

import pytest

import adapters_store.store as store_module
from adapters_store import describe_base
from adapters_store.errors import Conflict, IncompatibleBase, IntegrityError, InvalidName, NotFound
from adapters_store.names import AdapterRef
from tests.helpers.bundles import head_bundle, lora_bundle


@pytest.fixture
def base(any_store, tiny_bert_dir):
    return any_store.register_base(describe_base("tiny-bert", tiny_bert_dir))


def test_put_assigns_increasing_immutable_versions(any_store, base):
    first = any_store.put(head_bundle(base, seed=1))
    second = any_store.put(head_bundle(base, seed=2))
    assert (first.version, second.version) == (1, 2)
    assert any_store.get("acme/head@1").files == head_bundle(base, seed=1).files
    assert any_store.get("acme/head@2").files == head_bundle(base, seed=2).files
    assert first.digest != second.digest


def test_resolve_latest_version_and_aliases(any_store, base):
    for seed in (1, 2, 3):
        any_store.put(head_bundle(base, seed=seed))
    assert any_store.resolve("acme/head").version == 3
    assert any_store.resolve("acme/head@latest").version == 3
    assert any_store.resolve("acme/head@v2").version == 2
    any_store.set_alias("acme", "head", "production", 2)
    assert any_store.resolve(AdapterRef("acme", "head", "production")).version == 2
    any_store.set_alias("acme", "head", "production", 1)  # rollback
    assert any_store.resolve("acme/head@production").version == 1
    assert any_store.aliases("acme", "head") == {"production": 1, "latest": 3}
    with pytest.raises(Conflict):
        any_store.set_alias("acme", "head", "latest", 1)
    with pytest.raises(NotFound):
        any_store.set_alias("acme", "head", "production", 9)
    with pytest.raises(InvalidName):
        any_store.set_alias("acme", "head", "v7", 1)
    with pytest.raises(NotFound):
        any_store.resolve("acme/head@staging")


def test_listing(any_store, base):
    any_store.put(head_bundle(base, tenant="acme", name="a"))
    any_store.put(head_bundle(base, tenant="acme", name="b"))
    any_store.put(head_bundle(base, tenant="globex", name="a"))
    assert any_store.list_tenants() == ["acme", "globex"]
    assert any_store.list_adapters("acme") == ["a", "b"]
    assert [m.version for m in any_store.list_versions("globex", "a")] == [1]
    assert [b.name for b in any_store.list_bases()] == ["tiny-bert"]


def test_delete_version_and_adapter(any_store, base):
    for seed in (1, 2):
        any_store.put(head_bundle(base, seed=seed))
    any_store.set_alias("acme", "head", "production", 1)
    with pytest.raises(Conflict, match="production"):  # an aliased version needs force
        any_store.delete_version("acme", "head", 1)
    assert any_store.delete_version("acme", "head", 1, force=True) == {"production": 1}
    assert "production" not in any_store.aliases("acme", "head")
    with pytest.raises(NotFound):
        any_store.resolve("acme/head@1")
    assert any_store.get("acme/head").manifest.version == 2  # the other version is untouched
    assert any_store.delete_adapter("acme", "head") == 1
    with pytest.raises(NotFound):
        any_store.resolve("acme/head")
    with pytest.raises(NotFound):
        any_store.delete_adapter("acme", "head")
    # a new put after deleting everything is complete and never reuses a number
    assert any_store.put(head_bundle(base, seed=3)).version == 3


def test_corrupted_blob_is_refused_and_others_still_served(any_store, base):
    bad = any_store.put(head_bundle(base, name="bad", seed=1))
    any_store.put(head_bundle(base, name="good", seed=2))
    key = f"tenants/acme/blobs/{bad.files['head.safetensors'].sha256}"
    data = bytearray(any_store._read(key))
    data[len(data) // 2] ^= 0x01
    any_store._write(key, bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        any_store.get("acme/bad")
    with pytest.raises(IntegrityError):
        any_store.verify("acme/bad@1")
    assert any_store.verify("acme/good").version == 1


def test_missing_blob_is_an_integrity_error(any_store, base):
    m = any_store.put(head_bundle(base, seed=1))
    any_store._delete(f"tenants/acme/blobs/{m.files['head.safetensors'].sha256}")
    with pytest.raises(IntegrityError, match="missing"):
        any_store.get("acme/head")


@pytest.mark.parametrize("one_process", [True, False], ids=["one-process", "like-separate-processes"])
def test_concurrent_puts_yield_distinct_versions(any_store, base, monkeypatch, one_process):
    if not one_process:
        # Puts in one process take turns for a number; replicas do not share that lock, so drop it and
        # let the conditional create (If-None-Match on S3, link on disk) settle every race on its own.
        monkeypatch.setattr(store_module, "_NUMBER_LOCKS", (contextlib.nullcontext(),))
    bundles = [head_bundle(base, seed=s) for s in range(8)]
    results, errors = [], []

    def put(b):
        try:
            results.append(any_store.put(b))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=put, args=(b,)) for b in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(m.version for m in results) == list(range(1, 9))
    stored = {m.version: any_store.get(f"acme/head@{m.version}").manifest.digest for m in results}
    assert sorted(stored.values()) == sorted(b.manifest.digest for b in bundles)  # nothing lost


def test_put_needs_the_registered_base(any_store, base, other_tiny_bert_dir):
    other = describe_base("tiny-bert", other_tiny_bert_dir)
    with pytest.raises(IncompatibleBase, match="fingerprint"):
        any_store.put(head_bundle(other))
    stranger = describe_base("never-registered", other_tiny_bert_dir)
    with pytest.raises(IncompatibleBase, match="not registered"):
        any_store.put(head_bundle(stranger))
    with pytest.raises(Conflict):
        any_store.register_base(other)  # same name, other weights
    assert any_store.register_base(describe_base("tiny-bert", base.source)).fingerprint == base.fingerprint


def test_sweep_removes_only_unreferenced_blobs(any_store, base):
    kept = any_store.put(head_bundle(base, name="kept", seed=1))
    gone = any_store.put(head_bundle(base, name="gone", seed=2))
    any_store._write("tenants/acme/blobs/" + "0" * 64, b"orphan of an interrupted put")
    assert any_store.sweep_orphans(grace_s=3600) == 0  # too young: a put may still be running
    any_store.delete_adapter("acme", "gone")
    assert any_store.sweep_orphans(grace_s=-1) == 2
    assert any_store.verify("acme/kept").version == kept.version
    with pytest.raises(NotFound):
        any_store._read(f"tenants/acme/blobs/{gone.files['head.safetensors'].sha256}")


def test_artifacts_are_keyed_by_base_fingerprint(any_store, base):
    any_store.put_artifact("tiny-bert", base.fingerprint, "model.fp32.onnx", b"graph")
    assert any_store.get_artifact("tiny-bert", base.fingerprint, "model.fp32.onnx") == b"graph"
    assert not any_store.has_artifact("tiny-bert", base.fingerprint, "model.int8.onnx")
    with pytest.raises(IncompatibleBase):
        any_store.put_artifact("tiny-bert", "f" * 64, "model.fp32.onnx", b"graph")


def test_lora_round_trip_keeps_bytes(any_store, tiny_bert_dir, base, tmp_path):
    bundle = lora_bundle(tiny_bert_dir, base, tmp_path, r=4)
    m = any_store.put(bundle)
    got = any_store.get(f"acme/intent@{m.version}")
    assert got.files == bundle.files
    assert got.manifest.kind == "lora" and got.manifest.task == "text-classification"


def test_hot_paths_list_one_folder_not_the_whole_tree(any_store, base, monkeypatch):
    """Finding 12: put, resolve and alias changes used to walk (and stat) every file under the adapter;
    with thousands of versions that starved inference. They must only list a folder's direct names."""
    for seed in (1, 2, 3):
        any_store.put(head_bundle(base, seed=seed))

    def no_walk(prefix):
        raise AssertionError(f"hot path walked {prefix!r}")

    monkeypatch.setattr(any_store, "_list", no_walk)
    assert any_store.put(head_bundle(base, seed=4)).version == 4
    assert any_store.resolve("acme/head").version == 4
    any_store.set_alias("acme", "head", "production", 2)
    assert any_store.aliases("acme", "head") == {"production": 2, "latest": 4}
    any_store.delete_version("acme", "head", 2, force=True)
    any_store.delete_version("acme", "head", 4)
    assert any_store.aliases("acme", "head") == {"latest": 3}
    assert any_store.put(head_bundle(base, seed=5)).version == 5  # the tombstone of 4 still counts


def test_names_lists_direct_children_only(any_store, base):
    any_store.put(head_bundle(base, seed=1))
    any_store._write("tenants/acme/adapters/head/versions/sub/9.json", b"{}")
    assert sorted(any_store._names("tenants/acme/adapters/head/versions/")) == ["1.json"]
    assert [m.version for m in any_store.list_versions("acme", "head")] == [1]
    assert any_store._names("tenants/acme/adapters/none/versions/") == []
    # the recursive listing without times (list_tenants / list_adapters) sees what _list sees
    for prefix in ("tenants/", "tenants/acme/adapters/", "tenants/acme/adapters/none/"):
        assert sorted(any_store._keys(prefix)) == sorted(k for k, _ in any_store._list(prefix))
    assert "tenants/acme/adapters/head/versions/sub/9.json" in any_store._keys("tenants/")
