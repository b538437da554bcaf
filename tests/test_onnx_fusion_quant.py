"""Fused fp32 graphs and sensitivity-planned int8: validated vs torch, the choice recorded in the manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters_store import describe_base, open_store
from adapters_store.onnx_artifacts import OnnxExportManifest
from training.onnx_export import ExportSettings, OnnxToleranceError, export_base, graph_file, manifest_file
from training.onnx_export import export as export_mod
from training.onnx_export.errors import OnnxExportError
from training.onnx_export.fusion import FUSED_OP_TYPES
from training.onnx_export.quantize import Int8Plan, fake_quantized, quantize_int8, weight_matmuls

torch.set_num_threads(1)


@pytest.fixture()
def bert_store(tmp_path, tiny_bert_dir):
    store = open_store(str(tmp_path / "store"))
    store.register_base(describe_base("tiny-bert", tiny_bert_dir))
    return store


def _stored(store, variant: str) -> tuple[onnx.ModelProto, OnnxExportManifest]:
    entry = store.get_base("tiny-bert")
    graph = store.get_artifact("tiny-bert", entry.fingerprint, graph_file(variant))
    manifest = store.get_artifact("tiny-bert", entry.fingerprint, manifest_file(variant))
    return onnx.load_from_string(graph), OnnxExportManifest.model_validate_json(manifest)


def _torch_mean_cls(folder, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()  # default (SDPA) attention: the user's torch path
    with torch.inference_mode():
        h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    return ((h * m).sum(1) / m.sum(1)).numpy(), h[:, 0].numpy()


def test_fused_graph_holds_ort_fused_ops_and_equals_torch(bert_store, tiny_bert_dir):
    m = export_base(bert_store, "tiny-bert", settings=ExportSettings(fusion="fused", threads=1)).manifest
    rec = m.graph_optimization
    assert rec.kept == "fused" and rec.fuser == "onnxruntime.transformers bert"
    assert rec.fused_ops["Attention"] == 2 and rec.fused_ops["SkipLayerNormalization"] == 4
    assert m.validation.max_scaled_diff <= 1e-4
    graph, _ = _stored(bert_store, "fp32")
    ops = {n.op_type for n in graph.graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= ops
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]  # serving feeds these only
    # a new ragged shape, against the model as a user loads it (SDPA attention, hand-written pooling)
    ids = np.random.default_rng(11).integers(1000, 30000, size=(4, 23), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:], mask[3, 1:] = 0, 0
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    mean, cls = session.run(["mean_pooled", "cls_token"], {"input_ids": ids, "attention_mask": mask})
    want_mean, want_cls = _torch_mean_cls(tiny_bert_dir, ids, mask)
    np.testing.assert_allclose(mean, want_mean, atol=1e-4)
    np.testing.assert_allclose(cls, want_cls, atol=1e-4)


def test_serving_loads_a_fused_export(bert_store, tiny_bert_dir):
    from serving.onnx_backbone import OrtBackbone

    export_base(bert_store, "tiny-bert", settings=ExportSettings(fusion="fused", threads=1))
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    mask = (ids > 0).astype(np.int64)
    feats = OrtBackbone.from_store(bert_store, bert_store.get_base("tiny-bert"), "fp32", threads=1).features(
        ids, mask
    )
    np.testing.assert_allclose(feats.mean, _torch_mean_cls(tiny_bert_dir, ids, mask)[0], atol=1e-4)


def test_auto_fusion_keeps_the_graph_that_measured_faster(bert_store):
    """The timing itself is real (tiny graphs, either may win); the rule is checked against it."""
    m = export_base(bert_store, "tiny-bert", settings=ExportSettings(threads=1)).manifest
    rec = m.graph_optimization
    ms = rec.cpu_ms_per_batch
    assert set(ms) == {"fused", "plain"} and all(v > 0 for v in ms.values())
    assert rec.kept == ("fused" if ms["fused"] < export_mod.FUSED_MIN_GAIN * ms["plain"] else "plain")
    assert rec.timing_shape[0] == 32
    graph, _ = _stored(bert_store, "fp32")
    fused_ops = any(n.op_type in FUSED_OP_TYPES for n in graph.graph.node)
    assert fused_ops == (rec.kept == "fused")


def test_fused_graph_that_differs_from_torch_is_refused_or_skipped(bert_store, monkeypatch):
    """A broken fusion is never stored: forced -> refused with the figure; auto -> the plain graph is kept
    (either because it timed faster or because the fused graph then failed validation)."""
    real_fuse = export_mod.fuse_transformer

    def broken(graph, *a):
        fused, counts = real_fuse(graph, *a)
        model = onnx.load_from_string(fused)
        ln = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
        gamma = next(t for t in model.graph.initializer if t.name == ln.input[2])
        gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 1.5, gamma.name))
        return model.SerializeToString(), counts

    monkeypatch.setattr(export_mod, "fuse_transformer", broken)
    with pytest.raises(OnnxToleranceError):
        export_base(bert_store, "tiny-bert", settings=ExportSettings(fusion="fused", threads=1))
    entry = bert_store.get_base("tiny-bert")
    assert not bert_store.has_artifact("tiny-bert", entry.fingerprint, graph_file("fp32"))
    # the fused graph "times faster", so auto picks it, validates it, and must fall back to plain
    monkeypatch.setattr(export_mod, "cpu_ms_per_call", lambda runners, feed: {"plain": 2.0, "fused": 1.0})
    m = export_base(bert_store, "tiny-bert", settings=ExportSettings(threads=1)).manifest
    rec = m.graph_optimization
    assert rec.kept == "plain" and "fusion failed validation" in rec.reason
    graph, _ = _stored(bert_store, "fp32")
    assert not any(n.op_type in FUSED_OP_TYPES for n in graph.graph.node)


def test_fake_quant_matches_ort_dynamic_int8_matmul():
    """The sensitivity ranking emulates ORT's dynamic int8 MatMul; check it on one layer.

    Inputs stay in the lower half of the uint8 range: ORT's u8s8 kernels on CPUs without VNNI add
    products in pairs with int16 saturation (measured on this host's EPYC: Gaussian inputs gave ORT an
    error 20x that of exact int8 math), which the emulation deliberately does not model."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24, bias=False)
    x = rng.uniform(0, 0.5, size=(5, 48)).astype(np.float32)
    x[0, 0] = 1.0  # the range max: every other input quantizes to <= 128, so no pair sum saturates
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/dense/MatMul")
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
        [numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), "w")],
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    int8 = ort.InferenceSession(quantize_int8(fp32), providers=["CPUExecutionProvider"])
    got = int8.run(None, {"x": x})[0]
    with torch.inference_mode(), fake_quantized([lin]):
        emulated = lin(torch.from_numpy(x)).numpy()
        exact = torch.from_numpy(x) @ lin.weight.T
    fp32_err = np.abs(got - exact.numpy()).max()
    assert fp32_err > 1e-3  # the layer really is quantized ...
    assert np.abs(got - emulated).max() < fp32_err / 20  # ... and the emulation follows ORT's rounding


def test_int8_manifest_records_kept_fp32_matmuls_and_sensitivity(bert_store):
    # the fp32 graph as it is (rescaled graphs have their own node names: test_onnx_smoothing)
    settings = ExportSettings(fusion="plain", threads=1, int8_keep_fp32=2, int8_smoothing=False)
    q = export_base(bert_store, "tiny-bert", quantize="int8", settings=settings).manifest.quantization
    fp32_graph, _ = _stored(bert_store, "fp32")
    assert set(q.sensitivity) == set(weight_matmuls(fp32_graph)) and len(q.sensitivity) == 12
    most = sorted(q.sensitivity, key=lambda n: -q.sensitivity[n])[:2]
    assert q.kept_fp32 == most and q.plan == "keep-2-fp32" and q.attempts[-1].kept_fp32 == 2
    int8_graph, m = _stored(bert_store, "int8")
    still_fp32 = {n.name for n in int8_graph.graph.node if n.op_type == "MatMul"}
    assert set(most) <= still_fp32
    quantized = [n for n in int8_graph.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    names = {n.name.removesuffix("_quant") for n in quantized}
    # ORT's quantizer also turns the pooler's Gemm into an int8 MatMul (not a ranked weight MatMul)
    assert names == set(q.sensitivity) - set(most) | {"/model/pooler/dense/Gemm_MatMul"}
    assert m.validation.min_cosine >= 0.99


def test_int8_default_tries_fewest_fp32_first_and_refuses_all_below_gate(bert_store, monkeypatch):
    import dataclasses

    from training.onnx_export.specs import BERT_FAMILY, Tolerance

    strict = dataclasses.replace(BERT_FAMILY, tolerance=Tolerance(int8_min_cosine=0.9999999))
    monkeypatch.setattr(export_mod, "spec_for", lambda model_type: strict)
    with pytest.raises(OnnxToleranceError) as err:
        export_base(
            bert_store, "tiny-bert", quantize="int8", settings=ExportSettings(fusion="plain", threads=1)
        )
    assert err.value.measured < 0.9999999 and "keep-" in err.value.message
    entry = bert_store.get_base("tiny-bert")
    for variant in ("int8", "fp32"):  # a refused int8 export stores nothing, not even its fp32 graph
        assert not bert_store.has_artifact("tiny-bert", entry.fingerprint, manifest_file(variant))


def test_unknown_fp32_node_in_a_plan_is_an_error(tiny_bert_dir):
    plain = onnx.helper.make_model(
        helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 17)]
    ).SerializeToString()
    with pytest.raises(OnnxExportError, match="no weight MatMul named"):
        quantize_int8(plain, Int8Plan("x", keep_fp32=("/nope/MatMul",)))


def test_old_int8_manifest_without_new_fields_still_loads():
    old = {
        "plan": "no-ffn-output",
        "excluded_patterns": [r"/layer\.\d+/output/dense/MatMul$"],
        "attempts": [{"plan": "all-matmul", "min_cosine": 0.98, "mean_cosine": 0.99, "accepted": False}],
        "min_cosine_required": 0.99,
    }
    from adapters_store.onnx_artifacts import QuantizationRecord

    rec = QuantizationRecord.model_validate_json(json.dumps(old))
    assert rec.kept_fp32 == [] and rec.attempts[0].kept_fp32 is None
