"""Default PEFT target modules per architecture (torch-free, so ``loraplex train --help`` can show them)."""

from __future__ import annotations

# LoRA: the attention query and value projections. IA3: PEFT's choice (key, value, feed-forward out),
# the second list being the feed-forward modules (scaled on their input rather than their output).
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


def defaults_help() -> str:
    """One line per strategy, for ``--target-modules``' help."""
    lora = "; ".join(f"{arch} {','.join(t)}" for arch, t in LORA_TARGETS.items())
    ia3 = "; ".join(f"{arch} {','.join(t)}" for arch, (t, _) in IA3_TARGETS.items())
    return f"default per architecture, LoRA: {lora}. IA3: {ia3}"
