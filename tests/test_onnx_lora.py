"""LoRA in ONNX: one ORT call over rows of several LoRA tenants equals each tenant alone through PEFT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from adapters_store import describe_base, open_store
from adapters_store.errors import UnsupportedAdapter, ValidationError
from adapters_store.peft_import import import_peft_dir
from serving.onnx_backbone import (
    LoraSlots,
    LoraWeights,
    OrtBackbone,
    OrtLoraBackbone,
    load_export,
    stack_loras,
)
from training.onnx_export.lora_graph import export_lora_base

torch.set_num_threads(1)

# (name, rank, alpha, targets, extra LoraConfig fields): ranks, alphas and target sets all differ
ADAPTERS = [
    ("qv-r4", 4, 8, ["query", "value"], {}),
    ("q-r8", 8, 16, ["query"], {}),
    ("v-r2-rs", 2, 4, ["value"], {"use_rslora": True}),
    ("qv-r6-pat", 6, 6, ["query", "value"], {"alpha_pattern": {"value": 24}}),
    ("qv-r1", 1, 2, ["query", "value"], {}),
]


def _save_peft(base_dir, out_dir, rank, alpha, targets, extra, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(
        AutoModel.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **extra),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B is zero at init: make every adapter really change the output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("onnx-lora")
    store = open_store(str(root / "store"))
    entry = store.register_base(describe_base("tiny", tiny_bert_dir))
    entry = store.get_base("tiny")
    dirs = {}
    for i, (name, rank, alpha, targets, extra) in enumerate(ADAPTERS):
        dirs[name] = _save_peft(tiny_bert_dir, root / name, rank, alpha, targets, extra, seed=i)
        store.put(import_peft_dir(dirs[name], "acme", name, entry, task="feature-extraction"))
    report = export_lora_base(store, "tiny", targets=("query", "value"))
    return store, entry, dirs, report


def _peft_reference(base_dir, dirs):
    from peft import PeftModel
    from transformers import AutoModel

    names = list(dirs)
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(base_dir), dirs[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model.eval()


def _row_alone(model, ids, mask):
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids[None]), attention_mask=torch.from_numpy(mask[None]))
    m = torch.from_numpy(mask[None]).unsqueeze(-1).float()
    mean = (out.last_hidden_state * m).sum(1) / m.sum(1)
    return mean[0].numpy(), out.pooler_output[0].numpy()


def test_lora_export_is_validated_and_described(lora_setup):
    _, _, _, report = lora_setup
    m = report.manifest
    assert m.variant == "lora-fp32" and m.validation.max_scaled_diff <= 1e-4
    assert m.lora.targets == ["attention.self.query", "attention.self.value"] and m.lora.num_layers == 2


def test_mixed_batch_matches_peft_row_by_row(lora_setup, tiny_bert_dir):
    store, entry, dirs, _ = lora_setup
    bb = OrtBackbone.from_store(store, entry, variant="lora-fp32", threads=1)
    assert isinstance(bb, OrtLoraBackbone)
    names = list(dirs)
    weights = [LoraWeights.from_bundle(store.get(f"acme/{n}")) for n in names]
    stack = stack_loras(bb.record, weights)
    assert stack.rank == 8 and stack.no_adapter_slot == len(names)
    # 12 rows: every adapter twice (shuffled) + two rows without an adapter
    slots = np.array([0, 3, 1, 5, 2, 4, 0, 1, 5, 2, 3, 4])
    rng = np.random.default_rng(11)
    ids = rng.integers(1000, 30000, size=(12, 17))
    lengths = rng.integers(3, 18, size=12)
    mask = (np.arange(17)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    feats = bb.features(ids, mask, stack, slots)
    peft_model = _peft_reference(tiny_bert_dir, dirs)
    for row, slot in enumerate(slots):
        if slot == stack.no_adapter_slot:
            with peft_model.disable_adapter():
                mean, pooler = _row_alone(peft_model, ids[row], mask[row])
        else:
            peft_model.set_adapter(names[slot])
            mean, pooler = _row_alone(peft_model, ids[row], mask[row])
        np.testing.assert_allclose(feats.mean[row], mean, atol=1e-4, err_msg=f"row {row} slot {slot}")
        np.testing.assert_allclose(feats.pooler[row], pooler, atol=1e-4, err_msg=f"row {row} slot {slot}")
    # and the adapters really differ from each other and from the base
    same_text = bb.features(np.repeat(ids[:1], 6, 0), np.repeat(mask[:1], 6, 0), stack, np.arange(6))
    spread = [np.abs(same_text.mean[i] - same_text.mean[j]).max() for i in range(6) for j in range(i)]
    assert min(spread) > 1e-4  # far above float noise (~1e-6)
    base = bb.features(ids, mask)  # no stack: every row gets zero delta
    assert min(np.abs(feats.mean[r] - base.mean[r]).max() for r in range(12) if slots[r] != 5) > 1e-4


def test_adapter_targeting_a_module_outside_the_graph_is_refused(lora_setup, tiny_bert_dir, tmp_path):
    store, entry, _, _ = lora_setup
    d = _save_peft(tiny_bert_dir, tmp_path / "k", 4, 8, ["key"], {}, seed=9)
    store.put(import_peft_dir(d, "acme", "k-only", entry, task="feature-extraction"))
    bb = OrtBackbone.from_store(store, entry, variant="lora-fp32", threads=1)
    with pytest.raises(UnsupportedAdapter, match="attention.self.key"):
        stack_loras(bb.record, [LoraWeights.from_bundle(store.get("acme/k-only"))])


_QUERY = "base_model.model.encoder.layer.0.attention.self.query"
_QUERY_AB = {
    f"{_QUERY}.lora_A.weight": np.ones((2, 32), np.float32),
    f"{_QUERY}.lora_B.weight": np.ones((32, 2), np.float32),
}


@pytest.mark.parametrize(
    "config,match",
    [
        ({"peft_type": "LORA", "r": 2, "target_modules": ["query"], "use_dora": True}, "use_dora"),
        ({"peft_type": "LORA", "r": 2, "target_modules": ["query"], "bias": "all"}, "bias"),
        ({"peft_type": "IA3", "target_modules": ["query"]}, "unexpected tensor"),
    ],
)
def test_unsupported_lora_configs_are_refused(config, match):
    with pytest.raises(ValidationError, match=match):  # UnsupportedAdapter is a ValidationError
        LoraWeights.from_peft(config, _QUERY_AB)


def test_lora_outside_the_encoder_and_wrong_shapes_are_refused(lora_setup):
    store, entry, _, _ = lora_setup
    record = OrtBackbone.from_store(store, entry, variant="lora-fp32", threads=1).record
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["query", "dense"]}
    pooler = {
        "base_model.model.pooler.dense.lora_A.weight": np.ones((2, 32), np.float32),
        "base_model.model.pooler.dense.lora_B.weight": np.ones((32, 2), np.float32),
    }
    with pytest.raises(UnsupportedAdapter, match="pooler.dense"):
        LoraWeights.from_peft(config, pooler)
    key = "base_model.model.encoder.layer.0.attention.self.query"
    wide = {
        f"{key}.lora_A.weight": np.ones((2, 64), np.float32),
        f"{key}.lora_B.weight": np.ones((32, 2), np.float32),
    }
    with pytest.raises(ValidationError, match="do not fit"):
        stack_loras(record, [LoraWeights.from_peft(config, wide)])


def test_hidden_and_pooler_hook_agrees_with_features(lora_setup):
    store, entry, dirs, _ = lora_setup
    bb = OrtBackbone.from_store(store, entry, variant="lora-fp32", threads=1)
    stack = stack_loras(bb.record, [LoraWeights.from_bundle(store.get(f"acme/{n}")) for n in dirs])
    ids = np.random.default_rng(2).integers(1000, 30000, size=(4, 9))
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    slots = np.array([0, 1, 2, stack.no_adapter_slot])
    hidden, pooler = bb.hidden_and_pooler(
        {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}, stack, slots
    )
    feats = bb.features(ids, mask, stack, slots)
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    np.testing.assert_allclose(((hidden * m).sum(1) / m.sum(1)).numpy(), feats.mean, atol=1e-5)
    np.testing.assert_allclose(pooler.numpy(), feats.pooler, atol=1e-6)


def test_from_paths_takes_the_torch_engine_layout(lora_setup):
    store, _, dirs, _ = lora_setup
    from_bundle = LoraWeights.from_bundle(store.get("acme/qv-r4"))
    paths = {
        f"encoder.layer.{layer}.{module}": (torch.from_numpy(a), torch.from_numpy(b))
        for (layer, module), (a, b) in from_bundle.deltas.items()
    }
    again = LoraWeights.from_paths(paths)
    assert again.deltas.keys() == from_bundle.deltas.keys()
    for key, (a, b) in again.deltas.items():
        np.testing.assert_array_equal(a, from_bundle.deltas[key][0])
        np.testing.assert_array_equal(b, from_bundle.deltas[key][1])
    with pytest.raises(UnsupportedAdapter, match="pooler.dense"):
        LoraWeights.from_paths({"pooler.dense": (np.zeros((32, 2)), np.zeros((2, 32)))})


def test_resident_slots_equal_a_fresh_stack_through_eviction_and_rank_growth(lora_setup):
    """Serving keeps LoRA inputs resident across calls (LoraSlots): every assignment must feed exactly
    what a fresh stack_loras of the same adapters gives, after evictions and a rank increase too."""
    store, entry, dirs, _ = lora_setup
    bb = OrtBackbone.from_store(store, entry, variant="lora-fp32", threads=1)
    weights = {n: LoraWeights.from_bundle(store.get(f"acme/{n}")) for n in dirs}
    slots = LoraSlots(bb.record, capacity=3)
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 30000, size=(6, 9))
    mask = np.ones_like(ids)
    loads = []

    def load(key):
        loads.append(key)
        return weights[key]

    # r=1 first (ranks grow to 4, then 8), then batches that force evictions of unused slots
    for batch in (
        ["qv-r1"],
        ["qv-r4", "qv-r1"],
        ["q-r8", "v-r2-rs"],
        ["qv-r6-pat", "q-r8", "qv-r1"],
        ["qv-r4"],
    ):
        stack, assigned = slots.assign(batch, load)
        assert len(set(assigned)) == len(batch) and max(assigned) < 3
        rows = np.array([assigned[i % len(batch)] for i in range(5)] + [stack.no_adapter_slot])
        fresh = stack_loras(bb.record, [weights[n] for n in batch])
        fresh_rows = np.array([i % len(batch) for i in range(5)] + [fresh.no_adapter_slot])
        got, want = bb.features(ids, mask, stack, rows), bb.features(ids, mask, fresh, fresh_rows)
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-5, err_msg=str(batch))
    assert slots.rank == 8
    # resident adapters were never packed again (qv-r1, q-r8); qv-r4 was evicted by v-r2-rs and came back
    assert loads == ["qv-r1", "qv-r4", "q-r8", "v-r2-rs", "qv-r6-pat", "qv-r4"]
    assert slots.writes == len(loads)
    with pytest.raises(UnsupportedAdapter, match="slots hold 3"):
        slots.assign(list(dirs)[:4], load)


def test_lora_graph_is_traced_with_eager_attention_like_the_plain_graph(lora_setup):
    """The SDPA trace guards every softmax with IsNaN + Where (ops the plain fp32 graph does not run)."""
    store, entry, _, _ = lora_setup
    _, graph = load_export(store, entry, "lora-fp32")
    ops = [n.op_type for n in onnx.load_from_string(graph).graph.node]
    assert "Softmax" in ops and "IsNaN" not in ops
