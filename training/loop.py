"""The one training loop every strategy shares: batches, gradient accumulation, an optional domain loss,
per-epoch validation with a progress bar, early stopping, and restoring the best epoch's weights.

A strategy plugs in as a :class:`Learner`; what it trains and how it saves it is its own business.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from training.config import TrainConfig
from training.errors import TrainingFailed
from training.metrics import classification_metrics
from training.progress import report_epoch, report_step

log = logging.getLogger(__name__)


class Learner(Protocol):
    """A trainable model seen by the loop. ``forward`` returns (representation [B, D], logits [B, C]);
    the representation is what domain adaptation aligns between source and target."""

    def prepare(self, inputs: Sequence[Any]) -> Any: ...
    def param_groups(self) -> list[dict[str, Any]]: ...
    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def set_train(self, mode: bool) -> None: ...


class DomainLoss(Protocol):
    def parameters(self) -> Any: ...
    def __call__(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor: ...


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def take(x: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor or of a list of raw inputs."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    return [x[i] for i in idx.tolist()]


@torch.no_grad()
def predict_proba(learner: Learner, x: Any, batch_size: int) -> torch.Tensor:
    learner.set_train(False)
    n = len(x)
    out = [
        F.softmax(learner.forward(take(x, torch.arange(i, min(i + batch_size, n))))[1], -1)
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out)


def evaluate(
    learner: Learner, x: Any, y: torch.Tensor, names: Sequence[str], batch_size: int
) -> dict[str, Any]:
    pred = predict_proba(learner, x, batch_size).argmax(-1)
    return classification_metrics(y.tolist(), pred.tolist(), names)


def _tracked(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _window_sizes(batches: list[torch.Tensor], accum: int) -> list[int]:
    """Examples per optimizer step when ``accum`` batches are accumulated."""
    return [sum(len(b) for b in batches[i : i + accum]) for i in range(0, len(batches), accum)]


def _epoch(
    learner: Learner,
    opt: torch.optim.Optimizer,
    data: dict[str, Any],
    cfg: TrainConfig,
    domain: DomainLoss | None,
    gen: torch.Generator,
    epoch: int,
    bar: Any,
) -> float:
    learner.set_train(True)
    x, y, tx = data["x"], data["y"], data.get("target")
    order = torch.randperm(len(y), generator=gen)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    windows = _window_sizes(batches, cfg.grad_accum_steps)
    total, seen = 0.0, 0
    opt.zero_grad(set_to_none=True)
    for step, idx in enumerate(batches, start=1):
        rep, logits = learner.forward(take(x, idx))
        loss = F.cross_entropy(logits, y[idx])
        if domain is not None:
            tidx = torch.randint(0, len(tx), (len(idx),), generator=gen)
            trep, _ = learner.forward(take(tx, tidx))
            progress = (epoch - 1 + step / len(batches)) / cfg.epochs
            loss = loss + cfg.da_weight * domain(rep, trep, progress)
        if not torch.isfinite(loss):
            raise TrainingFailed(f"loss became {loss.item()} at epoch {epoch}, step {step}; lower the lr")
        # Weight by examples so an accumulated window equals one batch of its size, a short last one too.
        window = windows[(step - 1) // cfg.grad_accum_steps]
        (loss * (len(idx) / window)).backward()
        if step % cfg.grad_accum_steps == 0 or step == len(batches):
            opt.step()
            opt.zero_grad(set_to_none=True)
        total, seen = total + loss.item() * len(idx), seen + len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{total / seen:.4f}")
        report_step(epoch, step, len(batches), total / seen)
    return total / max(seen, 1)


def _optimizer(learner: Learner, cfg: TrainConfig, domain: DomainLoss | None) -> torch.optim.Optimizer:
    params = learner.param_groups()
    if domain is not None:
        params.append({"params": list(domain.parameters()), "lr": cfg.lr})
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _epoch_with_bar(
    learner: Learner,
    opt: torch.optim.Optimizer,
    data: dict[str, Any],
    names: Sequence[str],
    cfg: TrainConfig,
    domain: DomainLoss | None,
    gen: torch.Generator,
    epoch: int,
) -> dict[str, Any]:
    """One epoch and its validation under a progress bar showing loss and the monitored metric."""
    from tqdm.auto import tqdm

    n_batches = math.ceil(len(data["y"]) / cfg.batch_size)
    with tqdm(
        total=n_batches,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not show_progress(cfg),
        leave=True,
        dynamic_ncols=True,
    ) as bar:
        loss = _epoch(learner, opt, data, cfg, domain, gen, epoch, bar)
        val = evaluate(learner, data["val_x"], data["val_y"], names, cfg.batch_size * 2)
        bar.set_postfix(loss=f"{loss:.4f}", **{f"val_{cfg.monitor}": f"{val[cfg.monitor]:.3f}"})
    return {
        "epoch": epoch,
        "train_loss": loss,
        "val": {"accuracy": val["accuracy"], "macro_f1": val["macro_f1"]},
    }


def show_progress(cfg: TrainConfig) -> bool:
    """Progress bars on a terminal only, unless asked: in a log or a pipe they are noise."""
    return cfg.progress if cfg.progress is not None else sys.stderr.isatty()


def fit(
    learner: Learner,
    data: dict[str, Any],
    names: Sequence[str],
    cfg: TrainConfig,
    domain: DomainLoss | None = None,
) -> FitResult:
    """Train on ``data`` = {x, y, val_x, val_y[, target]}; keeps the weights of the best validation epoch."""
    opt = _optimizer(learner, cfg, domain)
    gen = torch.Generator().manual_seed(cfg.seed)
    result, best, best_state, start = FitResult(), -math.inf, None, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        learner.on_epoch_start(epoch)
        record = _epoch_with_bar(learner, opt, data, names, cfg, domain, gen, epoch)
        result.history.append(record)
        report_epoch(record)
        # why: callers without a terminal (the demo, job runners) show progress and an ETA from this
        log.info(
            "epoch %d/%d: val %s %.3f",
            epoch,
            cfg.epochs,
            cfg.monitor,
            record["val"][cfg.monitor],
            extra={"epoch": epoch, "epochs": cfg.epochs, "elapsed_s": time.perf_counter() - start},
        )
        score = record["val"][cfg.monitor]
        counts = getattr(learner, "epoch_counts", lambda: True)()
        if not counts:
            record["head_only"] = True  # never restored as the best epoch
        if counts and score > best:
            best, result.best_epoch = score, epoch
            best_state = [p.detach().clone() for p in _tracked(opt)]
        elif cfg.patience and result.best_epoch and epoch - result.best_epoch >= cfg.patience:
            result.stopped_early = True
            break
    if cfg.restore_best and best_state is not None:
        with torch.no_grad():  # why: the last epoch may be worse than the best one
            for p, saved in zip(_tracked(opt), best_state, strict=True):
                p.copy_(saved)
    result.seconds = time.perf_counter() - start
    return result


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
