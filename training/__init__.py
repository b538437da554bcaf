"""loraplex training: turn a registered base plus a tenant's data into a registered adapter bundle.

>>> from training import TrainConfig, train  # doctest: +SKIP
>>> train(TrainConfig(store=".loraplex/store", base="minilm", tenant="acme", name="intent",
...                   strategy="lora", train_file="intents.csv"))  # doctest: +SKIP

Imported lazily: ``loraplex --help`` and the store commands load ``training.cli`` without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "training.config",
    "train": "training.pipeline",
    "train_bundle": "training.pipeline",
    "promote_full_to_base": "training.promote",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
