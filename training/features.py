"""The head fast path: run the frozen backbone once over the data and keep the pooled features.

Features can also be kept on disk (``feature_cache_dir``), keyed by the base fingerprint, the pooling,
the sequence length and a digest of the inputs, so retraining a head on the same data skips the backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.backbone import Preprocess, pool


def inputs_digest(inputs: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for item in inputs:
        if isinstance(item, str):
            data = item.encode()
        elif isinstance(item, np.ndarray):
            data = str(item.shape).encode() + item.tobytes()
        else:  # PIL image
            data = f"{item.mode}{item.size}".encode() + item.tobytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@torch.no_grad()
def compute_features(
    model: nn.Module, preprocess: Preprocess, inputs: Sequence[Any], pooling: str, batch_size: int
) -> torch.Tensor:
    """Pooled backbone features [N, H] in eval mode (no dropout)."""
    model.eval()
    chunks = [
        pool(model, preprocess(inputs[i : i + batch_size]), pooling)
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks).float()


def cached_features(
    model: nn.Module,
    preprocess: Preprocess,
    inputs: Sequence[Any],
    pooling: str,
    batch_size: int,
    cache_dir: Path | None,
    key_parts: Sequence[str],
) -> torch.Tensor:
    if cache_dir is None:
        return compute_features(model, preprocess, inputs, pooling, batch_size)
    key = hashlib.sha256("|".join([*key_parts, pooling, inputs_digest(inputs)]).encode()).hexdigest()
    path = Path(cache_dir) / f"features-{key[:32]}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = compute_features(model, preprocess, inputs, pooling, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats.contiguous()}, str(tmp))
    tmp.replace(path)  # why: a concurrent run never reads a half-written cache file
    return feats
