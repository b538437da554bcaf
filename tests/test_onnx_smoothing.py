"""Activation rescaling before int8 (training.onnx_export.smoothing): exact in fp32, better in int8,
recorded in the manifest, and served like any int8 export."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from transformers import AutoModel

from adapters_store import describe_base, open_store
from training.onnx_export import ExportSettings, export_base
from training.onnx_export.export import export_graph, ort_runner, torch_runner
from training.onnx_export.probes import CALIBRATION_SENTENCES, PROBE_SENTENCES, text_probe_set
from training.onnx_export.quantize import Int8Plan, quantize_int8
from training.onnx_export.smoothing import SplitOutput, smoothable, smoothed_copy
from training.onnx_export.specs import spec_for
from training.onnx_export.wrappers import TextFeatures

torch.set_num_threads(1)
SPLIT = 3  # the FFN channel given a [CLS]-like outlier
WIDE = 5  # the hidden channel given a LayerNorm-scale outlier


@pytest.fixture(scope="module")
def outlier_bert_dir(tmp_path_factory):
    """The tiny random BERT with the two kinds of outlier a real one has: one hidden channel scaled up
    by every LayerNorm (Q/K/V and FFN inputs), and one FFN channel far above the others."""
    from tests.helpers.models import copy_tokenizer, make_tiny_bert

    src = make_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    model = AutoModel.from_pretrained(src)
    layers = model.encoder.layer
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[WIDE] *= 8.0
        for i, layer in enumerate(layers):
            layer.attention.output.LayerNorm.weight[WIDE] *= 8.0
            if i < len(layers) - 1:  # the last one is the output: keep it ordinary
                layer.output.LayerNorm.weight[WIDE] *= 8.0
            layer.intermediate.dense.bias[SPLIT] += 9.0
    dest = tmp_path_factory.mktemp("outlier-bert") / "model"
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(dest)
    return dest


def _features(folder) -> TextFeatures:
    model = AutoModel.from_pretrained(folder).eval()
    model.set_attn_implementation("eager")
    return TextFeatures(model).eval()


def test_smoothed_copy_computes_the_same_function_and_leaves_the_model_alone(outlier_bert_dir):
    module = _features(outlier_bert_dir)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    calibration = text_probe_set(outlier_bert_dir, module.model.config, CALIBRATION_SENTENCES)
    smooth, record = smoothed_copy(module, calibration)
    # the injected FFN outlier is split off in every layer (with up to 3 more at 4x the median)
    assert set(record.split_channels) == {"0", "1"}
    assert all(SPLIT in c and len(c) <= 4 for c in record.split_channels.values())
    assert record.calibration_rows == 32 + 8 and set(record.alphas) == {
        "qkv",
        "attention_output",
        "intermediate",
    }
    assert 0.9 < record.calibration_min_cosine <= 1.0
    assert all(isinstance(layer.output, SplitOutput) for layer in smooth.model.encoder.layer)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    probes = text_probe_set(outlier_bert_dir, module.model.config)
    with torch.inference_mode():
        for feed in probes:
            args = [torch.from_numpy(v) for v in feed.values()]
            for ref, got in zip(module(*args), smooth(*args), strict=True):
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_smoothing_cuts_the_int8_error_with_every_weight_matmul_quantized(outlier_bert_dir):
    module = _features(outlier_bert_dir)
    spec = spec_for("bert")
    outputs = spec.output_names(has_pooler=True)
    probes = text_probe_set(outlier_bert_dir, module.model.config)
    calibration = text_probe_set(outlier_bert_dir, module.model.config, CALIBRATION_SENTENCES)
    smooth, _ = smoothed_copy(module, calibration)
    reference = torch_runner(module)
    error = {}
    for name, m in (("plain", module), ("smoothed", smooth)):
        run = ort_runner(quantize_int8(export_graph(m, spec, probes[0], outputs), Int8Plan("all-matmul")), 1)
        # mean-pooled rows vs fp32 torch, relative to how much the rows differ from each other
        rel = []
        for feed in probes:
            ref, got = reference(feed)[0], run(feed)[0]
            rel.append(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(0)))
        error[name] = max(rel)
    # plain int8 loses the small channels under the outliers' range; rescaled, they keep their bits
    # (measured: 0.0026 vs 0.0013)
    assert error["smoothed"] < error["plain"] / 1.5, error


def test_int8_export_stores_the_smoothed_graph_and_serving_answers_from_it(tmp_path, outlier_bert_dir):
    from serving.onnx_backbone import OrtBackbone

    store = open_store(str(tmp_path / "store"))
    store.register_base(describe_base("outlier-bert", outlier_bert_dir))
    settings = ExportSettings(fusion="plain", threads=1)
    manifest = export_base(store, "outlier-bert", quantize="int8", settings=settings).manifest
    q = manifest.quantization
    assert q.plan.startswith("smooth-") and q.attempts[-1].accepted
    assert q.smoothing is not None and all(SPLIT in c for c in q.smoothing.split_channels.values())
    assert manifest.validation.min_cosine >= 0.99
    # the split channels' two skinny MatMuls per layer stay fp32; every ranked weight MatMul is int8
    import onnx

    from training.onnx_export import graph_file

    entry = store.get_base("outlier-bert")
    graph = onnx.load_from_string(store.get_artifact("outlier-bert", entry.fingerprint, graph_file("int8")))
    side = [n for n in graph.graph.node if "/fp32_channels/" in n.name and "MatMul" in n.op_type]
    assert [n.op_type for n in side] == ["MatMul"] * (2 * len(q.smoothing.split_channels))
    assert q.plan == "smooth-all-matmul" and not any(
        n.op_type == "MatMul" and "/dense/" in n.name for n in graph.graph.node
    )
    # the same texts the torch model answers, through the stored int8 graph (not the probe texts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(outlier_bert_dir)
    enc = tok(["a sentence the gate never saw", "and another, longer one, with commas"], padding=True)
    ids, mask = (np.array(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask"))
    feats = OrtBackbone.from_store(store, store.get_base("outlier-bert"), "int8", threads=1).features(
        ids, mask
    )
    with torch.inference_mode():
        ref = _features(outlier_bert_dir)(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
    cos = (feats.mean * ref).sum(1) / np.linalg.norm(feats.mean, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_without_smoothing_the_graph_is_quantized_as_it_is(tmp_path, tiny_bert_dir):
    store = open_store(str(tmp_path / "store"))
    store.register_base(describe_base("tiny-bert", tiny_bert_dir))
    settings = ExportSettings(fusion="plain", threads=1, int8_smoothing=False)
    q = export_base(store, "tiny-bert", quantize="int8", settings=settings).manifest.quantization
    assert q.smoothing is None and not q.plan.startswith("smooth-")


def test_only_bert_layout_encoders_are_rewritten(tiny_vit_dir, tiny_bert_dir):
    assert smoothable(AutoModel.from_pretrained(tiny_bert_dir))
    assert not smoothable(AutoModel.from_pretrained(tiny_vit_dir))
    assert not set(CALIBRATION_SENTENCES) & set(PROBE_SENTENCES)  # the gate never grades the fitted texts


def test_plans_try_the_fewest_fp32_matmuls_whose_estimate_clears_the_bare_bound_first(monkeypatch):
    """The fake-quant estimate errs both ways; the ORT-measured gate decides, fewest fp32 first."""
    from training.onnx_export import quantize

    estimates = {0: 0.9895, 1: 0.9903, 2: 0.9911, 3: 0.9921, 4: 0.9925}
    nodes = [f"/m{i}/MatMul" for i in range(8)]
    monkeypatch.setattr(quantize, "weight_matmuls", lambda graph: nodes)
    monkeypatch.setattr(quantize.onnx, "load_from_string", lambda graph: graph)
    monkeypatch.setattr(quantize, "linear_for_node", lambda module, node: None)  # all rank alike
    kept: list[int] = []

    def fake_min_cosine(module, probes, reference):
        return estimates.get(kept[-1], 0.995) if kept else 0.5

    class Linear:  # stands in for the quantized set: its size tells which k is being estimated
        pass

    monkeypatch.setattr(quantize, "min_cosine", fake_min_cosine)

    def fake_quantized(linears):
        kept.append(len(nodes) - len(linears))
        return contextlib.nullcontext()

    monkeypatch.setattr(quantize, "fake_quantized", fake_quantized)
    monkeypatch.setattr(quantize, "linear_for_node", lambda module, node: Linear())
    module = lambda *args: ()  # noqa: E731
    plans, _ = quantize.sensitivity_plan(module, b"", [{}], bound=0.99, margin=0.002)
    assert [len(p.keep_fp32) for p in plans][:2] == [1, 3]
    assert plans[0].predicted_min_cosine == 0.9903
