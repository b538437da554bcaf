"""Cold loads off the batch path: a request's adapters are loaded before it joins an adaptive batch.

BentoML answers every request of a batch when the whole batch returns, so a cold load inside the
batch (a full fine-tune is ~90 MB to read, hash and build) would hold up every other tenant's rows in
it. The gateway awaits :class:`ColdLoads` after validating an inference body: when every adapter the
request names is resident (the usual case) it costs a dictionary look-up per item; otherwise the loads
run in a worker thread, one at a time, while batches of warm rows keep running, and the loaded adapters
stay leased until the request is answered, so they cannot be evicted before its batch runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread


def _nothing() -> None:
    return None


class ColdLoads:
    """``await cold_loads(tenant, adapter_refs)`` -> a function that releases what was loaded."""

    def __init__(self, engine: Callable[[], Any], concurrency: int = 1):
        self._engine = engine  # the engine is created after the service starts: look it up per call
        self._concurrency = concurrency  # concurrent loads; each full fine-tune costs a model copy
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    async def __call__(self, tenant: str | None, adapters: Sequence[str | None]) -> Callable[[], None]:
        engine = self._engine()
        refs = [a for a in adapters if isinstance(a, str)]
        if engine is None or tenant is None or not refs:
            return _nothing
        cold = [a for a in dict.fromkeys(refs) if not engine.is_resident(tenant, a)]
        if not cold:
            return _nothing
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._concurrency)
        leases = await anyio.to_thread.run_sync(engine.hold, tenant, cold, limiter=self._limiter)

        def release() -> None:
            for lease in leases:
                lease.release()

        return release
