"""Strategy ``head``: frozen backbone, features computed once, a new head trained on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.bundle import HEAD_WEIGHTS_FILE
from training.backbone import Preprocess
from training.features import cached_features
from training.heads import Head
from training.learners.base import Exported


class HeadLearner:
    def __init__(
        self,
        backbone: nn.Module,
        preprocess: Preprocess,
        pooling: str,
        head: Head,
        batch_size: int,
        cache_dir: Path | None,
        cache_key: Sequence[str],
    ):
        self.backbone, self.preprocess, self.pooling, self.head = backbone, preprocess, pooling, head
        self.batch_size, self.cache_dir, self.cache_key = batch_size, cache_dir, list(cache_key)
        for p in backbone.parameters():
            p.requires_grad_(False)

    def prepare(self, inputs: Sequence[Any]) -> torch.Tensor:
        return cached_features(
            self.backbone,
            self.preprocess,
            inputs,
            self.pooling,
            self.batch_size * 2,
            self.cache_dir,
            self.cache_key,
        )

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters())}]

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.head.representation(batch)
        return rep, self.head.out(rep)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def set_train(self, mode: bool) -> None:
        self.head.train(mode)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    def export(self) -> Exported:
        return Exported(
            {HEAD_WEIGHTS_FILE: self.head.to_safetensors()},
            {"kind": "head", "pooling": self.pooling, "head": self.head.spec},
        )
