"""Torch modules that put pooling inside the exported graph, so serving gets features in one ORT call.

Outputs, in order: mean-pooled tokens, the first (CLS) token, the model's pooler output when it
has one (BERT: tanh(dense(CLS)); it lives in the base weights, so heads with ``pooling="pooler"``
are served from the same graph), and the last hidden state (so a caller can pool by itself).
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only; [B, S, H], [B, S] -> [B, H]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: an all-padding row gives zeros instead of NaN
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pooler_of(model: nn.Module) -> nn.Module | None:
    return getattr(model, "pooler", None)


class TextFeatures(nn.Module):
    """(input_ids, attention_mask) -> (mean_pooled, cls_token[, pooler_output], last_hidden_state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return pooled_outputs(out, masked_mean(out.last_hidden_state, attention_mask))


class ImageFeatures(nn.Module):
    """pixel_values -> (mean_pooled, cls_token[, pooler_output], last_hidden_state); mean over every token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        return pooled_outputs(out, out.last_hidden_state.mean(1))


def pooled_outputs(out, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
    cls = out.last_hidden_state[:, 0]
    pooled = getattr(out, "pooler_output", None)
    pooler = () if pooled is None else (pooled,)
    return (mean, cls, *pooler, out.last_hidden_state)


def features_module(model: nn.Module, modality: str) -> nn.Module:
    return (TextFeatures if modality == "text" else ImageFeatures)(model).eval()
