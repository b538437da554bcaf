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
from adapters_store.errors import IntegrityError
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
    engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1, runtime="torch"))
    items = _items()
    torch_results = engine.infer(items)
    ort_bb = OrtBackbone.from_store(engine_store, engine_store.get_base("tiny"), threads=1)
    calls = []

    def ort_run_model(model, inputs):
        calls.append(int(inputs["input_ids"].shape[0]))
        return ort_bb.hidden_and_pooler(inputs)

    monkeypatch.setattr(engine_forward, "run_model", ort_run_model)
    ort_results = engine.infer(items)
    # One ORT call for the whole mixed batch; head and bare-base rows on one text share a backbone row.
    assert calls == [len({item.text for item in items})]
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
    torch_engine = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1, runtime="torch"))
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


def test_runtime_auto_uses_the_export_when_there_is_a_usable_one(
    engine_store, tmp_path, tiny_bert_dir, caplog
):
    auto = Engine(engine_store, base="tiny", settings=EngineSettings(threads=1, runtime="auto"))
    assert auto.runtime == "onnx" and auto.ort is not None and auto.ort.lora is not None
    items = _items()
    _assert_same(
        items,
        Engine(engine_store, base="tiny", settings=EngineSettings(threads=1, runtime="torch")).infer(items),
        auto.infer(items),
    )
    assert auto.ort.calls == 1
    # a base never exported: torch, quietly
    bare = open_store(str(tmp_path / "bare"))
    bare.register_base(describe_base("tiny", tiny_bert_dir))
    assert Engine(bare, base="tiny", settings=EngineSettings(runtime="auto")).runtime == "torch"
    # a damaged export: 'auto' serves on torch and says why; an explicit 'onnx' refuses to start
    entry = bare.get_base("tiny")
    for name in ("backbone-fp32.onnx", "backbone-fp32.json"):
        bare.put_artifact(
            "tiny", entry.fingerprint, name, engine_store.get_artifact("tiny", entry.fingerprint, name)
        )
    graph = bytearray(bare.get_artifact("tiny", entry.fingerprint, "backbone-fp32.onnx"))
    graph[len(graph) // 2] ^= 1
    bare.put_artifact("tiny", entry.fingerprint, "backbone-fp32.onnx", bytes(graph))
    with caplog.at_level("WARNING"):
        assert Engine(bare, base="tiny", settings=EngineSettings(runtime="auto")).runtime == "torch"
    assert "not usable" in caplog.text
    with pytest.raises(IntegrityError):
        Engine(bare, base="tiny", settings=EngineSettings(runtime="onnx"))
