"""The training side of an HTTP training job: ``python -m training.job_runner SPEC.json``.

The service (``serving.jobs``) starts this as a subprocess, so serving never imports training. It
trains per the spec, writes the finished bundle into ``out_dir`` (it never writes the store: the
service registers the bundle, so a killed job cannot leave a half-registered version), writes
``curve.png`` there after each epoch, and reports on stdout, one JSON object per line::

    {"event": "started"}
    {"event": "step", "epoch": 1, "epochs": 3, "step": 4, "steps": 8, "loss": 0.69, "eta_s": 12.5}
    {"event": "epoch", "epoch": 1, "train_loss": 0.61, "val": {"accuracy": 0.8, "macro_f1": 0.79}, "eta_s": 9.1}
    {"event": "trained", "digest": "…", "metrics": {"accuracy": 0.9, "macro_f1": 0.9}}
    {"event": "failed", "reason": "dataset_error: …"}        (exit status 2)

Everything else (warnings, library output) goes to stderr, which the service keeps as the job's log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict

STEP_REPORT_S = 0.5  # at most two step events a second: the service stores each one


class JobSpec(BaseModel):
    """What the service asks for; ``options`` are already validated as ``JobOptions``."""

    model_config = ConfigDict(extra="forbid")

    store: str
    base: str
    tenant: str
    name: str
    strategy: str
    options: dict[str, Any]
    dataset: Path
    out_dir: Path
    threads: int = 1


class JsonLinesSink:
    """Progress sink that writes events to ``out`` and the curve PNG to ``out_dir``; computes the ETA."""

    def __init__(self, out: TextIO, out_dir: Path, epochs: int, monitor: str):
        self.out, self.out_dir, self.epochs, self.monitor = out, out_dir, epochs, monitor
        self.start = time.monotonic()
        self.last_step = 0.0
        self.history: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()

    def eta(self, epoch: int, step: int, steps: int) -> float | None:
        done = (epoch - 1) * steps + step
        if done <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return round(elapsed / done * (self.epochs * steps - done), 1)

    def on_step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last_step < STEP_REPORT_S and step < steps:
            return
        self.last_step, self.steps = now, steps
        eta = self.eta(epoch, step, steps)
        self.emit("step", epoch=epoch, epochs=self.epochs, step=step, steps=steps, loss=loss, eta_s=eta)

    def on_epoch(self, record: dict[str, Any]) -> None:
        from training.metrics import curve_png

        self.history.append(record)
        (self.out_dir / "curve.png").write_bytes(curve_png(self.history, self.monitor))
        steps = getattr(self, "steps", 1)
        self.emit("epoch", **record, eta_s=self.eta(record["epoch"], steps, steps))


def run(spec: JobSpec, events: TextIO) -> int:
    from adapters_store import open_store
    from adapters_store.errors import LoraplexError
    from training.config import TrainConfig
    from training.pipeline import train_bundle
    from training.progress import reporting_to

    sink: JsonLinesSink | None = None
    try:
        config = TrainConfig(
            store=spec.store,
            base=spec.base,
            tenant=spec.tenant,
            name=spec.name,
            strategy=spec.strategy,
            train_file=spec.dataset,
            num_threads=spec.threads,
            progress=False,
            **spec.options,
        )
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        sink = JsonLinesSink(events, spec.out_dir, config.epochs, config.monitor)
        sink.emit("started")
        store = open_store(spec.store)
        with reporting_to(sink):
            outcome = train_bundle(config, store)
        outcome.bundle.write_dir(spec.out_dir / "bundle")
    except LoraplexError as e:
        return _failed(events, f"{e.code}: {e.message}")
    except Exception as e:  # pydantic option errors and anything unexpected: say what, not a traceback
        import traceback

        traceback.print_exc()
        return _failed(events, f"{type(e).__name__}: {str(e)[:800]}")
    m = outcome.bundle.manifest.metrics
    summary = {
        k: m.get(k) for k in ("accuracy", "macro_f1", "trainable_params", "train_time_s", "epochs_run")
    }
    sink.emit("trained", digest=outcome.bundle.manifest.digest, metrics=summary)
    return 0


def _failed(events: TextIO, reason: str) -> int:
    events.write(json.dumps({"event": "failed", "reason": reason}) + "\n")
    events.flush()
    return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.job_runner SPEC.json", file=sys.stderr)
        return 64
    spec = JobSpec.model_validate_json(Path(args[0]).read_text())
    # Events get the real stdout; fd 1 then points at stderr so stray prints cannot corrupt the stream.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return run(spec, events)


if __name__ == "__main__":
    sys.exit(main())
