"""In-process checks of the store fixes the reliability corpus led to (fast, no server).

- a symlinked folder planted in a local store is never followed (read, list, write, delete);
- a deleted version's number is never reused by a later put;
- malformed PEFT configs (deep nesting, mistyped fields) and safetensors headers give ValidationError.
"""

from __future__ import annotations

import json

import pytest

from adapters_store import describe_base, open_store
from adapters_store.errors import NotFound, ValidationError
from adapters_store.validation import StoreLimits, parse_peft_config, parse_safetensors
from tests.helpers.bundles import head_bundle
from tests.reliability_corpus import raw_safetensors


@pytest.fixture()
def store_and_base(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    return store, store.register_base(describe_base("tiny", tiny_bert_dir))


def test_symlinked_adapter_folder_is_not_followed(tmp_path, store_and_base):
    store, base = store_and_base
    m = store.put(head_bundle(base, tenant="acme", name="real", seed=1))
    outside = tmp_path / "outside"
    (outside / "versions").mkdir(parents=True)
    fake = json.loads(m.to_json())
    fake["name"] = "evil"
    (outside / "versions" / "1.json").write_text(json.dumps(fake))
    (tmp_path / "store" / "tenants" / "acme" / "adapters" / "evil").symlink_to(
        outside, target_is_directory=True
    )
    with pytest.raises(NotFound):
        store.resolve("acme/evil@1")
    assert store.list_versions("acme", "evil") == []
    with pytest.raises(ValidationError, match="symlink"):
        store.put(head_bundle(base, tenant="acme", name="evil", seed=2))
    store._delete("tenants/acme/adapters/evil/versions/1.json")
    assert (outside / "versions" / "1.json").exists(), "a delete went through the link"
    assert sorted(p.name for p in outside.rglob("*")) == ["1.json", "versions"]


def test_symlinked_tenant_folder_is_not_listed_or_read(tmp_path, store_and_base):
    store, base = store_and_base
    store.put(head_bundle(base, tenant="acme", name="real", seed=1))
    (tmp_path / "store" / "tenants" / "linked").symlink_to(tmp_path / "store" / "tenants" / "acme")
    assert store.list_tenants() == ["acme"]
    assert store.list_adapters("linked") == []
    with pytest.raises(NotFound):
        store.resolve("linked/real@1")


def test_deleted_version_number_is_never_reused(store_and_base):
    store, base = store_and_base
    v1 = store.put(head_bundle(base, name="h", seed=1))
    v2 = store.put(head_bundle(base, name="h", seed=2))
    store.delete_version("acme", "h", v2.version)
    v3 = store.put(head_bundle(base, name="h", seed=3))
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    with pytest.raises(NotFound):
        store.resolve("acme/h@2")
    assert store.resolve("acme/h").digest == v3.digest


def test_tombstones_stay_compact(tmp_path, store_and_base):
    store, base = store_and_base
    for seed in range(6):
        store.put(head_bundle(base, name="h", seed=seed))
    for v in (2, 5, 3, 6):
        store.delete_version("acme", "h", v)
    stones = sorted(p.name for p in (tmp_path / "store/tenants/acme/adapters/h/deleted").iterdir())
    assert stones == ["6.json"]
    assert store.put(head_bundle(base, name="h", seed=99)).version == 7


@pytest.mark.parametrize(
    "config",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": 7}).encode(),
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": [["query"]]}).encode(),
        json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"query": "x"}}).encode(),
        json.dumps({"peft_type": "LORA", "r": 4, "modules_to_save": 5}).encode(),
        json.dumps({"peft_type": "LORA", "r": 4, "layer_replication": [[0, 2]]}).encode(),
    ],
    ids=["deep-list", "deep-object", "targets-int", "targets-nested", "rank-str", "mts-int", "layer-repl"],
)
def test_malformed_peft_config_is_a_validation_error(config):
    with pytest.raises(ValidationError):
        parse_peft_config(config)


def test_deeply_nested_safetensors_header_is_a_validation_error():
    data = raw_safetensors(b"[" * 50_000 + b"]" * 50_000, b"\0" * 8)
    with pytest.raises(ValidationError, match="nested"):
        parse_safetensors(data, "x.safetensors", StoreLimits())


def test_planted_names_in_a_version_folder_are_ignored(tmp_path, store_and_base):
    store, base = store_and_base
    store.put(head_bundle(base, name="h", seed=1))
    versions = tmp_path / "store/tenants/acme/adapters/h/versions"
    (versions / "7.json").symlink_to(versions / "1.json")  # a link is never followed
    (versions / "\u00b2.json").write_text("{}")  # a non-ASCII digit is not a version number
    (versions / ".9.json").write_text("{}")  # hidden (the store's own temp files start with '.')
    assert [m.version for m in store.list_versions("acme", "h")] == [1]
    assert store.resolve("acme/h").version == 1
    assert store.put(head_bundle(base, name="h", seed=2)).version == 2


def test_put_that_loses_races_jumps_past_taken_numbers(store_and_base, monkeypatch):
    """Finding 12: 32 writers on one name got 409 'too many concurrent puts' because a put that lost a
    race stepped one number at a time. A stale first listing (here: 70 numbers taken since) must not
    exhaust the retries."""
    store, base = store_and_base
    for seed in range(70):
        store.put(head_bundle(base, name="h", seed=seed))
    real, calls = store._next_version, []

    def stale_first(tenant, name):
        calls.append(name)
        return 1 if len(calls) == 1 else real(tenant, name)

    monkeypatch.setattr(store, "_next_version", stale_first)
    assert store.put(head_bundle(base, name="h", seed=1000)).version == 71
    assert len(calls) == 2


def test_put_never_reuses_a_number_deleted_since_it_listed(store_and_base, monkeypatch):
    """Another replica took v3 and it was deleted between this put's listing and its create: the create
    succeeds (versions/3.json is gone) but '@3' once named other weights, so the put must not keep 3."""
    store, base = store_and_base
    for seed in (1, 2, 3):
        store.put(head_bundle(base, name="h", seed=seed))
    store.delete_version("acme", "h", 3)
    real, calls = store._next_version, []

    def stale_first(tenant, name):
        calls.append(name)
        return 3 if len(calls) == 1 else real(tenant, name)  # what it listed before the delete

    monkeypatch.setattr(store, "_next_version", stale_first)
    m = store.put(head_bundle(base, name="h", seed=4))
    assert m.version == 4
    assert [v.version for v in store.list_versions("acme", "h")] == [1, 2, 4]
