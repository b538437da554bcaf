"""Engine on ORT: the ONNX backbone swapped in at the engine's one backbone call gives the torch answers.

``EngineSettings(runtime="onnx")`` runs the shared pass on the base's validated exports (plain graph for
head and bare-base rows, the LoRA graph when LoRA rows are in the batch); every row of a mixed batch must
equal the engine's own torch answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.engine import forward as engine_forward
from serving.onnx_backbone import OrtBackbone
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
    _assert_same(items, torch_results, ort_results)


def _assert_same(items, torch_results, ort_results) -> None:
    for item, t, o in zip(items, torch_results, ort_results, strict=True):
        assert not isinstance(t, Exception) and not isinstance(o, Exception), (t, o)
        assert (o.adapter, o.version, o.digest) == (t.adapter, t.version, t.digest)
        if item.task == "classify":
            assert o.labels == t.labels
            np.testing.assert_allclose(o.scores, t.scores, atol=1e-4)
        else:
            np.testing.assert_allclose(o.embedding, t.embedding, atol=1e-4)


def test_engine_runtime_onnx_equals_torch(engine_store):
    """The real switch: EngineSettings(runtime='onnx') serves head, LoRA and bare-base rows on ORT."""
    torch_engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1))
    ort_engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    heads_only = _items()
    with_lora = heads_only + [
        InferenceItem("beta", name, "classify" if labels else "embed", text=text)
        for (name, _, _, _, labels), text in zip(LORAS, TEXTS, strict=False)
    ]
    for items in (heads_only, with_lora):
        _assert_same(items, torch_engine.infer(items), ort_engine.infer(items))
    assert ort_engine.ort is not None and ort_engine.ort.lora is not None
    assert ort_engine.ort.calls == 2  # both batches ran on ORT, one call each
    writes = ort_engine.ort.slots.writes
    assert writes > 0
    _assert_same(with_lora, torch_engine.infer(with_lora), ort_engine.infer(with_lora))
    assert ort_engine.ort.slots.writes == writes  # resident LoRAs are not packed again
