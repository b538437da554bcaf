"""Engine on ORT: the ONNX backbone swapped in at the engine's one backbone call gives the torch answers.

The engine has no ``runtime="onnx"`` switch yet (serving/engine is not the ONNX helper's file); this
test swaps ``serving.engine.forward.run_model`` for ``OrtBackbone.hidden_and_pooler``, which is exactly
the hook the engine needs for head-kind and bare-base rows, and checks every row of a mixed batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.engine import forward as engine_forward
from serving.onnx_backbone import OrtBackbone
from tests.test_engine_support import head_bundle
from training.onnx_export import export_base

torch.set_num_threads(1)

HEADS = [  # (name, pooling, labels, hidden layer)
    ("intent-mean", "mean", ["a", "b", "c"], None),
    ("intent-cls", "cls", ["x", "y"], 16),
    ("route-pooler", "pooler", ["p", "q", "r", "s"], None),
    ("embed-head", "mean", None, None),
]
TEXTS = ["reset my password", "the invoice is wrong", "cancel it", "where is my parcel now please", "no"]


@pytest.fixture(scope="module")
def engine_store(tmp_path_factory, tiny_bert_dir):
    store = open_store(str(tmp_path_factory.mktemp("onnx-engine")))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    entry = store.get_base("tiny")
    for i, (name, pooling, labels, hidden) in enumerate(HEADS):
        store.put(head_bundle(entry, "acme", name, seed=i, labels=labels, pooling=pooling, hidden=hidden)[0])
    export_base(store, "tiny")
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
