"""Per-tenant heads on pooled features, in the bundle contract's layout (see adapters_store.bundle)."""

from __future__ import annotations

from collections.abc import Sequence
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


def apply_heads(heads: Sequence[HeadParams], feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Head ``i`` on rows ``feats[i]`` [rows_i, H], for every ``i`` in ONE batched computation.

    Every head's first layer (``out`` of one-layer heads, ``hidden`` of two-layer heads) is one GEMM over
    all rows; each activation kind present is one op on its columns; every two-layer head's ``out`` is
    one block-diagonal GEMM. A batch of 64 tenants' heads thus costs a few ops, not 64 small matmuls
    (each a thread-pool round trip on a shared CPU). Rows also meet the other heads' weights; that waste
    is rows x sum(outputs) x H multiply-adds, small beside the backbone pass (measured in
    serving/engine/README.md). Returns views, one [rows_i, outputs_i] tensor per head.

    >>> h = HeadParams(out_w=torch.eye(2), out_b=None)
    >>> [t.tolist() for t in apply_heads([h, h], [torch.ones(1, 2), torch.zeros(1, 2)])]
    [[[1.0, 1.0]], [[0.0, 0.0]]]
    """
    if not heads:
        return []
    one = [i for i, h in enumerate(heads) if h.hidden_w is None]
    two = [i for i, h in enumerate(heads) if h.hidden_w is not None]
    first = [heads[i].out_w for i in one] + [heads[i].hidden_w for i in two]
    first_b = [_bias(heads[i].out_b, heads[i].out_w) for i in one]
    first_b += [_bias(heads[i].hidden_b, heads[i].hidden_w) for i in two]
    x = torch.cat(list(feats))  # [rows, H]
    z = torch.addmm(torch.cat(first_b), x, torch.cat(first).t())  # [rows, sum of first-layer widths]
    col = _offsets([w.shape[0] for w in first])
    cols = {i: (col[k], col[k + 1]) for k, i in enumerate(one + two)}
    if two:
        start = col[len(one)]
        hidden = z[:, start:]
        for name, act in _ACTIVATIONS.items():
            idx = [c - start for i in two if heads[i].activation == name for c in range(*cols[i])]
            if idx:
                at = torch.tensor(idx)
                hidden[:, at] = act(hidden[:, at])
        outs = [heads[i].out_w for i in two]
        y = torch.addmm(
            torch.cat([_bias(heads[i].out_b, heads[i].out_w) for i in two]),
            hidden,
            torch.block_diag(*outs).t(),
        )
        out_col = _offsets([w.shape[0] for w in outs])
        two_cols = {i: (out_col[k], out_col[k + 1]) for k, i in enumerate(two)}
    rows = _offsets([f.shape[0] for f in feats])
    return [
        (z[rows[i] : rows[i + 1], slice(*cols[i])])
        if heads[i].hidden_w is None
        else y[rows[i] : rows[i + 1], slice(*two_cols[i])]
        for i in range(len(heads))
    ]


def _bias(b: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    return b if b is not None else w.new_zeros(w.shape[0])


def _offsets(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out
