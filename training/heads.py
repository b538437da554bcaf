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

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.hidden(x)) if self.hidden is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.representation(x))

    def to_safetensors(self) -> bytes:
        """Bytes of ``head.safetensors``: ``out.weight``, ``out.bias`` and ``hidden.*`` when present."""
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        return save(tensors)
