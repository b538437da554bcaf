"""Errors the training side raises; all are ``LoraplexError`` subclasses so the CLI and service map them."""

from __future__ import annotations

from adapters_store.errors import DatasetError, InvalidRequest, LoraplexError

__all__ = ["DatasetError", "TrainConfigError", "TrainingFailed"]


class TrainConfigError(InvalidRequest):
    """A training option is missing or inconsistent with the others."""

    code = "invalid_train_config"


class TrainingFailed(LoraplexError):
    """Training itself broke (non-finite loss...); nothing was registered."""

    status, code = 500, "training_failed"


class BelowMinimumAccuracy(LoraplexError):
    """The run's validation accuracy ended under ``min_val_accuracy``; nothing was registered."""

    status, code = 422, "below_min_val_accuracy"
