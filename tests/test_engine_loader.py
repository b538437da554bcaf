"""The loader refuses what it cannot serve exactly, with specific errors, before a forward pass."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as save_safetensors

from adapters_store import Bundle, describe_base
from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE
from adapters_store.errors import IncompatibleBase, ValidationError
from adapters_store.peft_import import import_peft_dir
from serving.engine.backbone import load_backbone
from serving.engine.loader import load_adapter
from tests.helpers.bundles import head_bundle_from
from tests.test_engine_support import head_bundle, save_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    base = describe_base("tiny", tiny_bert_dir)
    return base, load_backbone(base)


def test_wrong_base_fingerprint_is_incompatible(tiny, other_tiny_bert_dir):
    _, backbone = tiny
    other = describe_base("other", other_tiny_bert_dir)
    bundle, _ = head_bundle(other, "a", "b", 0, ["x", "y"])
    with pytest.raises(IncompatibleBase):
        load_adapter(bundle, backbone)


def test_lora_is_packed_with_scaling_folded_and_bytes_counted(tiny, tiny_bert_dir, tmp_path):
    base, backbone = tiny
    d = save_lora(tiny_bert_dir, tmp_path / "l", seed=0, r=4, alpha=12, targets=["query", "value"])
    loaded = load_adapter(import_peft_dir(d, "a", "b", base), backbone)
    assert set(loaded.lora) == {
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    }
    from safetensors.torch import load_file

    raw = load_file(d / "adapter_model.safetensors")
    a_t, b_t = loaded.lora["encoder.layer.0.attention.self.query"]
    key = "base_model.model.encoder.layer.0.attention.self.query"
    assert torch.equal(a_t, raw[f"{key}.lora_A.weight"].t())
    assert torch.allclose(b_t, raw[f"{key}.lora_B.weight"].t() * 3.0)  # alpha 12 / r 4
    assert loaded.nbytes == sum(t.numel() * 4 for t in raw.values())
    assert loaded.digest == loaded.manifest.digest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_lora_is_served_as_its_float32_values(tiny, tiny_bert_dir, tmp_path, dtype):
    """PEFT saves adapters of a half-precision model in f16/bf16 (numpy has no bf16: the loader widens
    it itself). Every weight, the classifier's too, is served as exactly the float32 of what is stored."""
    from safetensors.torch import load_file, save_file

    base, backbone = tiny
    d = save_lora(
        tiny_bert_dir, tmp_path / "l", seed=3, r=4, alpha=12, targets=["query", "value"], num_labels=2
    )
    raw = {k: v.to(dtype) for k, v in load_file(d / "adapter_model.safetensors").items()}
    save_file(raw, d / "adapter_model.safetensors")
    loaded = load_adapter(import_peft_dir(d, "a", "b", base), backbone)
    for layer in range(2):
        for module in ("query", "value"):
            # SEQ_CLS adapters wrap BertForSequenceClassification: keys carry its "bert." prefix
            key = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            a_t, b_t = loaded.lora[f"encoder.layer.{layer}.attention.self.{module}"]
            assert a_t.dtype == b_t.dtype == torch.float32
            assert torch.equal(a_t, raw[f"{key}.lora_A.weight"].float().t())
            assert torch.equal(b_t, raw[f"{key}.lora_B.weight"].float().t() * 3.0)  # alpha 12 / r 4
    classifier = "base_model.model.classifier.weight"  # PEFT saves modules_to_save under the plain name
    assert torch.equal(loaded.head.out_w, raw[classifier].float())


def test_partial_missing_a_block_tensor_is_refused(tiny, tiny_bert_dir):
    from transformers import BertModel

    base, backbone = tiny
    sd = BertModel.from_pretrained(tiny_bert_dir).state_dict()
    top = {k: v for k, v in sd.items() if k.startswith("encoder.layer.1.") and "intermediate" not in k}
    head = {"out.weight": torch.randn(2, 32), "out.bias": torch.zeros(2)}
    bundle = Bundle.build(
        {MODEL_WEIGHTS_FILE: save_safetensors(top), HEAD_WEIGHTS_FILE: save_safetensors(head)},
        tenant="a",
        name="b",
        kind="partial",
        task="text-classification",
        labels=["x", "y"],
        base=base.ref,
        first_trained_layer=1,
        head={"in_features": 32, "num_outputs": 2},
    )
    with pytest.raises(ValidationError, match="incomplete"):
        load_adapter(bundle, backbone)


def test_head_that_does_not_fit_the_features_is_refused(tiny):
    base, backbone = tiny
    head = {"out.weight": torch.randn(2, 16), "out.bias": torch.zeros(2)}  # features are 32 wide
    bundle = head_bundle_from(base, head, "a", "b", ["x", "y"])
    with pytest.raises(ValidationError):
        load_adapter(bundle, backbone)


def test_non_finite_weights_are_refused(tiny):
    base, backbone = tiny
    head = {"out.weight": torch.full((2, 32), float("nan")), "out.bias": torch.zeros(2)}
    bundle = head_bundle_from(base, head, "a", "b", ["x", "y"])
    with pytest.raises(ValidationError):
        load_adapter(bundle, backbone)


_HEAP_PROBE = """
import random, resource, sys, torch
from adapters_store import open_store
from serving.engine import Engine, EngineSettings
Engine(open_store(sys.argv[1]), base="tiny", settings=EngineSettings(threads=1))
rng, ops, live = random.Random(0), [], 0
for _ in range(120):  # a pass's allocations: 1-16 MiB blocks, freed in another order
    if live < 6 and (live == 0 or rng.random() < 0.55):
        ops.append(("new", rng.choice([1, 2, 4, 6, 16]) << 18))
        live += 1
    else:
        ops.append(("free", rng.randrange(live)))
        live -= 1
def one_pass():
    held = []
    for op, v in ops:
        held.append(torch.ones(v)) if op == "new" else held.pop(v)
one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_pass()
pages = sum(v * 4 // 4096 for op, v in ops if op == "new")
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5, pages)
"""


def test_the_engine_keeps_freed_activation_memory_for_the_next_pass(tiny_bert_dir, tmp_path):
    """Every pass allocates and frees many MB-sized tensors. An engine once pinned glibc's mmap
    threshold at 128 KB: each one was a fresh mapping (~24k page faults and ~30% of a MiniLM batch-32
    forward). glibc's adaptive thresholds trim the heap top after such a pattern. A repeated pass must
    reuse its memory: far fewer faults than the pages it touches."""
    import subprocess
    import sys

    from adapters_store import open_store

    open_store(str(tmp_path / "store")).register_base(describe_base("tiny", tiny_bert_dir))
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    faults, pages = map(int, out.stdout.split()[-2:])
    # Per pass of ~105k pages: glibc's adaptive thresholds 25.6k-36.6k faults; these settings 0.8k-2.6k
    # (the host may reclaim idle heap pages meanwhile).
    assert faults < pages // 20, f"{faults} page faults per repeated pass touching {pages} pages"


def test_a_lora_adapter_lives_in_its_own_mapping(tiny, tiny_bert_dir, tmp_path):
    """Resident LoRA weights stay out of the malloc heap (evictions leave no holes there): all of an
    adapter's A/B views share one page-aligned storage of their own, A kept row-major."""
    base, backbone = tiny
    d = save_lora(tiny_bert_dir, tmp_path / "l", seed=1, r=4, alpha=8, targets=["query", "value"])
    loaded = load_adapter(import_peft_dir(d, "acme", "l", base), backbone)
    spans = sorted(
        (t.data_ptr(), t.numel() * t.element_size()) for pair in loaded.lora.values() for t in pair
    )
    assert spans[0][0] % 4096 == 0  # a mapping of its own starts on a page
    # packed back to back: one block
    assert all(p + n == q for (p, n), (q, _) in zip(spans, spans[1:], strict=False))
    # A^T is a view of a row-major A [r, in]: the faster operand layout for x @ A^T (see _one_buffer).
    assert all(a_t.t().is_contiguous() and b_t.is_contiguous() for a_t, b_t in loaded.lora.values())


def test_a_lora_adapter_still_loads_when_no_mapping_is_left(tiny, tiny_bert_dir, tmp_path, monkeypatch):
    """A host out of mappings (vm.max_map_count) keeps loading adapters, into the heap."""
    import serving.engine.loader as loader_module

    def no_mapping(*_args, **_kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(loader_module.mmap, "mmap", no_mapping)
    base, backbone = tiny
    d = save_lora(tiny_bert_dir, tmp_path / "l", seed=2, r=4, alpha=8, targets=["query", "value"])
    loaded = load_adapter(import_peft_dir(d, "acme", "l", base), backbone)
    from safetensors.torch import load_file

    raw = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.encoder.layer.1.attention.self.value"
    assert torch.equal(
        loaded.lora["encoder.layer.1.attention.self.value"][0], raw[f"{key}.lora_A.weight"].t()
    )
