"""Per-tenant heads on pooled features, in the bundle contract's layout (see adapters_store.bundle)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters_store.errors import ValidationError

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


@dataclass(frozen=True)
class HeadParams:
    """``out(act(hidden(x)))`` or just ``out(x)``; weights are [out, in] as in nn.Linear."""

    out_w: torch.Tensor
    out_b: torch.Tensor | None
    hidden_w: torch.Tensor | None = None
    hidden_b: torch.Tensor | None = None
    activation: str = "relu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_w is not None:
            x = _ACTIVATIONS[self.activation](F.linear(x, self.hidden_w, self.hidden_b))
        return F.linear(x, self.out_w, self.out_b)

    @property
    def nbytes(self) -> int:
        ts = (self.out_w, self.out_b, self.hidden_w, self.hidden_b)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def head_from_file(tensors: dict[str, torch.Tensor], activation: str, in_features: int) -> HeadParams:
    """``head.safetensors`` (``out.*`` and optional ``hidden.*``) -> :class:`HeadParams`."""
    allowed = {"out.weight", "out.bias", "hidden.weight", "hidden.bias"}
    extra = set(tensors) - allowed
    if extra or "out.weight" not in tensors:
        raise ValidationError(
            f"head.safetensors must hold out.weight/out.bias[/hidden.*]; found {sorted(tensors)}"
        )
    hidden_w = tensors.get("hidden.weight")
    first_w = hidden_w if hidden_w is not None else tensors["out.weight"]
    if first_w.dim() != 2 or first_w.shape[1] != in_features:
        raise ValidationError(
            f"head takes {list(first_w.shape)} but the backbone gives {in_features} features"
        )
    return HeadParams(
        out_w=tensors["out.weight"],
        out_b=tensors.get("out.bias"),
        hidden_w=hidden_w,
        hidden_b=tensors.get("hidden.bias"),
        activation=activation,
    )


def head_from_classifier(tensors: dict[str, torch.Tensor], in_features: int) -> HeadParams:
    """A PEFT ``modules_to_save`` classifier (``classifier.weight``/``.bias``) -> :class:`HeadParams`."""
    w = tensors.get("weight")
    if w is None or w.dim() != 2 or w.shape[1] != in_features:
        shape = None if w is None else list(w.shape)
        raise ValidationError(
            f"classifier weight {shape} does not take the backbone's {in_features} features"
        )
    return HeadParams(out_w=w, out_b=tensors.get("bias"))
