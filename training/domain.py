"""Unsupervised domain adaptation losses on the learner's representation, and pseudo-label selection.

- DANN (Ganin & Lempitsky 2015): a domain classifier behind a gradient-reversal layer; the reversal
  strength ramps 0 -> 1 with the usual 2/(1+exp(-10p)) - 1 schedule so early noisy features are not
  pushed around.
- MMD: squared maximum mean discrepancy between source and target batches, multi-bandwidth RBF kernel
  with bandwidths scaled by the median pairwise distance.
- Self-training: keep target examples whose predicted class probability is above a threshold.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-strength`` backward."""
    return _GradReverse.apply(x, strength)


class DannLoss(nn.Module):
    """Domain-classification loss through gradient reversal (source = 0, target = 1)."""

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        strength = 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0
        feats = grad_reverse(torch.cat([source, target]), strength)
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(feats.dtype)
        return F.binary_cross_entropy_with_logits(self.classifier(feats).squeeze(-1), domains)


def mmd2(
    source: torch.Tensor, target: torch.Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
) -> torch.Tensor:
    """Biased estimate of squared MMD with a sum of RBF kernels, bandwidths relative to the median distance."""
    x = torch.cat([source, target])
    d2 = torch.cdist(x, x).pow(2)
    median = d2.detach()[d2.detach() > 0].median() if (d2 > 0).any() else torch.tensor(1.0)
    k = sum(torch.exp(-d2 / (median * s)) for s in scales)
    n = len(source)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class MmdLoss(nn.Module):
    """No parameters; exists so the loop treats DANN and MMD alike."""

    def forward(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        return mmd2(source, target)


def select_pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, labels) of rows whose top probability is at least ``threshold``."""
    conf, labels = probs.max(dim=-1)
    keep = torch.nonzero(conf >= threshold).flatten()
    return keep, labels[keep]
