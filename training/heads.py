"""The tenant head: ``[hidden ->] activation -> out``, saved with the key layout of ``head.safetensors``."""

from __future__ import annotations

import torch
from safetensors.torch import save
from torch import nn

from adapters_store.bundle import HeadSpec

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class Head(nn.Module):
    """Linear classifier on pooled features, optionally behind one hidden layer.

    ``representation(x)`` is what domain adaptation aligns: the hidden activations when there is a
    hidden layer, else the pooled features themselves.
    """

    def __init__(
        self, in_features: int, num_outputs: int, hidden: int | None = None, activation: str = "relu"
    ):
        super().__init__()
        self.spec = HeadSpec(
            in_features=in_features, num_outputs=num_outputs, hidden=hidden, activation=activation
        )
        self.hidden = nn.Linear(in_features, hidden) if hidden else None
        self.act = ACTIVATIONS[activation]() if hidden else None
        self.out = nn.Linear(hidden or in_features, num_outputs)
        # Input standardisation used while training; folded into the first layer on export, so the
        # served head is a plain linear layer on raw pooled features.
        self.register_buffer("in_shift", torch.zeros(in_features), persistent=False)
        self.register_buffer("in_scale", torch.ones(in_features), persistent=False)

    def standardize_from(self, features: torch.Tensor) -> None:
        """Fit the input standardisation on training features [N, in]."""
        self.in_shift = features.mean(0)
        self.in_scale = (
            features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(self.in_shift)
        )

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.in_shift) / self.in_scale
        return self.act(self.hidden(x)) if self.hidden is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.representation(x))

    def to_safetensors(self) -> bytes:
        """Bytes of ``head.safetensors``: ``out.weight``, ``out.bias`` and ``hidden.*`` when present."""
        return save(self.folded_state())

    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights with the standardisation folded in: W (x - m) / s + b = (W / s) x + (b - W (m / s))."""
        tensors = {k: v.detach().clone() for k, v in self.state_dict().items()}
        first = "hidden" if self.hidden is not None else "out"
        w = tensors[f"{first}.weight"]
        tensors[f"{first}.bias"] = tensors[f"{first}.bias"] - w @ (self.in_shift / self.in_scale)
        tensors[f"{first}.weight"] = w / self.in_scale
        return {k: v.contiguous() for k, v in tensors.items()}
