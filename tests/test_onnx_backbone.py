"""serving.onnx_backbone: loads only validated exports of the base, runs them, refuses anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from adapters_store import describe_base, open_store
from adapters_store.bundle import sha256_hex
from adapters_store.errors import IntegrityError, NotFound, UnsafeFormat, ValidationError
from serving.onnx_backbone import OrtBackbone, OrtSettings, graph_file, manifest_file
from training.onnx_export import export_base

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert_dir, other_tiny_bert_dir):
    """A store with base 'tiny' exported (fp32 + int8) and base 'other' registered but not exported."""
    store = open_store(str(tmp_path_factory.mktemp("onnx-store")))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    store.register_base(describe_base("other", other_tiny_bert_dir))
    export_base(store, "tiny", quantize="int8")
    return store


def _torch_pooled(folder, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    mean = (out.last_hidden_state * m).sum(1) / m.sum(1)
    return {
        "mean": mean.numpy(),
        "cls": out.last_hidden_state[:, 0].numpy(),
        "pooler": out.pooler_output.numpy(),
    }


def _batch(seed=5, batch=6, seq=21):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq))
    lengths = rng.integers(2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


@pytest.mark.parametrize("variant,atol,min_cos", [("fp32", 1e-4, 0.99999), ("int8", None, 0.99)])
def test_features_match_torch(exported, tiny_bert_dir, variant, atol, min_cos):
    bb = OrtBackbone.from_store(exported, exported.get_base("tiny"), variant=variant, threads=1)
    ids, mask = _batch()
    feats = bb.features(ids.astype(np.int32), mask)  # int32 ids are accepted and widened
    ref = _torch_pooled(tiny_bert_dir, ids, mask)
    for pooling in ("mean", "cls", "pooler"):
        got = feats.pooled(pooling)
        assert got.shape == (6, bb.hidden_size)
        cos = (got * ref[pooling]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref[pooling], axis=1)
        assert cos.min() >= min_cos
        if atol is not None:
            np.testing.assert_allclose(got, ref[pooling], atol=atol)


def test_session_is_built_once_with_small_box_settings(exported):
    bb = OrtBackbone.from_store(exported, exported.get_base("tiny"), threads=1)
    opts = bb.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session = bb.session
    bb.features(*_batch(batch=2))
    assert bb.session is session
    with pytest.raises(ValidationError, match="threads"):
        OrtSettings(threads=0)


def test_unexported_base_is_not_found_with_a_hint(exported):
    with pytest.raises(NotFound, match="onnx export"):
        OrtBackbone.from_store(exported, exported.get_base("other"))


def _retamper(store, base: str, variant: str, graph: bytes, **manifest_changes) -> None:
    entry = store.get_base(base)
    manifest = json.loads(store.get_artifact(base, entry.fingerprint, manifest_file(variant)))
    manifest.update(sha256=sha256_hex(graph), size=len(graph), **manifest_changes)
    store.put_artifact(base, entry.fingerprint, graph_file(variant), graph)
    store.put_artifact(base, entry.fingerprint, manifest_file(variant), json.dumps(manifest).encode())


def test_graph_not_matching_its_manifest_is_refused(tmp_path, tiny_bert_dir):
    store = open_store(str(tmp_path / "s"))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    export_base(store, "tiny")
    entry = store.get_base("tiny")
    graph = bytearray(store.get_artifact("tiny", entry.fingerprint, graph_file("fp32")))
    graph[-10] ^= 0xFF
    store.put_artifact("tiny", entry.fingerprint, graph_file("fp32"), bytes(graph))
    with pytest.raises(IntegrityError, match="does not match"):
        OrtBackbone.from_store(store, entry)


def test_manifest_of_another_base_is_refused(tmp_path, tiny_bert_dir, other_tiny_bert_dir):
    store = open_store(str(tmp_path / "s"))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    store.register_base(describe_base("other", other_tiny_bert_dir))
    export_base(store, "tiny")
    tiny, other = store.get_base("tiny"), store.get_base("other")
    for name in (graph_file("fp32"), manifest_file("fp32")):  # copy tiny's export under 'other'
        store.put_artifact(
            "other", other.fingerprint, name, store.get_artifact("tiny", tiny.fingerprint, name)
        )
    with pytest.raises(IntegrityError, match="another base"):
        OrtBackbone.from_store(store, other)


def test_graph_with_external_data_is_refused(tmp_path, tiny_bert_dir):
    store = open_store(str(tmp_path / "s"))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    export_base(store, "tiny")
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    weight.external_data.add(key="location", value="/etc/passwd")
    node = helper.make_node("MatMul", ["input_ids", "w"], ["mean_pooled"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("mean_pooled", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    _retamper(store, "tiny", "fp32", helper.make_model(graph).SerializeToString())
    with pytest.raises(UnsafeFormat, match="external data"):
        OrtBackbone.from_store(store, store.get_base("tiny"))


def test_unknown_variant_and_wrong_modality_are_refused(exported):
    entry = exported.get_base("tiny")
    with pytest.raises(ValidationError, match="unknown ONNX variant"):
        OrtBackbone.from_store(exported, entry, variant="fp16")
    bb = OrtBackbone.from_store(exported, entry)
    with pytest.raises(ValidationError, match="takes text"):
        bb.image_features(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValidationError, match="batch, seq"):
        bb.features(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.int64))


def test_vit_image_features(tmp_path, tiny_vit_dir):
    from transformers import AutoModel

    store = open_store(str(tmp_path / "s"))
    store.register_base(describe_base("vit", tiny_vit_dir))
    export_base(store, "vit")
    bb = OrtBackbone.from_store(store, store.get_base("vit"), threads=1)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    feats = bb.image_features(pixels)
    with torch.inference_mode():
        out = AutoModel.from_pretrained(tiny_vit_dir).eval()(pixel_values=torch.from_numpy(pixels))
    np.testing.assert_allclose(feats.pooled("mean"), out.last_hidden_state.mean(1).numpy(), atol=2e-4)
    np.testing.assert_allclose(feats.pooled("pooler"), out.pooler_output.numpy(), atol=2e-4)
    assert feats.pooled("cls").shape == (3, bb.hidden_size)
    hidden, pooler = bb.hidden_and_pooler({"pixel_values": torch.from_numpy(pixels)})  # the engine's hook
    np.testing.assert_allclose(hidden.numpy(), out.last_hidden_state.numpy(), atol=2e-4)
    np.testing.assert_allclose(pooler.numpy(), out.pooler_output.numpy(), atol=2e-4)
