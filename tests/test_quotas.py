"""Quotas and fair batching as units: token bucket, rows in flight, overrides from the store, the
deficit round-robin queue and the batcher thread in front of the engine."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from adapters_store.errors import TooManyRequests, ValidationError
from adapters_store.quotas import TenantQuota
from serving.fairness import ALONE_NICENESS, FairBatcher, FairQueue, Job
from serving.quotas import QuotaBook, TokenBucket, UsageLedger

DEFAULTS = TenantQuota(rps=2.0, burst=2, max_inflight_rows=10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, capacity=2.0, tokens=2.0, stamp=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)  # the next token in half a second
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0 and bucket.take(10.0) == 0.0 and bucket.take(10.0) > 0  # capped at 2


def test_rate_limit_answers_429_with_retry_after_and_counts_rejections():
    clock, usage = Clock(), UsageLedger()
    book = QuotaBook(DEFAULTS, clock=clock, usage=usage)
    for _ in range(2):
        book.admit("acme", 1)
        book.release("acme", 1)
    with pytest.raises(TooManyRequests) as e:
        book.admit("acme", 1)
    assert e.value.headers() == {"Retry-After": "1"} and "2 requests/s" in e.value.message
    book.admit("globex", 1)  # another tenant has its own bucket
    clock.now += 0.5
    book.admit("acme", 1)
    snap = usage.snapshot()["tenants"]
    assert snap["acme"]["rejected"] == 1 and snap["acme"]["requests"] == 3 and snap["globex"]["requests"] == 1


def test_rows_in_flight_are_limited_and_released():
    book = QuotaBook(TenantQuota(rps=1000, burst=1000, max_inflight_rows=10))
    book.admit("acme", 6)
    with pytest.raises(TooManyRequests, match="6 rows in flight"):
        book.admit("acme", 5)
    book.admit("acme", 4)
    assert book.inflight_rows("acme") == 10
    book.release("acme", 6)
    book.admit("acme", 5)
    with pytest.raises(ValidationError, match="at most 10 rows"):  # can never fit: 422, not 429
        book.admit("acme", 11)


def test_overrides_from_the_store_replace_defaults_without_a_restart(local_store):
    clock = Clock()
    book = QuotaBook(DEFAULTS, local_store.quotas, refresh_s=5.0, clock=clock)
    book.refresh(force=True)
    assert book.quota("acme") == DEFAULTS
    local_store.set_quota("acme", TenantQuota(rps=50.0))
    clock.now += 1
    book.refresh()
    assert book.quota("acme").rps == 2.0  # not re-read before refresh_s
    clock.now += 5
    book.refresh()
    assert book.quota("acme") == TenantQuota(rps=50.0, burst=2, max_inflight_rows=10)
    assert book.quota("globex") == DEFAULTS
    local_store.delete_quota("acme")
    book.refresh(force=True)
    assert book.quota("acme") == DEFAULTS


def test_store_keeps_quotas_per_tenant_and_skips_damaged_ones(local_store):
    local_store.set_quota("acme", TenantQuota(burst=7))
    local_store.set_quota("globex", TenantQuota(max_inflight_rows=3))
    local_store._write("quotas/broken.json", b"{nope")
    assert local_store.quotas() == {
        "acme": TenantQuota(burst=7),
        "globex": TenantQuota(max_inflight_rows=3),
    }
    with pytest.raises(Exception, match="invalid tenant"):
        local_store.set_quota("../x", TenantQuota())


def _jobs(queue: FairQueue, tenant: str, n: int, rows: int) -> None:
    for i in range(n):
        queue.push(Job(tenant, rows, f"{tenant}{i}"))


def test_fair_queue_does_not_make_a_small_tenant_wait_behind_a_flood():
    q = FairQueue()
    _jobs(q, "flood", 1000, 1)  # 1,000 queued rows first
    _jobs(q, "quiet", 1, 1)
    first = [j.payload for j in q.take(64)]
    assert "quiet0" in first and len(first) == 64
    assert q.rows == 1000 + 1 - 64


@pytest.mark.parametrize(
    ("jobs", "max_rows", "expected"),
    [
        # equal shares of a batch across three tenants (quantum: 6 rows / 3 tenants)
        ([("a", 6, 1), ("b", 6, 1), ("c", 6, 1)], 6, ["a0", "a1", "b0", "b1", "c0", "c1"]),
        # rows, not requests, are counted: one 4-row request of a = four 1-row requests of b
        ([("a", 3, 4), ("b", 6, 1)], 8, ["a0", "b0", "b1", "b2", "b3"]),
        # a request bigger than a batch goes alone rather than never
        ([("a", 1, 100), ("b", 1, 1)], 8, ["b0"]),
    ],
)
def test_fair_queue_table(jobs, max_rows, expected):
    q = FairQueue()
    for tenant, n, rows in jobs:
        _jobs(q, tenant, n, rows)
    assert [j.payload for j in q.take(max_rows)] == expected


def test_fair_queue_oversized_request_is_taken_alone_eventually():
    q = FairQueue()
    _jobs(q, "a", 1, 100)
    assert [j.payload for j in q.take(8)] == ["a0"] and len(q) == 0 and q.rows == 0


def test_fair_queue_expires_old_jobs():
    q = FairQueue()
    q.push(Job("a", 1, "old", enqueued=1.0))
    q.push(Job("a", 1, "new", enqueued=5.0))
    assert [j.payload for j in q.expire(older_than=2.0)] == ["old"]
    assert [j.payload for j in q.take(8)] == ["new"]


def test_batcher_merges_waiting_requests_fairly_into_one_call():
    calls: list[list[str]] = []
    gate = threading.Event()

    def process(payloads):
        gate.wait(5)
        calls.append(list(payloads))
        return [p.upper() for p in payloads]

    async def main():
        batcher = FairBatcher(process, max_rows=4, max_wait_s=30)
        first = asyncio.ensure_future(batcher.submit("a", 1, "a-first"))
        await asyncio.sleep(0.05)  # the worker is now busy with a-first
        rest = [batcher.submit("a", 1, f"a{i}") for i in range(5)] + [batcher.submit("b", 1, "b0")]
        tasks = [asyncio.ensure_future(t) for t in rest]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *tasks)
        batcher.close()
        return out

    out = asyncio.run(main())
    assert out[0] == "A-FIRST" and out[-1] == "B0"
    assert calls[0] == ["a-first"]
    assert "b0" in calls[1] and len(calls[1]) == 4  # b is not left behind a's five


def test_batcher_answers_429_when_a_request_waited_too_long():
    clock = Clock()
    expired: list[str] = []

    def process(payloads):
        clock.now += 10  # this batch took 10 s
        return payloads

    async def main():
        batcher = FairBatcher(
            process, 1, max_wait_s=5, on_expired=lambda j: expired.append(j.tenant), clock=clock
        )
        tasks = [asyncio.ensure_future(batcher.submit("a", 1, i)) for i in range(2)]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        batcher.close()
        return out

    first, second = asyncio.run(main())
    assert first == 0
    assert isinstance(second, TooManyRequests) and second.headers() == {"Retry-After": "1"}
    assert expired == ["a"]


def test_rows_that_run_alone_are_answered_after_the_shared_rows_of_their_batch():
    """A full fine-tune's row runs a whole backbone pass of its own; the warm shared rows taken in the
    same batch are answered first instead of waiting for it."""
    gate, full_gate, calls = threading.Event(), threading.Event(), []

    def process(payloads):
        calls.append(list(payloads))
        if payloads == ["first"]:
            gate.wait(5)
        if any(p.startswith("full") for p in payloads):
            full_gate.wait(5)
        return [p.upper() for p in payloads]

    async def main():
        batcher = FairBatcher(process, max_rows=8, max_wait_s=30, runs_alone=lambda p: p.startswith("full"))
        first = asyncio.ensure_future(batcher.submit("z", 1, "first"))
        await asyncio.sleep(0.05)  # the worker is busy: the next three land in one batch
        full = asyncio.ensure_future(batcher.submit("a", 1, "full-a"))
        warm = [asyncio.ensure_future(batcher.submit(t, 1, f"warm-{t}")) for t in ("b", "c")]
        await asyncio.sleep(0.05)
        gate.set()
        answered = await asyncio.wait_for(asyncio.gather(*warm), timeout=2)  # while full-a still runs
        assert not full.done()
        full_gate.set()
        out = [await first, await full, *answered]
        batcher.close()
        return out

    assert asyncio.run(main()) == ["FIRST", "FULL-A", "WARM-B", "WARM-C"]
    assert calls[0] == ["first"] and sorted(calls[1:]) == [["full-a"], ["warm-b", "warm-c"]]


def test_the_next_batches_do_not_wait_for_a_pass_of_its_own():
    """A full fine-tune's pass runs in a thread of its own: batches taken after it are answered while
    it still runs (in a storm of cold loads the warm p99 went from ~2.0x to ~1.5x its quiet p99)."""
    full_gate = threading.Event()

    def process(payloads):
        if payloads[0].startswith("full"):
            assert full_gate.wait(5)
        return [p.upper() for p in payloads]

    async def main():
        batcher = FairBatcher(process, max_rows=8, max_wait_s=30, runs_alone=lambda p: p.startswith("full"))
        full = asyncio.ensure_future(batcher.submit("a", 1, "full-a"))
        await asyncio.sleep(0.05)  # its pass has started
        for i in range(3):  # three later batches, one after the other
            assert await asyncio.wait_for(batcher.submit("b", 1, f"warm-{i}"), timeout=2) == f"WARM-{i}"
        assert not full.done()
        full_gate.set()
        answer = await full
        batcher.close()
        return answer

    assert asyncio.run(main()) == "FULL-A"


def test_passes_of_their_own_run_at_a_lower_cpu_priority_and_wait_in_the_fair_queue_when_busy():
    """The shared batches' thread keeps the CPU; and behind a running pass at most one more waits
    outside the fair queue, so a flood of full fine-tune requests stays under max_queue_ms and fair
    order instead of piling up where neither applies."""
    gate, nice = threading.Event(), {}

    def process(payloads):
        nice[payloads[0]] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if payloads[0].startswith("full"):
            assert gate.wait(5)
        return payloads

    async def main():
        batcher = FairBatcher(process, max_rows=1, max_wait_s=30, runs_alone=lambda p: p.startswith("full"))
        jobs = [asyncio.ensure_future(batcher.submit(t, 1, f"full-{t}")) for t in "abcde"]
        await asyncio.sleep(0.2)
        queued = batcher.queued_rows  # one runs, one waits for it, one is in the batcher's hand
        gate.set()
        await asyncio.gather(*jobs)
        assert await batcher.submit("z", 1, "warm") == "warm"
        batcher.close()
        return queued

    assert asyncio.run(main()) == 2
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice["full-a"] == min(19, mine + ALONE_NICENESS) > mine and nice["warm"] == mine


def test_a_failing_split_predicate_only_loses_the_ordering():
    def boom(payload):
        raise RuntimeError("bug")

    async def main():
        batcher = FairBatcher(lambda ps: [p * 2 for p in ps], max_rows=4, max_wait_s=30, runs_alone=boom)
        out = await asyncio.gather(*(batcher.submit("a", 1, i) for i in range(3)))
        batcher.close()
        return out

    assert asyncio.run(main()) == [0, 2, 4]
