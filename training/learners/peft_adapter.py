"""Strategies ``lora`` and ``ia3``: PEFT adapters on the shared backbone, the classifier in modules_to_save.

The bundle holds PEFT's own ``save_pretrained`` files byte for byte, so any PEFT tool can read them and
the backbone is never copied per tenant.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.bundle import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from training.backbone import Preprocess, pool, quiet_transformers
from training.config import TrainConfig
from training.errors import TrainConfigError
from training.learners.base import Exported
from training.targets import IA3_TARGETS, LORA_TARGETS

CLASSIFIER_MODULES = ["classifier"]


def peft_config(cfg: TrainConfig, model_type: str, task_type: str | None) -> Any:
    from peft import IA3Config, LoraConfig

    extra = {"task_type": task_type} if task_type else {"modules_to_save": CLASSIFIER_MODULES}
    if task_type == "FEATURE_EXTRACTION":
        extra = {"task_type": task_type}  # no classifier to save: the bundle is the adapter alone
    if cfg.strategy == "lora":
        targets = cfg.target_modules or LORA_TARGETS.get(model_type)
        if not targets:
            raise TrainConfigError(f"no default LoRA target modules for {model_type!r}; pass target_modules")
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            **extra,
        )
    if cfg.target_modules:
        targets, ff = cfg.target_modules, [t for t in cfg.target_modules if "output" in t or "fc" in t]
    elif model_type in IA3_TARGETS:
        targets, ff = IA3_TARGETS[model_type]
    else:
        raise TrainConfigError(f"no default IA3 target modules for {model_type!r}; pass target_modules")
    return IA3Config(target_modules=targets, feedforward_modules=ff, **extra)


def build_peft_model(folder: Path, cfg: TrainConfig, model_type: str, names: Sequence[str]) -> nn.Module:
    """Task model (classifier randomly initialised, seeded) wrapped by PEFT."""
    from peft import get_peft_model
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    quiet_transformers()
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    torch.manual_seed(cfg.seed)
    if cfg.task == "feature-extraction":
        from transformers import AutoModel

        # Only the adapter is trained and saved; the probe head lives outside the PEFT model.
        return get_peft_model(
            AutoModel.from_pretrained(str(folder)), peft_config(cfg, model_type, "FEATURE_EXTRACTION")
        )
    if cfg.task == "image-classification":
        model = AutoModelForImageClassification.from_pretrained(str(folder), **labels)
        task_type = None
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), **labels)
        task_type = "SEQ_CLS"
    return get_peft_model(model, peft_config(cfg, model_type, task_type))


class PeftLearner:
    def __init__(self, model: nn.Module, preprocess: Preprocess, pooling: str):
        self.model, self.preprocess, self.pooling = model, preprocess, pooling
        self._captured: list[torch.Tensor] = []
        # The classifier's input is the pooled representation domain adaptation aligns.
        classifier = model.base_model.model.get_submodule(CLASSIFIER_MODULES[0])
        classifier.register_forward_pre_hook(lambda _m, args: self._captured.append(args[0]))

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        return list(inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def forward(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.model(**self.preprocess(batch)).logits
        rep = self._captured[-1]
        return (rep[:, 0] if rep.dim() == 3 else rep), logits

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def set_train(self, mode: bool) -> None:
        self.model.train(mode)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def export(self, kind: str) -> Exported:
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            files = {f: (Path(tmp) / f).read_bytes() for f in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)}
        return Exported(files, {"kind": kind, "pooling": self.pooling})


class EmbeddingPeftLearner:
    """An embedding adapter: PEFT on the bare backbone, pooled features, and a probe head that gives the
    labels a loss but is not part of the bundle (``task`` feature-extraction)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, pooling: str, probe: nn.Module):
        self.model, self.preprocess, self.pooling, self.probe = model, preprocess, pooling, probe

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        return list(inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        adapter = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": adapter + list(self.probe.parameters())}]

    def embed(self, batch: Sequence[Any]) -> torch.Tensor:
        return pool(self.model, self.preprocess(batch), self.pooling)

    def forward(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.embed(batch)
        return feats, self.probe(feats)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def set_train(self, mode: bool) -> None:
        self.model.train(mode)
        self.probe.train(mode)

    def trainable_params(self) -> int:
        """What the bundle holds: the adapter only."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def export(self, kind: str) -> Exported:
        return PeftLearner.export(self, kind)  # type: ignore[arg-type]
