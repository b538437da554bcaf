"""The registered base as a feature encoder: load it, turn raw inputs into tensors, pool its output.

Pooling is the contract with the engine (``manifest.pooling``): ``mean`` = attention-masked mean of the
last hidden state (plain mean over tokens/positions for images and audio), ``cls`` = first token,
``pooler`` = the model's own ``pooler_output`` (BERT: tanh(dense(CLS)); ResNet: global average pool;
CLIP: the projected image embedding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.errors import DatasetError, TrainConfigError

IMAGE_MODEL_TYPES = frozenset(
    {"vit", "resnet", "clip", "clip_vision_model", "convnext", "deit", "dinov2", "swin"}
)
AUDIO_MODEL_TYPES = frozenset({"wav2vec2", "hubert", "wavlm"})
Preprocess = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


def modality_of(model_type: str) -> str:
    if model_type in IMAGE_MODEL_TYPES:
        return "image"
    if model_type in AUDIO_MODEL_TYPES:
        return "audio"
    return "text"


def quiet_transformers() -> None:
    """Loading bars and 'newly initialised head' warnings are noise in a training log."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_backbone(folder: str | Path) -> nn.Module:
    from transformers import AutoModel

    quiet_transformers()
    return AutoModel.from_pretrained(str(folder))


def default_pooling(model_type: str, strategy: str, task: str = "text-classification") -> str:
    """``auto`` pooling: what the matching *ForSequence/ImageClassification model would use; mean for
    embedding adapters (sentence-transformers' pooling)."""
    if task == "feature-extraction":
        return "mean"
    if model_type in ("resnet", "clip", "clip_vision_model"):
        return "pooler"
    if model_type in IMAGE_MODEL_TYPES:
        return "cls"
    if model_type == "bert" and strategy in ("lora", "ia3"):
        return "pooler"  # BertForSequenceClassification classifies the pooler output
    return "mean"


def pool(model: nn.Module, inputs: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """Run ``model`` on a preprocessed batch and reduce it to one vector per example, [B, H]."""
    model_type = getattr(model.config, "model_type", "")
    if model_type == "clip":
        if pooling != "pooler":
            raise TrainConfigError("CLIP image encoders support pooling 'pooler' (the projected embedding)")
        out = model.get_image_features(pixel_values=inputs["pixel_values"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(**inputs)
    if pooling == "pooler":
        if getattr(out, "pooler_output", None) is None:
            raise TrainConfigError(f"{model_type} has no pooler; use pooling 'mean' or 'cls'")
        return out.pooler_output.flatten(1)
    hidden = out.last_hidden_state
    if hidden.dim() == 4:  # conv nets: [B, C, h, w]
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape[1] != hidden.shape[1]:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


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

    def run(texts: Sequence[Any]) -> dict[str, torch.Tensor]:
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt")
        return dict(enc)

    return run


def _image_preprocess(folder: Path) -> Preprocess:
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(folder))
        return lambda images: {
            "pixel_values": proc(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        }
    # No processor saved with the base: scale to [0, 1] and normalise per channel like ImageNet models.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def run(images: Sequence[Any]) -> dict[str, torch.Tensor]:
        arrays = [np.asarray(_rgb(i), dtype=np.float32) / 255.0 for i in images]
        if len({a.shape for a in arrays}) > 1:
            raise DatasetError("images differ in size and the base has no image processor to resize them")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return {"pixel_values": (x - mean) / std}

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

    def run(waves: Sequence[Any]) -> dict[str, torch.Tensor]:
        arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        if fe is not None:
            enc = fe(arrays, sampling_rate=rate, padding=True, return_tensors="pt")
            return {"input_values": enc["input_values"]}
        length = max(len(a) for a in arrays)
        padded = np.stack([np.pad((a - a.mean()) / (a.std() + 1e-7), (0, length - len(a))) for a in arrays])
        return {"input_values": torch.from_numpy(padded)}

    return run


def feature_dim(model: nn.Module, pooling: str) -> int:
    """Width of what :func:`pool` returns for this model."""
    cfg = model.config
    if cfg.model_type == "clip":
        return cfg.projection_dim
    if cfg.model_type == "resnet":
        return cfg.hidden_sizes[-1]
    return cfg.hidden_size
