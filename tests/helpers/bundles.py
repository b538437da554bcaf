"""Build real adapter bundles on tiny models for tests: PEFT LoRA/IA3 folders and head bundles."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as save_tensors

from adapters_store import BaseModelEntry, Bundle, HeadSpec
from adapters_store.peft_import import import_peft_dir


def save_peft_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    targets=("query", "value"),
    num_labels: int | None = 3,
    seed: int = 0,
    ia3: bool = False,
) -> Path:
    """Save a PEFT adapter with random non-zero weights (so tenants really differ) via save_pretrained."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if num_labels:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
        task_type = "SEQ_CLS"
    else:
        model = AutoModel.from_pretrained(base_dir)
        task_type = "FEATURE_EXTRACTION"
    if ia3:
        cfg = IA3Config(
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            task_type=task_type,
        )
    else:
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type=task_type)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0, 0.05)
            elif "ia3_l" in name:
                p.uniform_(0.5, 1.5)
            elif "classifier" in name and "modules_to_save" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out_dir)
    return out_dir


def lora_bundle(
    base_dir: Path, base: BaseModelEntry, tmp: Path, tenant: str = "acme", name: str = "intent", **kwargs
) -> Bundle:
    folder = save_peft_lora(base_dir, tmp / f"peft-{tenant}-{name}-{kwargs.get('seed', 0)}", **kwargs)
    labels = [f"l{i}" for i in range(kwargs.get("num_labels", 3) or 0)]
    return import_peft_dir(folder, tenant, name, base, labels=labels or None)


def head_bundle_from(
    base: BaseModelEntry,
    tensors: dict,
    tenant: str,
    name: str,
    labels: list[str],
    pooling: str = "mean",
    activation: str = "relu",
    task: str = "text-classification",
) -> Bundle:
    """A classification head bundle from ``out.*`` (and optional ``hidden.*``) tensors."""
    hidden = tensors["hidden.weight"].shape[0] if "hidden.weight" in tensors else None
    in_features = tensors["hidden.weight" if hidden else "out.weight"].shape[1]
    return Bundle.build(
        {"head.safetensors": save_tensors(tensors)},
        tenant=tenant,
        name=name,
        kind="head",
        task=task,
        labels=labels,
        base=base.ref,
        pooling=pooling,
        head=HeadSpec(in_features=in_features, num_outputs=len(labels), hidden=hidden, activation=activation),
    )


def head_bundle(
    base: BaseModelEntry,
    tenant: str = "acme",
    name: str = "head",
    num_labels: int = 3,
    seed: int = 0,
    pooling: str = "mean",
) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    hidden = base.hidden_size or 32
    tensors = {
        "out.weight": torch.randn(num_labels, hidden, generator=g),
        "out.bias": torch.randn(num_labels, generator=g),
    }
    return head_bundle_from(base, tensors, tenant, name, [f"c{i}" for i in range(num_labels)], pooling)
