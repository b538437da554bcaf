"""What callers hand the engine (one row each) and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Task = Literal["classify", "embed"]
TASKS: tuple[str, ...] = ("classify", "embed")


@dataclass(frozen=True)
class InferenceItem:
    """One row of a request.

    ``adapter`` is ``"name"``, ``"name@3"`` or ``"name@production"`` within ``tenant``; ``None`` runs the
    bare base. Without ``@`` the engine tries alias ``production`` and falls back to ``latest``.
    Text backbones take ``text``; image backbones take ``image`` (HWC uint8); audio backbones take
    ``audio`` (1-D float32 waveform at the base's sampling rate, values in [-1, 1]).
    """

    tenant: str
    adapter: str | None
    task: Task
    text: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    audio: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class InferenceResult:
    """One answered row, naming the exact version and content digest that produced it.

    ``labels``/``scores``: classify only, every label sorted by probability (softmax), highest first.
    ``logits``: classify only, raw head outputs in the manifest's label order.
    ``embedding``: embed only.
    ``tokens``: text rows only, the tokens the backbone read (after truncation; for usage accounting).
    """

    adapter: str | None
    version: int | None
    digest: str | None
    labels: list[str] | None = None
    scores: list[float] | None = None
    embedding: list[float] | None = None
    logits: list[float] | None = None
    tokens: int | None = None
