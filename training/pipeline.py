"""``train(config)``: base + data -> trained adapter -> bundle -> ``store.put``.

The store is only written at the very end, with one ``put`` of a complete, validated bundle: if anything
fails before that (bad data, a non-finite loss, an invalid bundle), nothing is registered.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters_store import model_families
from adapters_store.base_models import BaseModelEntry, fingerprint_folder, resolve_source
from adapters_store.bundle import TRAINING_CURVE_FILE, AdapterManifest, Bundle
from adapters_store.errors import IncompatibleBase, ValidationError
from adapters_store.validation import StoreLimits, peft_spec_of
from training.backbone import load_backbone, make_preprocess
from training.config import TrainConfig
from training.datasets import DataSplit, load_split
from training.errors import BelowMinimumAccuracy, TrainConfigError
from training.learners.base import Exported
from training.loop import FitResult, evaluate
from training.metrics import curve_png
from training.strategies import build_learner, fit_with_adaptation
from training.threads import auto_threads

log = logging.getLogger(__name__)
TASK_MODALITY = {
    "text-classification": "text",
    "feature-extraction": "text",
    "image-classification": "image",
    "audio-classification": "audio",
}


@dataclass
class TrainOutcome:
    """Everything a run produced; ``bundle`` is what gets put."""

    bundle: Bundle
    result: FitResult
    learner: Any


def resolve_store(store: Any) -> Any:
    if isinstance(store, str | Path):
        from adapters_store import open_store

        return open_store(store)
    return store


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_folder(entry: BaseModelEntry, verify: bool = True) -> Path:
    """The base's local folder (a path or ``package:<module>``); with ``verify`` its weights must still
    match the registered fingerprint, so an adapter never claims a base it was not trained on."""
    try:
        folder = resolve_source(entry)
    except ValidationError as e:
        raise IncompatibleBase(f"{e.message}; re-register the base") from None
    if verify and fingerprint_folder(folder)[0] != entry.fingerprint:
        raise IncompatibleBase(f"base {entry.name!r}: the files in {folder} changed since it was registered")
    return folder


def train(
    config: TrainConfig, train_data: Any = None, val_data: Any = None, target_data: Any = None
) -> AdapterManifest:
    """Train per ``config``, register the bundle and return its manifest (with the assigned version).

    ``train_data``/``val_data``/``target_data`` (:class:`training.data.LabelledData`) replace the files in
    ``config`` when given, e.g. in-memory arrays of images.
    """
    store = resolve_store(config.store)
    outcome = train_bundle(config, store, train_data, val_data, target_data)
    return store.put(outcome.bundle)


def train_bundle(
    config: TrainConfig, store: Any, train_data: Any = None, val_data: Any = None, target_data: Any = None
) -> TrainOutcome:
    """Everything :func:`train` does except the ``put``."""
    torch.set_num_threads(config.num_threads or auto_threads()[0])
    entry = store.get_base(config.base)
    folder = base_folder(entry)
    base_config = json.loads((folder / "config.json").read_text())
    modality = model_families.family(base_config).modality
    if modality != TASK_MODALITY[config.task]:
        raise TrainConfigError(
            f"task {config.task!r} needs a {TASK_MODALITY[config.task]} base; "
            f"{entry.name!r} is a {modality} model ({entry.model_type})"
        )
    split = load_split(config, modality, train_data, val_data, target_data)
    seed_everything(config.seed)
    pooling = (
        model_families.default_pooling(base_config, config.task, config.strategy)
        if config.pooling == "auto"
        else config.pooling
    )
    preprocess = make_preprocess(folder, modality, config.max_seq_len)
    backbone = None if config.strategy in ("lora", "ia3") else load_backbone(folder)

    def make() -> Any:
        seed_everything(config.seed)  # why: every self-training round starts from the same init
        return build_learner(config, entry, folder, backbone, preprocess, pooling, split.names)

    start = time.perf_counter()
    learner, result = fit_with_adaptation(make, split, config, entry)
    seconds = time.perf_counter() - start
    bundle = _bundle(config, entry, split, learner, result, seconds)
    check_quality(config, bundle.manifest.metrics, split)
    return TrainOutcome(bundle, result, learner)


def near_chance(accuracy: float, majority: float) -> bool:
    """Barely better than always answering the most frequent class: below a quarter of the way from
    that baseline to perfect (6 balanced classes: under 0.38; 2: under 0.63)."""
    return accuracy < majority + (1.0 - majority) / 4


def check_quality(config: TrainConfig, metrics: dict[str, Any], split: DataSplit) -> None:
    """Warn when the validation accuracy collapsed; refuse (nothing stored) under min_val_accuracy."""
    accuracy = float(metrics.get("accuracy", 0.0))
    counts = Counter(split.val.labels)
    label, top = counts.most_common(1)[0]
    majority = top / max(len(split.val), 1)
    if config.min_val_accuracy is not None and accuracy < config.min_val_accuracy:
        raise BelowMinimumAccuracy(
            f"validation accuracy {accuracy:.3f} is below --min-val-accuracy {config.min_val_accuracy}; "
            "nothing was registered (try another --lr, more --epochs or another --strategy)"
        )
    if near_chance(accuracy, majority):
        log.warning(
            "validation accuracy %.3f is close to (or under) what always answering %r scores (%.3f): the run may have "
            "collapsed (a too high --lr?). It is registered anyway; --min-val-accuracy refuses such runs",
            accuracy,
            label,
            majority,
        )


def _bundle(
    cfg: TrainConfig, entry: BaseModelEntry, split: DataSplit, learner: Any, result: FitResult, seconds: float
) -> Bundle:
    exported: Exported = learner.export(cfg.strategy) if cfg.strategy in ("lora", "ia3") else learner.export()
    val = evaluate(learner, learner.prepare(split.val.inputs), split.val_y, split.names, cfg.batch_size * 2)
    metrics = {
        **val,
        "train_counts": split.train_counts(),
        "trainable_params": learner.trainable_params(),
        "train_time_s": round(seconds, 3),
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": result.history,
        **split.extra_metrics,
    }
    if cfg.task == "feature-extraction":  # the validation figures are those of the unsaved probe head
        metrics |= {
            "evaluated_with": "linear probe on the embeddings (not saved)",
            "probe_labels": split.names,
        }
    files = dict(exported.files)
    files[TRAINING_CURVE_FILE] = curve_png(result.history, cfg.monitor)
    bundle = Bundle.build(
        files,
        tenant=cfg.tenant,
        name=cfg.name,
        task=cfg.task,
        labels=[] if cfg.task == "feature-extraction" else list(split.names),
        base=entry.ref,
        metrics=metrics,
        metadata={"train_config": _config_record(cfg)},
        # why: the engine serves each text the way it was trained (adapters_store/preparation.py)
        max_seq_len=cfg.max_seq_len if TASK_MODALITY[cfg.task] == "text" else None,
        **exported.manifest_fields,
    )
    if bundle.manifest.kind in ("lora", "ia3"):  # the adapter spec the store would compute at put
        bundle = bundle.with_manifest(peft=peft_spec_of(bundle, entry, StoreLimits()))
    return bundle


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The options that shaped the run, JSON-safe, without the store object or local paths."""
    skip = {"store", "train_file", "val_file", "target_file", "feature_cache_dir", "progress", "num_threads"}
    return cfg.model_dump(mode="json", exclude=skip)
