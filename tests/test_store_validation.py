"""Every rejection at put and at the boundary, each with its specific error."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as save_tensors

from adapters_store import Bundle, StoreLimits, describe_base, open_store
from adapters_store.bundle import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, AdapterManifest
from adapters_store.errors import (
    IncompatibleBase,
    InvalidName,
    InvalidRequest,
    PayloadTooLarge,
    UnsafeFormat,
    UnsupportedAdapter,
    ValidationError,
)
from adapters_store.names import AdapterRef, validate_name
from adapters_store.peft_import import import_peft_dir
from tests.helpers.bundles import head_bundle, lora_bundle, save_peft_lora


@pytest.fixture
def base(local_store, tiny_bert_dir):
    return local_store.register_base(describe_base("tiny-bert", tiny_bert_dir))


@pytest.fixture(scope="module")
def peft_dir(tiny_bert_dir, tmp_path_factory):
    return save_peft_lora(tiny_bert_dir, tmp_path_factory.mktemp("peft") / "a", r=4)


BAD_NAMES = [
    "",
    "A",
    "../x",
    "..",
    "a/b",
    "/abs",
    "a\\b",
    "a\x00b",
    ".hidden",
    "trail.",
    "x" * 65,
    "%2e%2e",
    "a..b",
    "name with space",
    "ümlaut",
    "a%2fb",
    "trailing ",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_are_refused(bad):
    with pytest.raises(InvalidName):
        validate_name(bad, "tenant")


@pytest.mark.parametrize("bad", ["-x", "_x", "."])
def test_names_start_with_letter_or_digit(bad):
    with pytest.raises(InvalidName):
        validate_name(bad)


@pytest.mark.parametrize(
    "ref", ["acme", "acme/x/y", "acme/x@1@2", "../acme/x", "acme/x@../y", "acme/X", "acme/x@v0"]
)
def test_bad_references(ref):
    with pytest.raises(InvalidName):
        AdapterRef.parse(ref)


def test_reference_forms():
    assert AdapterRef.parse("acme/x") == AdapterRef("acme", "x", "latest")
    assert AdapterRef.parse("x@v12", tenant="acme").version == 12
    assert AdapterRef.parse("acme/x@production").version is None


def _peft_bundle(base, config: dict, tensors: dict[str, torch.Tensor], labels=("a", "b", "c")) -> Bundle:
    from adapters_store.peft_import import bundle_from_peft_files

    return bundle_from_peft_files(
        json.dumps(config).encode(), save_tensors(tensors), "acme", "x", base, labels=list(labels)
    )


def _good_lora(peft_dir):
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / PEFT_CONFIG_FILE).read_text())
    return cfg, load_file(peft_dir / PEFT_WEIGHTS_FILE)


def test_valid_lora_is_accepted(local_store, base, peft_dir):
    cfg, tensors = _good_lora(peft_dir)
    assert local_store.put(_peft_bundle(base, cfg, tensors)).version == 1


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda c, t: t.pop(next(k for k in t if "lora_A" in k)), ValidationError, "lora_A and lora_B"),
        (
            lambda c, t: t.update({"base_model.model.bert.extra.weight": torch.zeros(2, 2)}),
            ValidationError,
            "unexpected",
        ),
        (
            lambda c, t: t.update(
                {k: torch.zeros(5, v.shape[1]) for k, v in list(t.items()) if "lora_A" in k}
            ),
            ValidationError,
            "shape",
        ),
        (lambda c, t: c.update(r=8), ValidationError, "shape"),
        (lambda c, t: c.update(r=4096), ValidationError, "over the limit"),
        (lambda c, t: c.update(target_modules=["key"]), ValidationError, "does not name"),
        (lambda c, t: c.update(peft_type="PREFIX_TUNING"), UnsupportedAdapter, "not supported"),
        (lambda c, t: c.update(use_dora=True), UnsupportedAdapter, "use_dora"),
        (
            lambda c, t: t.update(
                {k: torch.full_like(v, float("nan")) for k, v in list(t.items()) if "lora_B" in k}
            ),
            ValidationError,
            "NaN",
        ),
        (
            lambda c, t: t.update(
                {k: torch.full_like(v, float("inf")) for k, v in list(t.items()) if "lora_A" in k}
            ),
            ValidationError,
            "NaN or Inf",
        ),
        (
            lambda c, t: t.update(
                {k: torch.zeros(7, v.shape[1]) for k, v in list(t.items()) if k.endswith("classifier.weight")}
            ),
            ValidationError,
            "labels",
        ),
    ],
)
def test_bad_lora_is_refused(local_store, base, peft_dir, mutate, error, match):
    cfg, tensors = _good_lora(peft_dir)
    mutate(cfg, tensors)
    with pytest.raises(error, match=match):
        local_store.put(_peft_bundle(base, cfg, tensors))
    assert local_store.list_tenants() == []  # nothing stored


def test_lora_for_a_module_the_base_lacks(local_store, base, peft_dir):
    cfg, tensors = _good_lora(peft_dir)
    cfg["target_modules"] = ["query", "value", "nonexistent"]
    tensors["base_model.model.bert.encoder.layer.0.nonexistent.lora_A.weight"] = torch.zeros(4, 32)
    with pytest.raises(IncompatibleBase, match="not a Linear layer"):
        local_store.put(_peft_bundle(base, cfg, tensors))


def test_pickle_weights_are_refused_unopened(tmp_path, base, peft_dir):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / PEFT_CONFIG_FILE).write_bytes((peft_dir / PEFT_CONFIG_FILE).read_bytes())
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFormat, match="pickle"):
        import_peft_dir(folder, "acme", "x", base)
    with pytest.raises(ValidationError):
        Bundle.build(
            {"adapter_model.bin": b"x"},
            tenant="acme",
            name="x",
            kind="head",
            task="feature-extraction",
            base=base.ref,
        )
    assert not canary.exists()


@pytest.mark.parametrize(
    "fname", ["../head.safetensors", "a/b.safetensors", ".hidden.safetensors", "x.onnx", "model.pt", "run.sh"]
)
def test_bad_file_names(base, fname):
    with pytest.raises(ValidationError):
        Bundle.build(
            {fname: b"x", "head.safetensors": b"x"},
            tenant="acme",
            name="x",
            kind="head",
            task="feature-extraction",
            base=base.ref,
        )


def test_size_limits(tmp_path, tiny_bert_dir):
    bundle_bytes = len(head_bundle(describe_base("tiny-bert", tiny_bert_dir)).files["head.safetensors"])
    for limits in (
        StoreLimits(max_file_bytes=bundle_bytes - 1),
        StoreLimits(max_bundle_bytes=bundle_bytes - 1),
    ):
        store = open_store(tmp_path / str(id(limits)), limits=limits)
        base = store.register_base(describe_base("tiny-bert", tiny_bert_dir))
        with pytest.raises(PayloadTooLarge):
            store.put(head_bundle(base))
        assert store.list_tenants() == []
    store = open_store(tmp_path / "ok", limits=StoreLimits(max_file_bytes=bundle_bytes))
    base = store.register_base(describe_base("tiny-bert", tiny_bert_dir))
    assert store.put(head_bundle(base)).version == 1


def _header_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01", "shorter"),
        (struct.pack("<Q", 10**9) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (
            _header_bytes(
                {
                    "out.weight": {"dtype": "F32", "shape": [3, 32], "data_offsets": [0, 384]},
                    "out.bias": {"dtype": "F32", "shape": [3], "data_offsets": [380, 392]},
                },
                b"\0" * 392,
            ),
            "overlaps",
        ),
        (
            _header_bytes(
                {"out.weight": {"dtype": "F32", "shape": [3, 32], "data_offsets": [0, 999]}}, b"\0" * 384
            ),
            "outside",
        ),
        (
            _header_bytes(
                {"out.weight": {"dtype": "F32", "shape": [3, 32], "data_offsets": [0, 100]}}, b"\0" * 100
            ),
            "byte length",
        ),
        (
            _header_bytes({"out.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "dtype",
        ),
        (
            _header_bytes({"out.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            "trailing",
        ),
    ],
)
def test_malformed_safetensors(local_store, base, blob, match):
    bundle = head_bundle(base)
    bad = Bundle.build({"head.safetensors": blob}, **bundle.manifest.model_dump(exclude={"files", "version"}))
    with pytest.raises(ValidationError, match=match):
        local_store.put(bad)


def test_head_shape_must_match_spec(local_store, base):
    bundle = head_bundle(base)
    tensors = {"out.weight": torch.zeros(3, 7), "out.bias": torch.zeros(3)}
    bad = Bundle.build(
        {"head.safetensors": save_tensors(tensors)},
        **bundle.manifest.model_dump(exclude={"files", "version"}),
    )
    with pytest.raises(ValidationError, match="shape"):
        local_store.put(bad)


@pytest.mark.parametrize("text", ["{", "[]", '{"schema_version": 2}', '{"tenant": "acme"}'])
def test_manifest_that_does_not_parse(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValidationError, match="manifest"):
        Bundle.read_dir(tmp_path)
    with pytest.raises(ValidationError):
        AdapterManifest.from_json(text)


def test_bad_peft_config_json(base, tmp_path, peft_dir):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / PEFT_CONFIG_FILE).write_text("{not json")
    (folder / PEFT_WEIGHTS_FILE).write_bytes((peft_dir / PEFT_WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValidationError, match="not valid JSON"):
        import_peft_dir(folder, "acme", "x", base)


def test_unknown_store_scheme_lists_valid_ones():
    with pytest.raises(InvalidRequest, match="s3://"):
        open_store("gs://bucket/x")


def test_symlink_placed_in_store_is_not_followed(local_store, base, tmp_path):
    m = local_store.put(head_bundle(base))
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the store")
    blob = local_store.root / "tenants" / "acme" / "blobs" / m.files["head.safetensors"].sha256
    blob.unlink()
    os.symlink(secret, blob)
    from adapters_store.errors import IntegrityError

    with pytest.raises(IntegrityError):
        local_store.get("acme/head")


def test_fingerprint_tracks_weights_not_location(tiny_bert_dir, other_tiny_bert_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny_bert_dir, moved)
    assert describe_base("a", moved).fingerprint == describe_base("a", tiny_bert_dir).fingerprint
    assert (
        describe_base("a", other_tiny_bert_dir).fingerprint != describe_base("a", tiny_bert_dir).fingerprint
    )
    cfg = json.loads((moved / "config.json").read_text())
    cfg["num_attention_heads"] = 2
    (moved / "config.json").write_text(json.dumps(cfg))
    assert describe_base("a", moved).fingerprint != describe_base("a", tiny_bert_dir).fingerprint


def test_lora_bundle_of_other_base_is_refused(local_store, base, other_tiny_bert_dir, tmp_path):
    other = describe_base("tiny-bert", other_tiny_bert_dir)
    with pytest.raises(IncompatibleBase):
        local_store.put(lora_bundle(other_tiny_bert_dir, other, tmp_path))
