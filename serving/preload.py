"""Cold loads off the batch path: a request's adapters are loaded before it joins a batch.

The fair queue answers every request of a batch when the whole batch returns, so a cold load inside
the batch (a full fine-tune is ~90 MB to read, hash and build) would hold up every other tenant's
rows in it. The gateway awaits :class:`ColdLoads` after validating an inference body:

* every adapter the request names resident (the usual case): a dictionary look-up per item;
* an alias answer expired (``alias_ttl_s``): it is resolved in a worker thread (a store read); a
  resident version costs nothing more, so warm tenants never queue behind other tenants' loads;
* otherwise the loads run in a dedicated loader thread, one at a time, at a lower CPU priority than
  the threads that answer warm rows (Linux keeps a nice value per thread): on a busy host a cold
  load takes the CPU the warm batches leave idle, instead of slowing them down. The loaded adapters
  stay leased until the request is answered, so they cannot be evicted before its batch runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio.to_thread

LOADER_NICENESS = 10  # nice 10 weighs ~1/10 of nice 0 with the kernel's scheduler: still progresses


def _nothing() -> None:
    return None


def lower_thread_priority(niceness: int) -> bool:
    """Raise the calling thread's nice value by ``niceness`` (Linux: per thread; elsewhere a no-op).
    Raising it needs no privilege; it cannot be lowered back, hence a dedicated thread."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
        return True
    except (AttributeError, OSError):  # not Linux: the loads run at normal priority
        return False


class ColdLoads:
    """``await cold_loads(tenant, adapter_refs)`` -> a function that releases what was loaded."""

    def __init__(self, engine: Callable[[], Any], concurrency: int = 1, niceness: int = LOADER_NICENESS):
        self._engine = engine  # the engine is created after the service starts: look it up per call
        # ``concurrency`` concurrent loads; each full fine-tune costs a model copy.
        self._loader = ThreadPoolExecutor(
            max_workers=concurrency,
            thread_name_prefix="loraplex-cold-load",
            initializer=lower_thread_priority,
            initargs=(niceness,),
        )

    async def __call__(self, tenant: str | None, adapters: Sequence[str | None]) -> Callable[[], None]:
        engine = self._engine()
        refs = [a for a in adapters if isinstance(a, str)]
        if engine is None or tenant is None or not refs:
            return _nothing
        maybe = [a for a in dict.fromkeys(refs) if not engine.is_resident(tenant, a)]
        if not maybe:
            return _nothing
        cold = await anyio.to_thread.run_sync(engine.unloaded, tenant, maybe)
        if not cold:
            return _nothing
        leases = await _result(self._loader.submit(engine.hold, tenant, cold))

        def release() -> None:
            _release(leases)

        return release


def _release(leases: list) -> None:
    for lease in leases:
        lease.release()


async def _result(future: Future) -> list:
    """The loader's leases; if the request is cancelled meanwhile (client gone), they are released
    as soon as the load ends instead of pinning the adapters for good."""
    try:
        return await asyncio.shield(asyncio.wrap_future(future))
    except asyncio.CancelledError:
        future.add_done_callback(
            lambda f: _release(f.result()) if not f.cancelled() and f.exception() is None else None
        )
        raise
