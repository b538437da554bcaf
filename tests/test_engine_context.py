"""A batch's per-wrapper context (LoRA runs, IA3 rows, partial blocks) never outlives its pass."""

from __future__ import annotations

import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from serving.engine import forward as fw
from tests.test_engine_support import import_peft, partial_bundle, save_ia3, save_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("ctx")
    store = open_store(str(root / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(import_peft(save_lora(tiny_bert_dir, root / "l", 1, 4, 8, ["query", "value"]), "l", "a", base))
    ia3 = save_ia3(tiny_bert_dir, root / "i", seed=2)
    store.put(import_peft(ia3, "i", "a", base))
    store.put(partial_bundle(tiny_bert_dir, base, "p", "a", 3, 1, ["x", "y"])[0])
    return Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="torch"))


def _items():
    return [
        InferenceItem("l", "a", "embed", text="one"),
        InferenceItem("i", "a", "embed", text="two"),
        InferenceItem("p", "a", "classify", text="three"),
        InferenceItem("anyone", None, "embed", text="four"),
    ]


def _contexts(engine: Engine) -> list[str]:
    bb = engine.backbone
    left = [
        p
        for p, w in bb.linears.items()
        if w.lora or w.lora_rows is not None or w.ia3_in is not None or w.ia3_out is not None
    ]
    return left + [f"layer {layer.index}" for layer in bb.layers if layer.own or layer.base_rows is not None]


def test_every_wrapper_is_back_on_the_base_path_after_a_mixed_pass(engine):
    touched = []
    real = fw.set_context

    def spy(*args):
        touched.append(real(*args))
        return touched[-1]

    fw.set_context = spy
    try:
        results = engine.infer(_items())
    finally:
        fw.set_context = real
    assert all(isinstance(r, InferenceResult) for r in results), results
    # LoRA on query/value, IA3 on key/value/output.dense and the partial's layer 1 were all set ...
    assert len(touched) == 1 and any(hasattr(w, "own") for w in touched[0]) and len(touched[0]) > 4
    assert _contexts(engine) == []  # ... and cleared


def test_a_failure_while_setting_contexts_leaves_none_behind(engine, monkeypatch):
    def broken(*args):  # after every Linear wrapper got its context
        raise RuntimeError("partial segments are not a suffix of the batch; plan_rows is broken")

    monkeypatch.setattr(fw, "_set_layer_context", broken)
    results = engine.infer(_items())
    assert not any(isinstance(r, InferenceResult) for r in results[:3])  # reported on the rows
    assert _contexts(engine) == []
    monkeypatch.undo()
    assert all(isinstance(r, InferenceResult) for r in engine.infer(_items()))
