"""ONNX export: graphs validated against PyTorch, typed refusals, stored under the base fingerprint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adapters_store import describe_base, open_store
from adapters_store.bundle import sha256_hex
from adapters_store.errors import IncompatibleBase, ValidationError
from training.onnx_export import (
    ExportSettings,
    OnnxToleranceError,
    UnsupportedArchitecture,
    export_base,
    graph_file,
    manifest_file,
)
from training.onnx_export import export as export_mod
from training.onnx_export.specs import BERT_FAMILY, Tolerance

torch.set_num_threads(1)


@pytest.fixture()
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture()
def bert_store(store, tiny_bert_dir):
    store.register_base(describe_base("tiny-bert", tiny_bert_dir))
    return store


def _stored_session(store, name: str, variant: str) -> tuple[ort.InferenceSession, dict]:
    entry = store.get_base(name)
    manifest = json.loads(store.get_artifact(name, entry.fingerprint, manifest_file(variant)))
    graph = store.get_artifact(name, entry.fingerprint, graph_file(variant))
    assert sha256_hex(graph) == manifest["sha256"]
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"]), manifest


def _torch_features(folder, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    h, m = out.last_hidden_state, torch.from_numpy(mask).unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1), h[:, 0], out.pooler_output, h


def test_bert_fp32_export_is_validated_stored_and_matches_torch(bert_store, tiny_bert_dir):
    report = export_base(bert_store, "tiny-bert")
    m = report.manifest
    assert not report.reused and m.variant == "fp32" and m.architecture == "bert-family"
    assert m.outputs == ["mean_pooled", "cls_token", "pooler_output", "last_hidden_state"]
    assert m.pooling_outputs == {"mean": "mean_pooled", "cls": "cls_token", "pooler": "pooler_output"}
    assert m.validation.max_scaled_diff <= 1e-4 and m.validation.min_cosine >= 0.9999
    batches = {s[0] for s in m.validation.shapes}
    lens = {s[1] for s in m.validation.shapes}
    assert min(batches) == 1 and max(batches) == 32 and min(lens) <= 8 and max(lens) >= 128
    # independent check on a new shape: the stored graph equals torch with hand-written pooling
    session, _ = _stored_session(bert_store, "tiny-bert", "fp32")
    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 30000, size=(3, 19), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})
    for g, r in zip(got, _torch_features(tiny_bert_dir, ids, mask), strict=True):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)


def test_second_export_reuses_the_stored_artifact_unless_forced(bert_store):
    first = export_base(bert_store, "tiny-bert")
    again = export_base(bert_store, "tiny-bert")
    assert again.reused and again.manifest.sha256 == first.manifest.sha256
    assert not export_base(bert_store, "tiny-bert", settings=ExportSettings(force=True)).reused


def test_dynamo_exporter_is_validated_too(bert_store):
    m = export_base(bert_store, "tiny-bert", settings=ExportSettings(exporter="dynamo", threads=1)).manifest
    assert m.exporter.startswith("torch.onnx dynamo") and m.validation.max_scaled_diff <= 1e-4
    session, _ = _stored_session(bert_store, "tiny-bert", "fp32")
    assert [o.name for o in session.get_outputs()] == m.outputs


def test_vit_export_validated(store, tiny_vit_dir):
    store.register_base(describe_base("tiny-vit", tiny_vit_dir))
    m = export_base(store, "tiny-vit").manifest
    assert m.architecture == "vit" and m.modality == "image" and m.inputs[0].name == "pixel_values"
    assert m.validation.max_scaled_diff <= 2e-4 and max(s[0] for s in m.validation.shapes) == 32
    session, _ = _stored_session(store, "tiny-vit", "fp32")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_vit_dir).eval()
    pixels = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        ref = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    mean, cls = session.run(["mean_pooled", "cls_token"], {"pixel_values": pixels})
    np.testing.assert_allclose(mean, ref.mean(1).numpy(), atol=2e-4)
    np.testing.assert_allclose(cls, ref[:, 0].numpy(), atol=2e-4)


def test_int8_export_passes_gate_and_stores_both_variants(bert_store):
    report = export_base(bert_store, "tiny-bert", quantize="int8")
    m = report.manifest
    assert m.variant == "int8" and report.also_stored == ["fp32"]
    assert m.quantization is not None and m.quantization.attempts[-1].accepted
    assert m.validation.min_cosine >= 0.99 == m.quantization.min_cosine_required
    entry = bert_store.get_base("tiny-bert")
    assert bert_store.has_artifact("tiny-bert", entry.fingerprint, "backbone-fp32.json")
    _stored_session(bert_store, "tiny-bert", "int8")  # loads, digest matches
    graph = onnx.load_from_string(bert_store.get_artifact("tiny-bert", entry.fingerprint, graph_file("int8")))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph.node)


def test_int8_gate_refuses_with_the_measured_figure(bert_store, monkeypatch):
    strict = dataclasses.replace(BERT_FAMILY, tolerance=Tolerance(int8_min_cosine=0.99999999))
    monkeypatch.setattr(export_mod, "spec_for", lambda model_type: strict)
    with pytest.raises(OnnxToleranceError) as err:
        export_base(bert_store, "tiny-bert", quantize="int8")
    assert err.value.metric == "min_cosine" and err.value.measured < 0.99999999
    assert f"{err.value.measured:.4f}" in err.value.message and isinstance(err.value, ValidationError)
    entry = bert_store.get_base("tiny-bert")
    assert not bert_store.has_artifact("tiny-bert", entry.fingerprint, manifest_file("int8"))


def test_fp32_graph_that_differs_from_torch_is_refused(bert_store, other_tiny_bert_dir, monkeypatch):
    """A graph traced from other weights must fail validation with the measured max abs diff."""
    from transformers import AutoModel

    real_export = export_mod.export_graph
    other = export_mod.features_module(AutoModel.from_pretrained(other_tiny_bert_dir).eval(), "text")
    monkeypatch.setattr(export_mod, "export_graph", lambda module, *a, **k: real_export(other, *a, **k))
    with pytest.raises(OnnxToleranceError) as err:
        export_base(bert_store, "tiny-bert")
    assert err.value.metric == "max_scaled_diff" and err.value.measured > 1e-4
    entry = bert_store.get_base("tiny-bert")
    assert not bert_store.has_artifact("tiny-bert", entry.fingerprint, graph_file("fp32"))


def test_base_whose_weights_changed_is_refused(store, tiny_bert_dir, other_tiny_bert_dir):
    entry = describe_base("tiny-bert", tiny_bert_dir).model_copy(update={"source": str(other_tiny_bert_dir)})
    store.register_base(entry)
    with pytest.raises(IncompatibleBase, match="re-register"):
        export_base(store, "tiny-bert")


def test_unsupported_architecture_lists_the_supported_ones(store, tiny_resnet_dir):
    store.register_base(describe_base("tiny-resnet", tiny_resnet_dir))
    with pytest.raises(UnsupportedArchitecture, match="resnet.*supported: bert"):
        export_base(store, "tiny-resnet")


@pytest.mark.integration
@pytest.mark.slow
def test_real_minilm_int8_export_is_gated_and_served(store, minilm_path):
    """The real backbone: fp32 within tolerance, int8 stored only with min cosine >= 0.99 (plan recorded)."""
    from serving.onnx_backbone import OrtBackbone

    store.register_base(describe_base("minilm", minilm_path))
    report = export_base(store, "minilm", quantize="int8")
    q = report.manifest.quantization
    assert report.also_stored == ["fp32"] and q.attempts[-1].accepted and q.attempts[-1].plan == q.plan
    assert all(not a.accepted and a.min_cosine < 0.99 for a in q.attempts[:-1])
    assert report.manifest.validation.min_cosine >= 0.99
    entry = store.get_base("minilm")
    fp32_manifest = json.loads(store.get_artifact("minilm", entry.fingerprint, manifest_file("fp32")))
    assert fp32_manifest["validation"]["max_scaled_diff"] <= 1e-4
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    mask = (ids > 0).astype(np.int64)
    ref = _torch_features(minilm_path, ids, mask)
    for variant, min_cos in (("fp32", 0.99999), ("int8", 0.99)):
        feats = OrtBackbone.from_store(store, entry, variant=variant, threads=2).features(ids, mask)
        for got, want in zip((feats.mean, feats.cls, feats.pooler), ref[:3], strict=True):
            cos = (
                (got * want.numpy()).sum(1)
                / np.linalg.norm(got, axis=1)
                / np.linalg.norm(want.numpy(), axis=1)
            )
            assert cos.min() >= min_cos, (variant, cos)
