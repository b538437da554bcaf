"""A batch mixing every shared-backbone kind runs in ONE onnxruntime call, and each row equals the torch
engine's row and the tenant alone through PEFT (1e-4): heads, the bare base, LoRA of different ranks and
targets (one in several rank chunks), IA3 on both sides (feed-forward input, key/value output)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from adapters_store.errors import UnsupportedAdapter
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from serving.onnx_adapters import LoraSlots, LoraWeights, stack_loras
from serving.onnx_backbone import OrtBackbone
from tests.test_engine_support import (
    expected_alone,
    head_bundle,
    import_peft,
    peft_reference,
    result_values,
    save_ia3,
    save_lora,
)
from training.onnx_export import export_base, export_lora_base

torch.set_num_threads(1)
TOL = 1e-4
LABELS = ["neg", "neu", "pos"]
TEXTS = ["reset my password", "the invoice is wrong and late", "no", "where is my parcel now please"]
# (tenant, rank, alpha, targets, labels): ranks 2..8 in one batch, so the smaller ones are zero-padded
LORAS = [
    ("l-qv4", 4, 8, ["query", "value"], None),
    ("l-q8", 8, 16, ["query"], None),
    ("l-v2", 2, 6, ["value"], None),
    ("l-cls6", 6, 12, ["query", "value"], LABELS),
    ("l-qv20", 20, 10, ["query", "value"], None),  # 3 rank chunks (8 + 8 + 4 zero-padded)
]
# (tenant, targets, feedforward): training's default (both sides), output side only, input side only
IA3S = [
    ("i-default", ["key", "value", "output.dense"], ["output.dense"]),
    ("i-out", ["key", "value"], []),
    ("i-in", ["output.dense"], ["output.dense"]),
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("onnx-mixed")
    store = open_store(str(root / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    refs: dict[str, dict] = {}
    bundle, head = head_bundle(base, "h-cls", "a", 300, LABELS, hidden=16)
    store.put(bundle)
    refs["h-cls"] = {"head": head, "kind": "head-cls"}
    bundle, head = head_bundle(base, "h-emb", "a", 301, None, pooling="cls")
    store.put(bundle)
    refs["h-emb"] = {"head": head, "kind": "head-emb"}
    for i, (tenant, r, alpha, targets, labels) in enumerate(LORAS):
        n = len(labels) if labels else None
        d = save_lora(tiny_bert_dir, root / tenant, 10 + i, r, alpha, targets, n)
        store.put(import_peft(d, tenant, "a", base, labels=labels))
        refs[tenant] = {"peft": peft_reference(tiny_bert_dir, d, n), "kind": "logits" if n else "embed"}
    for i, (tenant, targets, ff) in enumerate(IA3S):
        d = save_ia3(tiny_bert_dir, root / tenant, seed=20 + i, targets=targets, feedforward=ff)
        store.put(import_peft(d, tenant, "a", base))
        refs[tenant] = {"peft": peft_reference(tiny_bert_dir, d), "kind": "embed"}
    export_base(store, "tiny")
    report = export_lora_base(store, "tiny", targets=("query", "value"))
    return store, refs, report


def _items(refs: dict) -> list[InferenceItem]:
    items = []
    for j, (tenant, ref) in enumerate(refs.items()):
        task = "classify" if ref["kind"] in ("logits", "head-cls") else "embed"
        items += [InferenceItem(tenant, "a", task, text=TEXTS[(j + k) % len(TEXTS)]) for k in range(2)]
    return items + [InferenceItem("anyone", None, "embed", text=t) for t in TEXTS[:2]]


def _np(result: InferenceResult) -> np.ndarray:
    return result_values(result).numpy()


def test_export_records_ia3_on_both_sides(mixed):
    _, _, report = mixed
    spec = report.manifest.lora
    assert spec.targets == ["attention.self.query", "attention.self.value"]
    assert spec.ia3_in == ["attention.output.dense", "output.dense"]  # PEFT's feed-forward rule
    assert spec.ia3_out == ["attention.self.key", "attention.self.value"]
    assert report.manifest.validation.max_scaled_diff <= 1e-4


def test_chunk_deltas_reach_their_rows_through_the_combine_matmul_not_a_scatter(mixed):
    """No ScatterND in the adapter graph: onnxruntime's ScatterND add races on duplicate indices (a
    LoRA of several chunks) on more than one thread; at MiniLM's sizes, 10 of 200 calls at 2 threads
    summed wrongly. A 0/1 [batch, chunks] matmul adds the deltas: per LoRA module the two chunk bmms
    and that combine."""
    import onnx

    from training.onnx_export import graph_file

    store, _, report = mixed
    entry = store.get_base("tiny")
    graph = onnx.load_from_string(store.get_artifact("tiny", entry.fingerprint, graph_file("lora-fp32")))
    assert not any(n.op_type.startswith("Scatter") for n in graph.graph.node)
    assert report.manifest.lora.delta_add == "combine"
    layers = 2  # the tiny BERT's
    delta_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and "/query/" in n.name]
    assert len([n for n in delta_matmuls if "/base/" not in n.name]) == 3 * layers


def test_graph_that_adds_deltas_with_a_scatter_is_refused_and_rebuilt(tmp_path, tiny_bert_dir):
    """A graph recorded as ``delta_add: scatter`` (exported for a short while on 2026-12-01) is not fed:
    its LoRA rows run on torch, the start note says why, and the next export rebuilds it. A record
    without the field (every graph before it) is the combine graph: served and reused."""
    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    d = save_lora(tiny_bert_dir, tmp_path / "lora", 8, 4, 8, ["query", "value"])
    store.put(import_peft(d, "l", "a", base))
    export_base(store, "tiny")
    assert not export_lora_base(store, "tiny", targets=("query", "value")).reused
    _as_older_exporter_wrote(store, base, ("delta_add",))
    assert export_lora_base(store, "tiny", targets=("query", "value")).reused
    row = InferenceItem("l", "a", "embed", text="hi")
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    engine.infer([row])
    assert engine.ort.calls == 1 and engine.ort.fallbacks == {}
    name = "backbone-lora-fp32.json"
    record = json.loads(store.get_artifact(base.name, base.fingerprint, name))
    record["lora"]["delta_add"] = "scatter"
    store.put_artifact(base.name, base.fingerprint, name, json.dumps(record).encode())
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    assert "ScatterND" in engine.runtime_note
    engine.infer([row])
    assert engine.ort.calls == 0 and engine.ort.fallbacks == {"outdated adapter graph": 1}
    report = export_lora_base(store, "tiny", targets=("query", "value"))
    assert not report.reused and report.manifest.lora.delta_add == "combine"


def test_every_kind_in_one_ort_call_equals_torch_and_peft(mixed, tiny_bert_dir):
    from transformers import AutoTokenizer

    store, refs, _ = mixed
    items = _items(refs)
    torch_engine = Engine(
        store, base="tiny", settings=EngineSettings(threads=1, max_batch_rows=64, runtime="torch")
    )
    ort_engine = Engine(
        store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx", max_batch_rows=64)
    )
    want, got = torch_engine.infer(items), ort_engine.infer(items)
    assert ort_engine.ort.calls == 1 and ort_engine.ort.fallbacks == {}  # ONE ORT call, nothing on torch
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for item, w, g in zip(items, want, got, strict=True):
        assert (g.adapter, g.digest) == (w.adapter, w.digest)
        np.testing.assert_allclose(_np(g), _np(w), atol=TOL, err_msg=f"{item.tenant} vs torch")
        if item.adapter is not None:
            alone = expected_alone(refs[item.tenant], item.text, tiny_bert_dir, tok).numpy()
            np.testing.assert_allclose(_np(g), alone, atol=TOL, err_msg=f"{item.tenant} vs alone")
    # the adapters really change the backbone: no two LoRA/IA3 tenants agree on the same text
    same = [InferenceItem(t, "a", "embed", text=TEXTS[0]) for t, *_ in [*LORAS[:3], *IA3S]]
    vecs = [_np(r) for r in ort_engine.infer(same)]
    assert min(np.abs(a - b).max() for i, a in enumerate(vecs) for b in vecs[:i]) > 1e-3
    writes = ort_engine.ort.slots.writes
    again = ort_engine.infer(items)
    assert ort_engine.ort.slots.writes == writes  # resident LoRA and IA3 slots are not packed again
    for g, a in zip(got, again, strict=True):
        np.testing.assert_allclose(_np(a), _np(g), atol=1e-6)


def test_ia3_outside_the_graph_falls_back_to_torch(mixed, tiny_bert_dir, tmp_path):
    store, _, _ = mixed
    base = store.get_base("tiny")
    d = save_ia3(tiny_bert_dir, tmp_path / "iq", seed=40, targets=["query"], feedforward=[])
    store.put(import_peft(d, "i-query", "a", base))
    items = [
        InferenceItem("i-query", "a", "embed", text=TEXTS[1]),
        InferenceItem("l-q8", "a", "embed", text="x"),
    ]
    ort_engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    got = ort_engine.infer(items)
    assert ort_engine.ort.calls == 0 and ort_engine.ort.fallbacks == {"adapter outside the graph": 1}
    want = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="torch")).infer(items)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_np(g), _np(w), atol=TOL)
    record = ort_engine.ort.lora.record
    with pytest.raises(UnsupportedAdapter, match="IA3 output-side modules \\['attention.self.query'\\]"):
        stack_loras(record, [LoraWeights.from_bundle(store.get("i-query/a"))])


def test_ia3_slots_equal_a_fresh_stack_and_reset_to_identity(mixed):
    """A slot that held an IA3 adapter and is then reused by a LoRA gets unit vectors back."""
    store, _, _ = mixed
    bb = OrtBackbone.from_store(store, store.get_base("tiny"), variant="lora-fp32", threads=1)
    weights = {t: LoraWeights.from_bundle(store.get(f"{t}/a")) for t in ("i-default", "i-in", "l-q8", "l-v2")}
    slots = LoraSlots(bb.record, capacity=2)
    ids = np.random.default_rng(3).integers(1000, 30000, size=(3, 7))
    mask = np.ones_like(ids)
    for batch in (["i-default", "i-in"], ["l-q8", "l-v2"], ["i-in", "l-q8"]):
        stack, assigned = slots.assign(batch, weights.__getitem__)
        fresh = stack_loras(bb.record, [weights[t] for t in batch])
        got = bb.features(ids, mask, stack, np.array([*assigned, stack.no_adapter_slot]))
        want = bb.features(ids, mask, fresh, np.array([0, 1, fresh.no_adapter_slot]))
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-5, err_msg=str(batch))
    base = bb.features(ids, mask)  # no stack: the identity slot is the plain base
    np.testing.assert_allclose(got.mean[2], base.mean[2], atol=1e-5)


def test_graph_equals_its_torch_twin_on_resident_slots(mixed, tiny_bert_dir):
    """The stored graph and LoraTextFeatures (what export validated against) agree on served stacks."""
    from transformers import AutoModel

    from training.onnx_export.lora_graph import LoraTextFeatures

    store, _, _ = mixed
    bb = OrtBackbone.from_store(store, store.get_base("tiny"), variant="lora-fp32", threads=1)
    tenants = ["i-default", "l-q8", "i-in", "l-v2", "i-out"]
    slots = LoraSlots(bb.record, capacity=8)
    stack, assigned = slots.assign(tenants, lambda t: LoraWeights.from_bundle(store.get(f"{t}/a")))
    index = np.array([*assigned, stack.no_adapter_slot], np.int64)
    ids = np.random.default_rng(4).integers(1000, 30000, size=(len(index), 9))
    mask = np.ones_like(ids)
    twin = LoraTextFeatures.for_record(AutoModel.from_pretrained(tiny_bert_dir), bb.record.lora).eval()
    with torch.inference_mode():
        ref = twin.run_named(torch.from_numpy(ids), torch.from_numpy(mask), stack.inputs(index))
    np.testing.assert_allclose(bb.features(ids, mask, stack, index).mean, ref[0].numpy(), atol=1e-5)


def test_graph_stored_before_ia3_still_serves_and_is_rebuilt(tmp_path, tiny_bert_dir):
    """A lora-fp32 manifest written before the IA3 fields existed loads; its IA3 rows run on torch; the
    next export (base register / demo) rebuilds it with IA3."""
    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    d = save_ia3(tiny_bert_dir, tmp_path / "ia3", seed=7)
    store.put(import_peft(d, "i", "a", base))
    d = save_lora(tiny_bert_dir, tmp_path / "lora", 8, 4, 8, ["query", "value"])
    store.put(import_peft(d, "l", "a", base))
    export_base(store, "tiny")
    export_lora_base(store, "tiny", targets=("query", "value"), ia3=([], []))
    _as_older_exporter_wrote(store, base, ("ia3_input", "ia3_in", "ia3_out"))
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    assert "graph without IA3" in engine.runtime_note
    lora_row, ia3_row = (
        InferenceItem("l", "a", "embed", text="hi"),
        InferenceItem("i", "a", "embed", text="hi"),
    )
    engine.infer([lora_row])
    engine.infer([lora_row, ia3_row])
    assert engine.ort.calls == 1 and engine.ort.fallbacks == {"adapter outside the graph": 1}
    report = export_lora_base(store, "tiny", targets=("query", "value"))
    assert not report.reused and report.manifest.lora.ia3_out == [
        "attention.self.key",
        "attention.self.value",
    ]
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    engine.infer([lora_row, ia3_row])
    assert engine.ort.calls == 1 and engine.ort.fallbacks == {}


def test_a_call_multiplies_only_the_lora_rows_own_rank_chunks(mixed):
    """Rows pay for their adapter's rank in chunks of CHUNK_RANK, rows without LoRA (IA3, head, bare)
    for none: the (row, chunk) pairs fed to the graph are exactly those."""
    from serving.onnx_adapters import CHUNK_RANK

    store, _, _ = mixed
    bb = OrtBackbone.from_store(store, store.get_base("tiny"), variant="lora-fp32", threads=1)
    slots = LoraSlots(bb.record, capacity=4)
    tenants = ["l-qv20", "i-default", "l-q8"]
    stack, (s20, s_ia3, s8) = slots.assign(tenants, lambda t: LoraWeights.from_bundle(store.get(f"{t}/a")))
    assert CHUNK_RANK == 8 and [len(stack.chunks[s]) for s in (s20, s_ia3, s8)] == [3, 0, 1]
    rows = [s8, stack.no_adapter_slot, s20, s_ia3, s20]
    fed = stack.inputs(np.array(rows))
    assert fed["lora_rows"].tolist() == [0, 2, 2, 2, 4, 4, 4]
    assert fed["lora_chunks"].tolist() == [*stack.chunks[s8], *stack.chunks[s20], *stack.chunks[s20]]
    assert fed["adapter_index"].tolist() == rows  # the IA3 slot of each row
    # an evicted adapter's chunks are reused; the stacks only grow for what the resident ones need
    slots = LoraSlots(bb.record, capacity=2)
    stack, _ = slots.assign(["l-qv20"], lambda t: LoraWeights.from_bundle(store.get(f"{t}/a")))
    size, freed = stack.arrays["lora_a.0.attention_self_query"].shape[0], set(stack.chunks[0])
    stack, (_, s4) = slots.assign(["l-q8", "l-qv4"], lambda t: LoraWeights.from_bundle(store.get(f"{t}/a")))
    assert stack.arrays["lora_a.0.attention_self_query"].shape[0] == size and set(stack.chunks[s4]) <= freed


def test_a_call_without_lora_rows_runs_on_the_graph_and_equals_torch(mixed):
    """IA3, head and bare-base rows only: zero LoRA chunks in the call (empty gathers and GEMMs)."""
    store, _, _ = mixed
    items = [InferenceItem(t, "a", "embed", text=TEXTS[i]) for i, (t, *_) in enumerate(IA3S)]
    items += [InferenceItem("h-emb", "a", "embed", text="hi"), InferenceItem("x", None, "embed", text="no")]
    torch_engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="torch"))
    ort_engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    got, want = ort_engine.infer(items), torch_engine.infer(items)
    assert ort_engine.ort.calls == 1 and ort_engine.ort.fallbacks == {}
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_np(g), _np(w), atol=TOL)


def test_graph_with_the_older_input_layout_runs_on_torch_until_rebuilt(mixed, tmp_path, tiny_bert_dir):
    """A record without ``layout`` (one slot per row, ranks padded to the largest) is not fed: LoRA and
    IA3 rows run on torch, the runtime note says why, and the next export rebuilds the graph."""
    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    d = save_lora(tiny_bert_dir, tmp_path / "lora", 8, 4, 8, ["query", "value"])
    store.put(import_peft(d, "l", "a", base))
    export_base(store, "tiny")
    export_lora_base(store, "tiny", targets=("query", "value"))
    _as_older_exporter_wrote(store, base, ("layout", "rows_input", "chunks_input"))
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    assert "older 'slot-per-row' input layout" in engine.runtime_note
    row = InferenceItem("l", "a", "embed", text="hi")
    want = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="torch")).infer([row])
    np.testing.assert_allclose(_np(engine.infer([row])[0]), _np(want[0]), atol=TOL)
    assert engine.ort.calls == 0 and engine.ort.fallbacks == {"outdated adapter graph": 1}
    report = export_lora_base(store, "tiny", targets=("query", "value"))
    assert not report.reused and report.manifest.lora.layout == "rank-chunks"
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, runtime="onnx"))
    engine.infer([row])
    assert engine.ort.calls == 1 and engine.ort.fallbacks == {}


def _as_older_exporter_wrote(store, base, missing: tuple[str, ...]) -> None:
    """Rewrite the stored LoRA graph record without the fields an older exporter did not write."""
    name = "backbone-lora-fp32.json"
    old = json.loads(store.get_artifact(base.name, base.fingerprint, name))
    for key in missing:
        del old["lora"][key]
    store.put_artifact(base.name, base.fingerprint, name, json.dumps(old).encode())
