"""Validation metrics written into the manifest, and the training-curve PNG stored in the bundle."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    """accuracy, macro-F1 over all classes, and per-class support / correct counts."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(len(names)))
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    support = Counter(true.tolist())
    correct = Counter(true[true == pred].tolist())
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {names[i]: {"support": support.get(i, 0), "correct": correct.get(i, 0)} for i in labels},
    }


def curve_png(history: Sequence[dict[str, Any]], monitor: str) -> bytes:
    """Training loss and validation ``monitor`` per epoch, as PNG bytes (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.5), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val"][monitor] for h in history], "s-", color="tab:orange", label=f"val {monitor}")
    ax2.set_ylabel(f"val {monitor}", color="tab:orange")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
