"""Fair batching across tenants: one queue of requests, batches formed by deficit round-robin by rows.

Every inference request (``/v1/classify``, ``/v1/embed`` and the OpenAI-style routes) becomes one
:class:`Job`. A single worker thread takes a batch whenever the engine is free: when more rows wait
than one batch holds, :class:`FairQueue` visits the tenants in turn and gives each a quantum of rows
per visit, so a tenant with 1,000 queued rows cannot make a tenant with 1 row wait behind all of them.
While one batch runs the next one accumulates (no fixed wait), so a lone request is served at once.
Jobs that need a pass of their own (``runs_alone``: a full fine-tune's rows) are taken in the same fair
order but run in a second thread, beside the next batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters_store.errors import LoraplexError, ServiceUnavailable, TooManyRequests
from serving.preload import lower_thread_priority

logger = logging.getLogger("loraplex.fairness")
# A pass of its own (a full fine-tune) yields the CPU to the shared batches' threads: nice 5 weighs
# ~1/3 of nice 0 with the kernel's scheduler, so it still progresses on a busy host.
ALONE_NICENESS = 5


@dataclass
class Job:
    """One request's rows. ``payload`` is what the batch function gets; ``rows`` is its cost."""

    tenant: str
    rows: int
    payload: Any
    enqueued: float = 0.0
    future: Any = field(default=None, repr=False)
    loop: Any = field(default=None, repr=False)


class FairQueue:
    """Per-tenant FIFO queues served by deficit round-robin by rows (not thread-safe on its own).

    A tenant gets ``quantum`` rows of credit per visit (the batch size over the tenants waiting, at
    least 1) and its jobs are taken while their rows fit its credit; an emptied tenant's credit is
    dropped, so nobody saves up. A request is never split: one larger than a batch goes alone.

    >>> q = FairQueue()
    >>> for i in range(3): q.push(Job("flood", 4, f"f{i}"))
    >>> q.push(Job("quiet", 1, "q0"))
    >>> [j.payload for j in q.take(5)]
    ['f0', 'q0']
    """

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # tenants waiting, in visiting order
        self._deficit: dict[str, int] = {}
        self.rows = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, job: Job) -> None:
        if job.tenant not in self._queues:
            self._queues[job.tenant] = deque()
            self._deficit[job.tenant] = 0
        self._queues[job.tenant].append(job)
        self.rows += job.rows

    def take(self, max_rows: int) -> list[Job]:
        """Jobs for one batch of at most ``max_rows`` rows (or one bigger job alone), fairly."""
        batch: list[Job] = []
        total = 0
        while self._queues:
            quantum = max(1, max_rows // len(self._queues))
            tenant, queue = next(iter(self._queues.items()))
            self._deficit[tenant] += quantum
            while queue and queue[0].rows <= self._deficit[tenant]:
                if batch and total + queue[0].rows > max_rows:
                    self._queues.move_to_end(tenant)  # keeps its credit for its next visit
                    return batch
                job = queue.popleft()
                self._deficit[tenant] -= job.rows
                self.rows -= job.rows
                total += job.rows
                batch.append(job)
            if queue:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant], self._deficit[tenant]
            if total >= max_rows:
                break
        return batch

    def expire(self, older_than: float) -> list[Job]:
        """Remove and return jobs enqueued before ``older_than`` (they waited too long)."""
        out: list[Job] = []
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            while queue and queue[0].enqueued < older_than:
                job = queue.popleft()
                self.rows -= job.rows
                out.append(job)
            if not queue:
                del self._queues[tenant], self._deficit[tenant]
        return out


BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


class FairBatcher:
    """Async front (``await submit(...)``) over one worker thread that runs ``process`` per batch (and,
    with ``runs_alone``, a second one for the payloads it names, so ``process`` must be thread-safe).

    ``process`` gets the payloads of one batch and returns one result per payload, in order.
    """

    def __init__(
        self,
        process: BatchFn,
        max_rows: int,
        max_wait_s: float,
        on_expired: Callable[[Job], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        runs_alone: Callable[[Any], bool] | None = None,
    ):
        self._process, self.max_rows, self.max_wait_s = process, max_rows, max_wait_s
        # Payloads that need a pass of their own (a full fine-tune's rows run a whole second backbone):
        # taken in the same fair order, but run and answered after the batch's other rows, so the
        # shared rows never wait for that pass.
        self._runs_alone = runs_alone
        self._on_expired, self._clock = on_expired, clock
        self._queue = FairQueue()
        self._cond = threading.Condition()
        self._closed = False
        # Those passes run in a thread of their own at a lower CPU priority, one at a time, so that
        # neither the shared rows of their batch nor the next batches queue behind them (in a storm
        # of cold loads the warm rows' p99 went from ~2.0x to ~1.5x their quiet p99, bench_cold.py).
        # One part waits at most: beyond that the batcher waits too, so a flood of full fine-tune
        # requests stays in the fair queue, where max_queue_ms and fair order still apply to it.
        self._alone: queue.Queue[list[Job] | None] = queue.Queue(maxsize=1)
        if runs_alone is not None:
            threading.Thread(target=self._run_alone, name="loraplex-alone", daemon=True).start()
        self._thread = threading.Thread(target=self._run, name="loraplex-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    async def submit(self, tenant: str, rows: int, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(tenant, rows, payload, self._clock(), loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise ServiceUnavailable("the service is shutting down")
            self._queue.push(job)
            self._cond.notify()
        return await job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not len(self._queue) and not self._closed:
                    self._cond.wait()
                if self._closed and not len(self._queue):
                    self._alone.put(None)  # after every job already handed to it
                    return
                expired = self._queue.expire(self._clock() - self.max_wait_s)
                batch = self._queue.take(self.max_rows)
            for job in expired:
                if self._on_expired is not None:
                    self._on_expired(job)
                message = f"request waited over {self.max_wait_s:g} s for the engine; retry shortly"
                _settle(job, error=TooManyRequests(message, retry_after=1.0))
            shared, alone = self._split(batch)
            if alone:
                self._alone.put(alone)
            if shared:
                self._run_batch(shared)

    def _run_alone(self) -> None:
        lower_thread_priority(ALONE_NICENESS)
        while (part := self._alone.get()) is not None:
            self._run_batch(part)

    def _split(self, batch: list[Job]) -> tuple[list[Job], list[Job]]:
        if self._runs_alone is None:
            return batch, []
        shared: list[Job] = []
        alone: list[Job] = []
        for job in batch:
            try:
                runs_alone = bool(self._runs_alone(job.payload))
            except Exception:  # the predicate only orders work; it never fails a request
                logger.exception("batch split failed")
                runs_alone = False
            (alone if runs_alone else shared).append(job)
        return shared, alone

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            results = self._process([job.payload for job in batch])
        except LoraplexError as err:
            for job in batch:
                _settle(job, error=err)
            return
        except Exception as err:  # a bug must fail these requests, not the worker
            logger.exception("batch failed")
            for job in batch:
                _settle(job, error=LoraplexError(f"inference failed: {type(err).__name__}"))
            return
        for job, result in zip(batch, results, strict=True):
            _settle(job, result=result)


def _settle(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    def deliver() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop is closed (shutdown)
        pass
