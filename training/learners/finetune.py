"""Strategies ``partial`` and ``full``: train backbone blocks plus a head.

Both support discriminative learning rates (the head gets ``lr``, the top block ``backbone_lr`` and each
block below ``decay`` times the one above) and gradual unfreezing (start with the head only, unfreeze one
more block from the top every ``unfreeze_every`` epochs). ``partial`` saves only the blocks it trained.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE
from training.backbone import Preprocess, pool
from training.config import TrainConfig
from training.errors import TrainConfigError
from training.heads import Head
from training.learners.base import Exported

_BLOCK_RE = re.compile(r"^(?:encoder\.)?layers?\.(\d+)\.")
POOLER_PREFIX = "pooler."


def block_of(name: str) -> int | None:
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


def unit_groups(backbone: nn.Module, pooling: str) -> list[list[tuple[str, nn.Parameter]]]:
    """Backbone parameters in trainable units from the top down: [pooler?], block L-1, ..., block 0,
    embeddings and everything else. The pooler only counts when the pooling uses it."""
    named = list(backbone.named_parameters())
    layers = sorted({b for n, _ in named if (b := block_of(n)) is not None})
    if not layers:
        raise TrainConfigError(f"{type(backbone).__name__}: no 'encoder.layer.N' blocks to fine-tune")
    units = [[(n, p) for n, p in named if block_of(n) == b] for b in reversed(layers)]
    pooler = [(n, p) for n, p in named if n.startswith(POOLER_PREFIX)]
    rest = [(n, p) for n, p in named if block_of(n) is None and not n.startswith(POOLER_PREFIX)]
    if pooling == "pooler" and pooler:
        units[0] = pooler + units[0]  # the pooler sits on the top block and trains with it
    return units + [rest]


class FinetuneLearner:
    def __init__(
        self, backbone: nn.Module, preprocess: Preprocess, pooling: str, head: Head, cfg: TrainConfig
    ):
        self.backbone, self.preprocess, self.pooling, self.head, self.cfg = (
            backbone,
            preprocess,
            pooling,
            head,
            cfg,
        )
        units = unit_groups(backbone, pooling)
        n_blocks = len(units) - 1
        if cfg.strategy == "partial" and cfg.top_k > n_blocks:
            raise TrainConfigError(
                f"top_k={cfg.top_k} but the base has {n_blocks} blocks; use 'full' instead"
            )
        # units[0..k-1] are trained (top first); 'full' also trains the embeddings unit.
        self.units = units[: cfg.top_k] if cfg.strategy == "partial" else units
        self.first_trained_layer = n_blocks - cfg.top_k if cfg.strategy == "partial" else 0
        for p in backbone.parameters():
            p.requires_grad_(False)
        self._set_unfrozen(len(self.units))

    def _set_unfrozen(self, count: int) -> None:
        self.unfrozen = min(count, len(self.units))
        for i, unit in enumerate(self.units):
            for _, p in unit:
                p.requires_grad_(i < count)

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        return list(inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        """Head at ``lr``; unit i from the top at ``backbone_lr * decay**i``."""
        groups = [{"params": list(self.head.parameters()), "lr": self.cfg.lr}]
        for i, unit in enumerate(self.units):
            lr = self.cfg.effective_backbone_lr * self.cfg.layer_lr_decay**i
            groups.append({"params": [p for _, p in unit], "lr": lr})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        if self.cfg.unfreeze_every:
            # Epochs 1..N: head only; then one more unit from the top every N epochs.
            self._set_unfrozen((epoch - 1) // self.cfg.unfreeze_every)

    def epoch_counts(self) -> bool:
        """Whether this epoch may be kept as the best one: a head-only epoch (gradual unfreezing) would
        store a bundle whose blocks equal the base's."""
        return self.unfrozen > 0

    def forward(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.head.representation(pool(self.backbone, self.preprocess(batch), self.pooling))
        return rep, self.head.out(rep)

    def set_train(self, mode: bool) -> None:
        self.backbone.train(mode)
        self.head.train(mode)

    def trainable_params(self) -> int:
        """Everything the bundle owns: the trained units plus the head."""
        return sum(p.numel() for unit in self.units for _, p in unit) + sum(
            p.numel() for p in self.head.parameters()
        )

    def export(self) -> Exported:
        state = checkpoint_state(self.backbone)
        if self.cfg.strategy == "partial":
            state = {k: v for k, v in state.items() if self._owned(k)}
        fields: dict[str, Any] = {"kind": self.cfg.strategy, "pooling": self.pooling, "head": self.head.spec}
        if self.cfg.strategy == "partial":
            fields["first_trained_layer"] = self.first_trained_layer
        return Exported(
            {MODEL_WEIGHTS_FILE: save(state), HEAD_WEIGHTS_FILE: self.head.to_safetensors()}, fields
        )

    def _owned(self, key: str) -> bool:
        """A checkpoint key the partial bundle stores: a trained block, or the pooler when it was trained."""
        block = block_of(key)
        if block is not None:
            return block >= self.first_trained_layer
        return key.startswith(POOLER_PREFIX) and self.pooling == "pooler"


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under their *checkpoint* names (what the base folder holds and the registry lists).

    transformers 5 renames some modules in memory (ViT: ``encoder.layer.N.attention.attention.query`` is
    ``layers.N.attention.q_proj``) and converts back on save, so save and read back rather than use
    ``state_dict()`` names.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(str(f)))
    prefix = f"{model.config.model_type}."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v.contiguous() for k, v in state.items()}
