"""The ONE table of base-model rules, by ``config.model_type``: what training prepared is what serving feeds.

Per family: modality, the default pooling of a classifier (what the matching ``*ForSequence`` /
``*ForImageClassification`` model classifies), the width of the pooled features, the tokens a row may
hold (RoBERTa-style models reserve 2 positions) and how raw inputs are normalised without a saved
processor (ImageNet mean/std for images, zero-mean unit-variance for waveforms). ``training/backbone.py``
and ``serving/engine/backbone.py`` both read it.

numpy only at import; the functions that take or return tensors import torch when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Modality = Literal["text", "image", "audio"]
Pooling = Literal["mean", "cls", "pooler"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
AUDIO_EPS = 1e-7


@dataclass(frozen=True)
class ModelFamily:
    modality: Modality
    pooling: Pooling = "mean"
    """classification default; embeddings (feature-extraction) always default to mean."""
    position_offset: int = 0
    """position embeddings a row cannot use (RoBERTa counts from padding_idx + 1)."""
    image_tower: bool = False
    """CLIP: only the vision tower runs; its pooler output is the projected image embedding."""


_TEXT = ModelFamily("text")
_ROBERTA = ModelFamily("text", position_offset=2)
FAMILIES: dict[str, ModelFamily] = {
    "bert": ModelFamily("text", pooling="pooler"),  # BertForSequenceClassification classifies the pooler
    "distilbert": _TEXT,
    "electra": _TEXT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "vit": ModelFamily("image", pooling="cls"),
    "deit": ModelFamily("image", pooling="cls"),
    "dinov2": ModelFamily("image", pooling="cls"),
    "beit": ModelFamily("image", pooling="pooler"),  # mean of patch tokens, layer-normed
    "swin": ModelFamily("image", pooling="pooler"),  # global average pool
    "convnext": ModelFamily("image", pooling="pooler"),
    "regnet": ModelFamily("image", pooling="pooler"),
    "resnet": ModelFamily("image", pooling="pooler"),
    "clip": ModelFamily("image", pooling="pooler", image_tower=True),
    "clip_vision_model": ModelFamily("image", pooling="pooler"),
    "wav2vec2": ModelFamily("audio"),
    "hubert": ModelFamily("audio"),
    "wavlm": ModelFamily("audio"),
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def family(config: Any) -> ModelFamily:
    """The family of an HF config (object or ``config.json`` dict). Unlisted models with image channels
    are images; anything else unlisted is text."""
    model_type = _get(config, "model_type", "")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return ModelFamily("image") if _get(config, "num_channels") is not None else _TEXT


def default_pooling(config: Any, task: str, strategy: str = "lora") -> Pooling:
    """``auto`` pooling: what the family's task model classifies (a PEFT adapter trains or ships that
    model); mean for embedding adapters and for heads on frozen text features (sentence-transformers)."""
    fam = family(config)
    if task == "feature-extraction" or (fam.modality == "text" and strategy not in ("lora", "ia3")):
        return "mean"
    return fam.pooling


def feature_dim(config: Any) -> int:
    """Width of the pooled features: CLIP's projection, a conv net's last stage, else the hidden size."""
    if family(config).image_tower:
        return int(_get(config, "projection_dim"))
    sizes = _get(config, "hidden_sizes")
    return int(sizes[-1]) if sizes else int(_get(config, "hidden_size"))


def token_limit(config: Any) -> int:
    """Tokens a row may have: the position table minus what the family reserves."""
    limit = int(_get(config, "max_position_embeddings", None) or 1 << 30)
    return limit - family(config).position_offset


def normalize_pixels(images: Sequence[np.ndarray]) -> np.ndarray:
    """HWC uint8 RGB images of one size -> float32 [B, 3, H, W], ImageNet mean/std (no resize)."""
    x = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / np.float32(255.0)
    return np.ascontiguousarray(((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2))


def normalize_waves(waves: Sequence[np.ndarray]) -> np.ndarray:
    """Waveforms -> zero-mean unit-variance each, zero-padded at the end to the longest, float32 [B, T]."""
    arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
    length = max(len(a) for a in arrays)
    return np.stack([np.pad((a - a.mean()) / (a.std() + AUDIO_EPS), (0, length - len(a))) for a in arrays])


def audio_inputs(extractor: Any, waves: Sequence[np.ndarray], rate: int) -> dict[str, Any]:
    """``input_values`` for an audio base: its feature extractor, or :func:`normalize_waves` without one."""
    import torch

    arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
    if extractor is not None:
        enc = extractor(arrays, sampling_rate=rate, padding=True, return_tensors="pt")
        return {"input_values": enc["input_values"]}
    return {"input_values": torch.from_numpy(normalize_waves(arrays))}


def run_backbone(model: Any, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
    """(last hidden state, pooler output or None) of an HF base model; CLIP runs its image tower only."""
    if family(model.config).image_tower:
        out = model.get_image_features(pixel_values=inputs["pixel_values"])
        return getattr(out, "last_hidden_state", None), getattr(out, "pooler_output", out)
    out = model(**inputs)
    return out.last_hidden_state, getattr(out, "pooler_output", None)


def pool_features(hidden: Any, mask: Any, pooler: Any, how: str) -> Any:
    """One vector per row from [B, T, H] tokens (or [B, C, h, w] conv maps); ``mask`` [B, T] or None.

    ``mean`` = attention-masked mean (plain mean over positions for images and audio), ``cls`` = first
    token, ``pooler`` = the model's own pooler output."""
    from adapters_store.errors import ValidationError

    if how == "pooler":
        if pooler is None:
            raise ValidationError("pooling 'pooler' needs a backbone with a pooler layer")
        return pooler.flatten(1)
    if hidden.dim() == 4:
        return hidden.mean(dim=(2, 3))
    if how == "cls":
        return hidden[:, 0]
    if mask is None or mask.shape[1] != hidden.shape[1]:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
