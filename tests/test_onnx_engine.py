"""Engine on ORT: the ONNX backbone swapped in at the engine's one backbone call gives the torch answers.

The engine has no ``runtime="onnx"`` switch yet (serving/engine is not the ONNX helper's file). These
tests put the ORT backbone exactly where the engine would call it: ``run_model`` for head and bare-base
rows (plain graph), and ``run_shared``'s one backbone call for LoRA rows too (LoRA graph), and check
every row of a mixed batch against the engine's own torch answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.engine import engine as engine_module
from serving.engine import forward as engine_forward
from serving.onnx_backbone import LoraWeights, OrtBackbone, stack_loras
from tests.test_engine_support import head_bundle, import_peft, save_lora
from training.onnx_export import export_base, export_lora_base

torch.set_num_threads(1)

HEADS = [  # (name, pooling, labels, hidden layer)
    ("intent-mean", "mean", ["a", "b", "c"], None),
    ("intent-cls", "cls", ["x", "y"], 16),
    ("route-pooler", "pooler", ["p", "q", "r", "s"], None),
    ("embed-head", "mean", None, None),
]
TEXTS = ["reset my password", "the invoice is wrong", "cancel it", "where is my parcel now please", "no"]


LORAS = [  # (name, rank, alpha, targets, labels): feature-extraction and SEQ_CLS LoRA tenants
    ("lora-qv", 8, 16, ["query", "value"], None),
    ("lora-q", 4, 4, ["query"], None),
    ("lora-cls", 6, 12, ["query", "value"], ["neg", "pos", "neu"]),
]


@pytest.fixture(scope="module")
def engine_store(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("onnx-engine")
    store = open_store(str(root / "store"))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    entry = store.get_base("tiny")
    for i, (name, pooling, labels, hidden) in enumerate(HEADS):
        store.put(head_bundle(entry, "acme", name, seed=i, labels=labels, pooling=pooling, hidden=hidden)[0])
    for i, (name, rank, alpha, targets, labels) in enumerate(LORAS):
        path = save_lora(
            tiny_bert_dir, root / name, 10 + i, rank, alpha, targets, len(labels) if labels else None
        )
        store.put(import_peft(path, "beta", name, entry, labels=labels))
    export_base(store, "tiny")
    export_lora_base(store, "tiny", targets=("query", "value"))
    return store


def _items() -> list[InferenceItem]:
    items = []
    for i, text in enumerate(TEXTS * 2):
        name, _, labels, _ = HEADS[i % len(HEADS)]
        items.append(InferenceItem("acme", name, "classify" if labels else "embed", text=text))
        items.append(InferenceItem("acme", None, "embed", text=text))  # bare base row in the same batch
    return items


def test_head_and_base_rows_on_ort_equal_torch(engine_store, monkeypatch):
    engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1))
    items = _items()
    torch_results = engine.infer(items)
    ort_bb = OrtBackbone.from_store(engine_store, engine_store.get_base("tiny"), threads=1)
    calls = []

    def ort_run_model(model, inputs):
        calls.append(int(inputs["input_ids"].shape[0]))
        return ort_bb.hidden_and_pooler(inputs)

    monkeypatch.setattr(engine_forward, "run_model", ort_run_model)
    ort_results = engine.infer(items)
    assert calls == [len(items)]  # one ORT call for the whole mixed batch
    for item, t, o in zip(items, torch_results, ort_results, strict=True):
        assert not isinstance(t, Exception) and not isinstance(o, Exception), (t, o)
        assert (o.adapter, o.version, o.digest) == (t.adapter, t.version, t.digest)
        if item.task == "classify":
            assert o.labels == t.labels
            np.testing.assert_allclose(o.scores, t.scores, atol=1e-4)
        else:
            np.testing.assert_allclose(o.embedding, t.embedding, atol=1e-4)


def onnx_run_shared(ort_lora):
    """``forward.run_shared`` with the proposed hook: one ORT LoRA-graph call instead of set_context +
    run_model, for batches of head, LoRA and bare-base rows. Everything else is the engine's own code."""

    def run_shared(backbone, rows, settings):
        plan, adapters = engine_forward.plan_rows(rows, backbone.num_layers)
        ordered = [rows[i] for i in plan.order]
        inputs = engine_forward.encode_rows(backbone, ordered, settings)
        lora_slots = [s for s, a in enumerate(adapters) if a.lora]
        stack = stack_loras(ort_lora.record, [LoraWeights.from_paths(adapters[s].lora) for s in lora_slots])
        to_stack = {s: i for i, s in enumerate(lora_slots)}
        index = np.array([to_stack.get(s, stack.no_adapter_slot) for s in plan.slot_of_position()])
        hidden, pooled = ort_lora.hidden_and_pooler(inputs, stack, index)
        mask = inputs.get("attention_mask")
        out = [None] * len(rows)
        for seg in plan.segments:
            adapter = adapters[seg.slot] if seg.slot >= 0 else None
            answers = engine_forward.finish_segment(seg, ordered, adapter, hidden, mask, pooled, settings)
            for pos, answer in zip(range(seg.start, seg.end), answers, strict=True):
                out[plan.order[pos]] = answer
        return out

    return run_shared


def test_lora_head_and_base_rows_on_the_ort_lora_graph_equal_torch(engine_store, monkeypatch):
    engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1))
    items = _items()
    for i, text in enumerate(TEXTS * 2):
        name, _, _, _, labels = LORAS[i % len(LORAS)]
        items.append(InferenceItem("beta", name, "classify" if labels else "embed", text=text))
    torch_results = engine.infer(items)
    ort_lora = OrtBackbone.from_store(
        engine_store, engine_store.get_base("tiny"), variant="lora-fp32", threads=1
    )
    ort_shared, batches = onnx_run_shared(ort_lora), []
    monkeypatch.setattr(
        engine_module, "run_shared", lambda b, rows, s: batches.append(len(rows)) or ort_shared(b, rows, s)
    )
    ort_results = engine.infer(items)
    assert batches == [len(items)]  # every row in one ORT call
    for item, t, o in zip(items, torch_results, ort_results, strict=True):
        assert not isinstance(t, Exception) and not isinstance(o, Exception), (t, o)
        assert (o.adapter, o.version, o.digest) == (t.adapter, t.version, t.digest)
        if item.task == "classify":
            assert o.labels == t.labels
            np.testing.assert_allclose(o.scores, t.scores, atol=1e-4)
        else:
            np.testing.assert_allclose(o.embedding, t.embedding, atol=1e-4)
