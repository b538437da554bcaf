"""Builders of tenant adapters on a tiny random BERT, and their plain reference models (no tests here).

Every adapter is initialised so that tenants differ (random non-zero LoRA B, IA3 vectors away from 1,
random heads), saved the way its producer saves it (PEFT ``save_pretrained`` for LoRA/IA3), imported
with ``adapters_store.peft_import`` and put in a real local store.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from adapters_store import Bundle
from adapters_store.base_models import BaseModelEntry
from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE
from adapters_store.peft_import import import_peft_dir
from serving.engine import InferenceResult


def save_lora(
    base_dir: Path,
    out: Path,
    seed: int,
    r: int,
    alpha: float,
    targets: list[str],
    num_labels: int | None = None,
) -> Path:
    """A PEFT LoRA (feature extraction, or SEQ_CLS with a classifier when ``num_labels``) with random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if num_labels:
        model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=targets)
    else:
        model = BertModel.from_pretrained(base_dir)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "classifier" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    return out


def save_ia3(
    base_dir: Path,
    out: Path,
    seed: int,
    targets: list[str] | None = None,
    feedforward: list[str] | None = None,
) -> Path:
    """A PEFT IA3 adapter on the BERT at ``base_dir``; without ``targets``, on the modules training's
    IA3 takes for BERT (``training.targets.IA3_TARGETS``)."""
    from peft import IA3Config, get_peft_model
    from transformers import BertModel

    from training.targets import IA3_TARGETS

    if targets is None:
        targets, default_feedforward = IA3_TARGETS["bert"]
        feedforward = default_feedforward if feedforward is None else feedforward
    feedforward = feedforward or []
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        BertModel.from_pretrained(base_dir),
        IA3Config(target_modules=targets, feedforward_modules=feedforward),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def peft_reference(base_dir: Path, adapter_dir: Path, num_labels: int | None = None):
    """The tenant's model alone, through plain PEFT."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification, BertModel

    if num_labels:
        base = BertForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    else:
        base = BertModel.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def random_head(
    seed: int, in_features: int, outputs: int, hidden: int | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head = {
        "out.weight": torch.randn(outputs, hidden or in_features, generator=g),
        "out.bias": torch.randn(outputs, generator=g),
    }
    if hidden:
        head |= {
            "hidden.weight": torch.randn(hidden, in_features, generator=g),
            "hidden.bias": torch.randn(hidden, generator=g),
        }
    return head


def head_bundle(
    base: BaseModelEntry,
    tenant: str,
    name: str,
    seed: int,
    labels: list[str] | None,
    pooling: str = "mean",
    hidden: int | None = None,
) -> tuple[Bundle, dict[str, torch.Tensor]]:
    outputs = len(labels) if labels else 8
    head = random_head(seed, base.hidden_size, outputs, hidden)
    bundle = Bundle.build(
        {HEAD_WEIGHTS_FILE: save_safetensors(head)},
        tenant=tenant,
        name=name,
        kind="head",
        task="text-classification" if labels else "feature-extraction",
        labels=labels or [],
        base=base.ref,
        pooling=pooling,
        head={
            "in_features": base.hidden_size,
            "num_outputs": outputs,
            "hidden": hidden,
            "activation": "tanh",
        },
    )
    return bundle, head


def partial_bundle(
    base_dir: Path, base: BaseModelEntry, tenant: str, name: str, seed: int, first: int, labels: list[str]
) -> tuple[Bundle, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base's blocks >= ``first`` perturbed (a 'fine-tune'), plus a classification head."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(base_dir)
    top = {
        k: v + 0.05 * torch.randn_like(v)
        for k, v in model.state_dict().items()
        if k.startswith("encoder.layer.") and int(k.split(".")[2]) >= first
    }
    head = random_head(seed, base.hidden_size, len(labels))
    bundle = Bundle.build(
        {MODEL_WEIGHTS_FILE: save_safetensors(top), HEAD_WEIGHTS_FILE: save_safetensors(head)},
        tenant=tenant,
        name=name,
        kind="partial",
        task="text-classification",
        labels=labels,
        base=base.ref,
        pooling="mean",
        first_trained_layer=first,
        head={"in_features": base.hidden_size, "num_outputs": len(labels)},
    )
    return bundle, top, head


def import_peft(path: Path, tenant: str, name: str, base: BaseModelEntry, **kw) -> Bundle:
    return import_peft_dir(path, tenant, name, base, **kw)


def apply_head(head: dict[str, torch.Tensor], x: torch.Tensor, activation=torch.tanh) -> torch.Tensor:
    if "hidden.weight" in head:
        x = activation(x @ head["hidden.weight"].T + head["hidden.bias"])
    return x @ head["out.weight"].T + head["out.bias"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def expected_alone(ref: dict, text: str, base_dir, tok, base_model=None) -> torch.Tensor:
    """The tenant's own model on ``text`` alone (batch of one, no padding): PEFT for LoRA/IA3, the
    base (``base_model``, else loaded from ``base_dir``) plus the head for heads and partial tenants."""
    from transformers import BertModel

    enc = tok([text], return_tensors="pt")
    with torch.inference_mode():
        if ref["kind"] == "logits":
            return ref["peft"](**enc).logits[0]
        if ref["kind"] == "embed":
            return mean_pool(ref["peft"](**enc).last_hidden_state, enc["attention_mask"])[0]
        if ref["kind"] == "partial":
            model = BertModel.from_pretrained(base_dir).eval()
            model.load_state_dict(ref["top"], strict=False)
            hidden = model(**enc).last_hidden_state
            return apply_head(ref["head"], mean_pool(hidden, enc["attention_mask"]))[0]
        hidden = (base_model or BertModel.from_pretrained(base_dir).eval())(**enc).last_hidden_state
        if ref["kind"] == "head-cls":
            return apply_head(ref["head"], mean_pool(hidden, enc["attention_mask"]))[0]
        return apply_head(ref["head"], hidden[:, 0])[0]


def result_values(result: InferenceResult) -> torch.Tensor:
    """An answered row's logits (classify) or embedding, as a tensor."""
    assert isinstance(result, InferenceResult), result
    return torch.tensor(result.logits if result.logits is not None else result.embedding)
