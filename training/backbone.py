"""The registered base as a feature encoder: load it, turn raw inputs into tensors, pool its output.

Pooling is the contract with the engine (``manifest.pooling``): ``mean`` = attention-masked mean of the
last hidden state (plain mean over tokens/positions for images and audio), ``cls`` = first token,
``pooler`` = the model's own ``pooler_output`` (BERT: tanh(dense(CLS)); ResNet: global average pool;
CLIP: the projected image embedding).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_store import model_families
from training.errors import DatasetError, TrainConfigError

Preprocess = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


def quiet_transformers() -> None:
    """Loading bars and 'newly initialised head' warnings are noise in a training log."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_backbone(folder: str | Path) -> nn.Module:
    from transformers import AutoModel

    quiet_transformers()
    return AutoModel.from_pretrained(str(folder))


def pool(model: nn.Module, inputs: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """Run ``model`` on a preprocessed batch and reduce it to one vector per example, [B, H]."""
    if model_families.family(model.config).image_tower and pooling != "pooler":
        raise TrainConfigError("CLIP image encoders support pooling 'pooler' (the projected embedding)")
    hidden, pooler = model_families.run_backbone(model, inputs)
    if pooling == "pooler" and pooler is None:
        model_type = getattr(model.config, "model_type", "")
        raise TrainConfigError(f"{model_type} has no pooler; use pooling 'mean' or 'cls'")
    return model_families.pool_features(hidden, inputs.get("attention_mask"), pooler, pooling)


def make_preprocess(folder: str | Path, modality: str, max_seq_len: int) -> Preprocess:
    """A function from raw inputs (texts, PIL images / HxWxC arrays, 1-D waveforms) to model inputs."""
    folder = Path(folder)
    if modality == "text":
        return _text_preprocess(folder, max_seq_len)
    if modality == "image":
        return _image_preprocess(folder)
    return _audio_preprocess(folder)


def _text_preprocess(folder: Path, max_seq_len: int) -> Preprocess:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    # never past the base's position table, exactly as serving truncates
    max_len = min(max_seq_len, model_families.token_limit(json.loads((folder / "config.json").read_text())))

    def run(texts: Sequence[Any]) -> dict[str, torch.Tensor]:
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return dict(enc)

    return run


def _image_preprocess(folder: Path) -> Preprocess:
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(folder))
        return lambda images: {
            "pixel_values": proc(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        }

    # No processor saved with the base: ImageNet normalisation, no resize (as serving does).
    def run(images: Sequence[Any]) -> dict[str, torch.Tensor]:
        arrays = [np.asarray(_rgb(i), dtype=np.uint8) for i in images]
        if len({a.shape for a in arrays}) > 1:
            raise DatasetError("images differ in size and the base has no image processor to resize them")
        return {"pixel_values": torch.from_numpy(model_families.normalize_pixels(arrays))}

    return run


def _rgb(image: Any) -> Any:
    """PIL images and HxW / HxWxC uint8 arrays -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    return image.convert("RGB")


def _audio_preprocess(folder: Path) -> Preprocess:
    from transformers import AutoFeatureExtractor

    try:
        fe = AutoFeatureExtractor.from_pretrained(str(folder))
    except (OSError, ValueError):
        fe = None
    rate = getattr(fe, "sampling_rate", 16000)
    return lambda waves: model_families.audio_inputs(fe, waves, rate)


def feature_dim(model: nn.Module, pooling: str) -> int:
    """Width of what :func:`pool` returns for this model."""
    return model_families.feature_dim(model.config)
