"""From the config's files (or in-memory data) to the train / validation / target split with label ids."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from training.config import TrainConfig
from training.data import (
    LabelledData,
    check_val_labels,
    encode_labels,
    label_names,
    read_table,
    stratified_split,
)
from training.errors import DatasetError, TrainConfigError
from training.media import read_image_folder

log = logging.getLogger(__name__)


@dataclass
class DataSplit:
    train: LabelledData
    val: LabelledData
    names: list[str]
    target: LabelledData | None = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def train_y(self) -> torch.Tensor:
        return torch.tensor(encode_labels(self.train, self.names), dtype=torch.long)

    @property
    def val_y(self) -> torch.Tensor:
        return torch.tensor(encode_labels(self.val, self.names), dtype=torch.long)

    def train_counts(self) -> dict[str, int]:
        counts = Counter(self.train.labels)
        return {n: counts.get(n, 0) for n in self.names}


def _read(cfg: TrainConfig, path: Any, modality: str, labelled: bool) -> LabelledData:
    if modality == "image":
        return read_image_folder(path, labelled=labelled)
    if modality == "text":
        return read_table(path, cfg.text_column, cfg.label_column if labelled else None)
    raise TrainConfigError(
        "audio data is passed in memory: train(config, train_data=arrays_data(waves, labels))"
    )


def load_split(
    cfg: TrainConfig,
    modality: str,
    train_data: LabelledData | None = None,
    val_data: LabelledData | None = None,
    target_data: LabelledData | None = None,
) -> DataSplit:
    from_file = train_data is None
    if train_data is None:
        if cfg.train_file is None:
            raise TrainConfigError("no training data: set train_file (or pass train_data)")
        train_data = _read(cfg, cfg.train_file, modality, labelled=True)
    if val_data is None and cfg.val_file is not None:
        val_data = _read(cfg, cfg.val_file, modality, labelled=True)
    names = label_names(train_data, str(cfg.train_file) if from_file else "the training data")
    if val_data is None:
        train_data, val_data = stratified_split(train_data, cfg.val_fraction, cfg.seed)
    else:
        check_val_labels(val_data, names)
    if cfg.domain_adaptation == "none" and (target_data is not None or cfg.target_file is not None):
        log.warning(
            "target data (%s) is unused: it only serves --domain-adaptation dann, mmd or self-training",
            cfg.target_file or "target_data",
        )
        target_data = None
    elif target_data is None and cfg.target_file is not None:
        target_data = _read(cfg, cfg.target_file, modality, labelled=False)
    if cfg.domain_adaptation != "none" and (target_data is None or len(target_data) == 0):
        raise DatasetError(
            f"domain adaptation {cfg.domain_adaptation!r} needs unlabelled target data (target_file)"
        )
    return DataSplit(train_data, val_data, names, target_data)
