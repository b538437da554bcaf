"""Every row of one mixed batch equals that tenant's model run alone (plain PEFT / plain torch), 1e-4 fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters_store import describe_base, open_store
from adapters_store.errors import IncompatibleBase, IntegrityError, NotFound, ValidationError
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from tests.test_engine_support import (
    expected_alone,
    head_bundle,
    import_peft,
    mean_pool,
    partial_bundle,
    peft_reference,
    result_values,
    save_ia3,
    save_lora,
    tokenizer,
)

torch.set_num_threads(1)
TOL = 1e-4
TEXTS = [
    "the cat sat on the mat",
    "refund my order now please, it arrived broken and late",
    "hello",
    "what is the weather in paris tomorrow morning",
]
LORA_TARGETS = [["query", "value"], ["key"], ["query", "value", "intermediate.dense"], ["dense"]]
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir, other_tiny_bert_dir):
    """A local store with the tiny base and ~27 tenants of every kind; expected outputs per tenant."""
    root = tmp_path_factory.mktemp("engine-eq")
    store = open_store(root / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    refs: dict[str, dict] = {}
    for i in range(16):
        d = save_lora(
            tiny_bert_dir,
            root / f"lora{i}",
            seed=i,
            r=(4, 8, 16)[i % 3],
            alpha=(8, 16, 4)[i % 3] + i,
            targets=LORA_TARGETS[i % 4],
        )
        store.put(import_peft(d, f"t{i:02d}", "emb", base))
        refs[f"t{i:02d}"] = {"name": "emb", "peft": peft_reference(tiny_bert_dir, d), "kind": "embed"}
    for i in range(2):
        d = save_lora(
            tiny_bert_dir,
            root / f"cls{i}",
            seed=100 + i,
            r=8,
            alpha=16,
            targets=["query", "value"],
            num_labels=3,
        )
        store.put(import_peft(d, f"c{i}", "sent", base, labels=LABELS))
        refs[f"c{i}"] = {
            "name": "sent",
            "peft": peft_reference(tiny_bert_dir, d, num_labels=3),
            "kind": "logits",
        }
    ia3_cfgs = [
        (["key", "value", "output.dense"], ["output.dense"]),
        (["query", "intermediate.dense"], ["intermediate.dense"]),
        (["value", "pooler.dense"], []),
    ]
    for i, (targets, ff) in enumerate(ia3_cfgs):
        d = save_ia3(tiny_bert_dir, root / f"ia3{i}", seed=200 + i, targets=targets, feedforward=ff)
        store.put(import_peft(d, f"i{i}", "emb", base))
        refs[f"i{i}"] = {"name": "emb", "peft": peft_reference(tiny_bert_dir, d), "kind": "embed"}
    bundle, head = head_bundle(base, "h0", "intent", 300, LABELS, hidden=16)
    store.put(bundle)
    refs["h0"] = {"name": "intent", "head": head, "kind": "head-cls"}
    bundle, head = head_bundle(base, "h1", "vec", 301, None, pooling="cls")
    store.put(bundle)
    refs["h1"] = {"name": "vec", "head": head, "kind": "head-emb"}
    for i, first in enumerate((1, 0)):
        bundle, top, head = partial_bundle(tiny_bert_dir, base, f"p{i}", "top", 400 + i, first, LABELS)
        store.put(bundle)
        refs[f"p{i}"] = {"name": "top", "top": top, "head": head, "kind": "partial"}
    other = store.register_base(describe_base("other", other_tiny_bert_dir))
    bundle, _ = head_bundle(other, "x0", "foreign", 500, LABELS)
    store.put(bundle)
    return store, refs, tiny_bert_dir


@pytest.fixture(scope="module")
def engine(world):
    store, _, _ = world
    return Engine(store, base="tiny", settings=EngineSettings(max_batch_rows=128, threads=1))


def _items(refs: dict) -> list[InferenceItem]:
    items = []
    for j, (tenant, ref) in enumerate(refs.items()):
        task = "classify" if ref["kind"] in ("logits", "head-cls", "partial") else "embed"
        for k in range(2):
            items.append(InferenceItem(tenant, ref["name"], task, text=TEXTS[(j + k) % len(TEXTS)]))
    return items


@pytest.mark.parametrize("segment_limit", [0, 1_000_000], ids=["gathered-bmm", "per-segment"])
def test_mixed_batch_of_every_kind_matches_each_tenant_alone(world, engine, monkeypatch, segment_limit):
    from transformers import BertModel

    from serving.engine import lora_layers

    monkeypatch.setattr(lora_layers, "SEGMENT_LIMIT", segment_limit)

    store, refs, base_dir = world
    tok, base_model = tokenizer(base_dir), BertModel.from_pretrained(base_dir).eval()
    items = _items(refs) + [InferenceItem("anyone", None, "embed", text=t) for t in TEXTS[:3]]
    calls = []
    hook = engine.backbone.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        results = engine.infer(items)
    finally:
        hook.remove()
    assert len(calls) == 1, "every row must share one backbone forward pass"
    worst = 0.0
    outputs: dict[str, torch.Tensor] = {}
    for item, result in zip(items, results, strict=True):
        if item.adapter is None:
            enc = tok([item.text], return_tensors="pt")
            with torch.inference_mode():
                want = F.normalize(
                    mean_pool(base_model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1
                )[0]
            assert result.adapter is None and result.version is None
        else:
            want = expected_alone(refs[item.tenant], item.text, base_dir, tok, base_model)
            assert result.adapter == f"{item.tenant}/{item.adapter}" and result.version == 1
            assert result.digest == store.resolve(f"{item.tenant}/{item.adapter}").digest
        diff = (result_values(result) - want).abs().max().item()
        worst = max(worst, diff)
        assert diff < TOL, f"{item.tenant}: max abs diff {diff}"
        outputs.setdefault(item.text, []).append(result_values(result))
    # The adapters really differ: the same sentence gives different answers across tenants.
    same_text = [o for o in outputs[TEXTS[0]] if o.numel() == outputs[TEXTS[0]][0].numel()]
    assert max((o - same_text[0]).abs().max().item() for o in same_text[1:]) > 1e-2


def test_classification_rows_rank_every_label(world, engine):
    _, refs, _ = world
    [res] = engine.infer([InferenceItem("c0", "sent", "classify", text=TEXTS[1])])
    assert sorted(res.labels) == sorted(LABELS)
    assert res.scores == sorted(res.scores, reverse=True)
    assert abs(sum(res.scores) - 1.0) < 1e-5
    best = max(range(3), key=lambda i: res.logits[i])
    assert res.labels[0] == LABELS[best]


def test_bad_rows_get_specific_errors_and_the_rest_are_answered(world, engine, tmp_path):
    store, refs, base_dir = world
    good = InferenceItem("t01", "emb", "embed", text=TEXTS[0])
    items = [
        good,
        InferenceItem("nobody", "emb", "embed", text="x y"),
        InferenceItem("t01", "missing", "embed", text="x y"),
        InferenceItem("x0", "foreign", "classify", text="x y"),
        InferenceItem(None, None, "embed", text="x"),  # type: ignore[arg-type]
        InferenceItem("t02", None, "classify", text="x y"),
        InferenceItem("t02", "emb", "classify", text="x y"),
        InferenceItem("t02", "emb", "embed", text=""),
        InferenceItem("c1", "sent", "classify", text=TEXTS[2]),
    ]
    res = engine.infer(items)
    assert isinstance(res[1], NotFound) and isinstance(res[2], NotFound)
    assert isinstance(res[3], IncompatibleBase)
    assert res[4].status == 400
    assert all(isinstance(r, ValidationError) for r in res[5:8])
    for i in (0, 8):
        assert isinstance(res[i], InferenceResult)
    want = expected_alone(refs["c1"], TEXTS[2], base_dir, tokenizer(base_dir), None)
    assert (result_values(res[8]) - want).abs().max().item() < TOL


def test_corrupted_file_fails_its_row_only(world, tiny_bert_dir, tmp_path):
    store, refs, base_dir = world
    manifest = store.resolve("t05/emb")
    digest = manifest.files["adapter_model.safetensors"].sha256
    blob = next(p for p in store.root.rglob(digest))
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    fresh = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    res = fresh.infer(
        [InferenceItem("t05", "emb", "embed", text="a b"), InferenceItem("t06", "emb", "embed", text="a b")]
    )
    assert isinstance(res[0], IntegrityError)
    assert isinstance(res[1], InferenceResult)
    assert fresh.cache_stats()["load_failures"] == 1


@pytest.fixture(scope="module")
def grouped_world(tmp_path_factory, tiny_bert_dir):
    """LoRA tenants that share shapes (so the plan groups them), a partial tenant and a head tenant."""
    root = tmp_path_factory.mktemp("engine-grouped")
    store = open_store(root / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    refs: dict[str, dict] = {}
    # g0-g3: r=8 on query+value; g4-g5: r=4 on query+value; g6: r=8 on key only (another shape)
    shapes = [(8, ["query", "value"])] * 4 + [(4, ["query", "value"])] * 2 + [(8, ["key"])]
    for i, (r, targets) in enumerate(shapes):
        d = save_lora(tiny_bert_dir, root / f"g{i}", seed=600 + i, r=r, alpha=2 * r + i, targets=targets)
        store.put(import_peft(d, f"g{i}", "emb", base))
        refs[f"g{i}"] = {"name": "emb", "peft": peft_reference(tiny_bert_dir, d), "kind": "embed"}
    bundle, top, head = partial_bundle(tiny_bert_dir, base, "p0", "top", 700, 1, LABELS)
    store.put(bundle)
    refs["p0"] = {"name": "top", "top": top, "head": head, "kind": "partial"}
    bundle, head = head_bundle(base, "h0", "intent", 701, LABELS)
    store.put(bundle)
    refs["h0"] = {"name": "intent", "head": head, "kind": "head-cls"}
    return store, refs, tiny_bert_dir


# rows per tenant: equal-shaped tenants with 1, 2, 2, 3 rows (g1+g2 form one run), two 2-row r=4 ones
# (another run), texts of different lengths in every run, and a partial tenant that must stay last.
GROUPED_ROWS = {"g0": 1, "g1": 2, "g2": 2, "g3": 3, "g4": 2, "g5": 2, "g6": 2, "p0": 2, "h0": 1}


def test_grouped_lora_segments_match_each_tenant_alone(grouped_world, monkeypatch):
    """Adjacent equal-shaped LoRA segments run as one bmm pair per module; each row still equals its
    tenant alone, and rows of other tenants (partial, head, bare base) get no LoRA delta."""
    from transformers import BertModel

    from serving.engine import lora_layers

    store, refs, base_dir = grouped_world
    engine = Engine(store, base="tiny", settings=EngineSettings(max_batch_rows=64, threads=1))
    runs = []
    real_runs_of = lora_layers.runs_of

    def spy(*args, **kwargs):
        out = real_runs_of(*args, **kwargs)
        runs.extend(r for rs in out.values() for r in rs)
        return out

    monkeypatch.setattr("serving.engine.forward.runs_of", spy)
    items = [
        InferenceItem(
            t, refs[t]["name"], "classify" if t in ("p0", "h0") else "embed", text=TEXTS[(j + k) % 4]
        )
        for j, (t, n) in enumerate(GROUPED_ROWS.items())
        for k in range(n)
    ]
    items.append(InferenceItem("anyone", None, "embed", text=TEXTS[3]))
    results = engine.infer(items)
    # The two runs of 2 segments x 2 rows, in each of query and value of every layer.
    layers = engine.backbone.num_layers
    assert sorted(r.end - r.start for r in runs if r.count == 2) == [4] * (4 * layers)
    tok, base_model = tokenizer(base_dir), BertModel.from_pretrained(base_dir).eval()
    for item, result in zip(items, results, strict=True):
        assert isinstance(result, InferenceResult), result
        if item.adapter is None:
            enc = tok([item.text], return_tensors="pt")
            with torch.inference_mode():
                hidden = base_model(**enc).last_hidden_state
            want = F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)[0]
        else:
            want = expected_alone(refs[item.tenant], item.text, base_dir, tok, base_model)
        diff = (result_values(result) - want).abs().max().item()
        assert diff < TOL, f"{item.tenant}: max abs diff {diff}"
