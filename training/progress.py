"""Progress reports out of the training loop, for whoever listens (the HTTP job runner does).

The loop calls :func:`report_step` and :func:`report_epoch`; they do nothing unless a sink is installed
with :func:`reporting_to`, so library users and the CLI pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol


class ProgressSink(Protocol):
    def on_step(self, epoch: int, step: int, steps: int, loss: float) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...


_SINK: ContextVar[ProgressSink | None] = ContextVar("loraplex_progress_sink", default=None)


@contextlib.contextmanager
def reporting_to(sink: ProgressSink) -> Iterator[None]:
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def report_step(epoch: int, step: int, steps: int, loss: float) -> None:
    if (sink := _SINK.get()) is not None:
        sink.on_step(epoch, step, steps, loss)


def report_epoch(record: dict[str, Any]) -> None:
    if (sink := _SINK.get()) is not None:
        sink.on_epoch(record)
