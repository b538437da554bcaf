"""Synthetic short sentences shared by the benchmarks (same words and seeds, so runs compare)."""

from __future__ import annotations

import torch

WORDS = (
    "the quick brown fox jumps over a lazy dog while my order of fresh bread arrived late again "
    "please refund the payment because service was slow yet staff were kind and helpful today"
).split()


def sentences(n: int, words: int = 14, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (words,), generator=g).tolist())
        for _ in range(n)
    ]
