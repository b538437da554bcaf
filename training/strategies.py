"""Strategy wiring: which learner a config gets, and how domain adaptation wraps the fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.base_models import BaseModelEntry
from training.backbone import Preprocess, feature_dim
from training.config import TrainConfig
from training.datasets import DataSplit
from training.domain import DannLoss, MmdLoss, select_pseudo_labels
from training.heads import Head
from training.learners.finetune import FinetuneLearner
from training.learners.head import HeadLearner
from training.learners.peft_adapter import EmbeddingPeftLearner, PeftLearner, build_peft_model
from training.loop import FitResult, fit, predict_proba

DEFAULT_DA_HIDDEN = 128  # a head needs a trainable representation for DANN / MMD to act on


def head_hidden(cfg: TrainConfig, in_features: int) -> int | None:
    if cfg.head_hidden is None and cfg.strategy == "head" and cfg.domain_adaptation in ("dann", "mmd"):
        return min(DEFAULT_DA_HIDDEN, in_features)
    return cfg.head_hidden


def build_learner(
    cfg: TrainConfig,
    entry: BaseModelEntry,
    folder: Path,
    backbone: nn.Module | None,
    preprocess: Preprocess,
    pooling: str,
    names: list[str],
) -> Any:
    if cfg.strategy in ("lora", "ia3"):
        model = build_peft_model(folder, cfg, entry.model_type, names)
        if cfg.task == "feature-extraction":
            probe = nn.Linear(int(entry.hidden_size or 0), len(names))
            return EmbeddingPeftLearner(model, preprocess, pooling, probe)
        return PeftLearner(model, preprocess, pooling)
    assert backbone is not None
    dim = feature_dim(backbone, pooling)
    head = Head(dim, len(names), head_hidden(cfg, dim), cfg.head_activation)
    if cfg.strategy == "head":
        key = [entry.fingerprint, str(cfg.max_seq_len)]
        return HeadLearner(backbone, preprocess, pooling, head, cfg.batch_size, cfg.feature_cache_dir, key)
    # partial/full train the backbone in place: give each learner its own copy of the weights.
    import copy

    return FinetuneLearner(copy.deepcopy(backbone), preprocess, pooling, head, cfg)


def rep_dim(learner: Any, entry: BaseModelEntry) -> int:
    if isinstance(learner, HeadLearner | FinetuneLearner):
        return learner.head.spec.hidden or learner.head.spec.in_features
    return int(entry.hidden_size or 0)


def _data(learner: Any, split: DataSplit, train: Any, y: torch.Tensor, with_target: bool) -> dict[str, Any]:
    data = {
        "x": learner.prepare(train.inputs),
        "y": y,
        "val_x": learner.prepare(split.val.inputs),
        "val_y": split.val_y,
    }
    if isinstance(learner, HeadLearner):
        learner.head.standardize_from(data["x"])  # cached features: cheap, and it speeds the fit
    if with_target:
        data["target"] = learner.prepare(split.target.inputs)
    return data


def fit_with_adaptation(
    make: Callable[[], Any], split: DataSplit, cfg: TrainConfig, entry: BaseModelEntry
) -> tuple[Any, FitResult]:
    """Plain fit, DANN / MMD (an extra loss on source vs target batches), or iterated self-training."""
    learner = make()
    method = cfg.domain_adaptation
    if method in ("none", "self-training"):
        result = fit(learner, _data(learner, split, split.train, split.train_y, False), split.names, cfg)
        if method == "self-training":
            learner, result = _self_train(make, learner, split, cfg)
        return learner, result
    domain = DannLoss(rep_dim(learner, entry)) if method == "dann" else MmdLoss()
    return learner, fit(
        learner, _data(learner, split, split.train, split.train_y, True), split.names, cfg, domain
    )


def _self_train(
    make: Callable[[], Any], learner: Any, split: DataSplit, cfg: TrainConfig
) -> tuple[Any, FitResult]:
    """Each round: pseudo-label the target with the current model, retrain on source + confident target."""
    rounds, result = [], FitResult()
    for _ in range(cfg.self_training_rounds):
        probs = predict_proba(learner, learner.prepare(split.target.inputs), cfg.batch_size * 2)
        keep, labels = select_pseudo_labels(probs, cfg.pseudo_label_threshold)
        pseudo = split.target.subset(keep.tolist())
        pseudo = type(pseudo)(pseudo.inputs, [split.names[i] for i in labels.tolist()])
        rounds.append(len(keep))
        combined = split.train.concat(pseudo) if len(pseudo) else split.train
        y = torch.cat([split.train_y, labels]) if len(pseudo) else split.train_y
        learner = make()
        result = fit(learner, _data(learner, split, combined, y, False), split.names, cfg)
    split.extra_metrics["pseudo_labelled_per_round"] = rounds
    split.extra_metrics["target_examples"] = len(split.target)
    return learner, result
