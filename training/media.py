"""Images and audio as labelled data: an image folder (one sub-folder per class) or in-memory arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import LabelledData
from training.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def open_image(path: Path) -> Any:
    """Decode an image fully now, so a broken file fails here with its name, not mid-training."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: image does not decode ({type(e).__name__}: {e})") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(folder: str | Path, labelled: bool = True) -> LabelledData:
    """``folder/<class>/<image>`` -> images and class names; unlabelled: every image under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of images (expected one sub-folder per class)")
    if not labelled:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{folder}: no images found")
        return LabelledData([open_image(p) for p in files])
    inputs, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for p in _image_files(sub):
            inputs.append(open_image(p))
            labels.append(sub.name)
    if not inputs:
        raise DatasetError(
            f"{folder}: no images found in class sub-folders (expected {folder}/<class>/<image>)"
        )
    return LabelledData(inputs, labels)


def arrays_data(
    inputs: np.ndarray | Sequence[np.ndarray], labels: Sequence[Any] | None = None
) -> LabelledData:
    """Images as uint8 arrays (HxW or HxWxC) or audio as 1-D float waveforms, with labels."""
    items = list(inputs)
    if not items:
        raise DatasetError("no examples given")
    for i, a in enumerate(items):
        arr = np.asarray(a)
        if arr.size == 0 or not np.isfinite(arr.astype(np.float64)).all():
            raise DatasetError(f"example {i} is empty or holds NaN/Inf values")
    return LabelledData(items, None if labels is None else [str(v) for v in labels])
