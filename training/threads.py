"""How many torch threads a training run uses when the user does not say (``num_threads=None``).

On a shared machine an intra-op thread that has no core of its own makes every step wait for it: on a
busy 2-core machine 2 threads measured several times slower per step than 1 (training/README.md has
the figures). So ``auto`` takes the cores that other processes leave idle, by the 1-minute load
average, and never fewer than one.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """(threads, why): the idle cores, at least 1. ``cores``/``load`` default to this machine's."""
    cores = usable_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    threads = max(1, min(cores, int(cores - load + 0.5)))
    return threads, f"auto: {cores} cores, load average {load:.1f}"
