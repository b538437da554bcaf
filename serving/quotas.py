"""Per-tenant quotas (token-bucket requests per second, rows in flight) and usage accounting.

The gateway calls :meth:`QuotaBook.admit` for every inference request once its body is parsed (so the
row count is known) and releases the rows when the response is sent; a refused request never reaches
the queue. Defaults come from the service settings; per-tenant overrides live in the store
(:mod:`adapters_store.quotas`) and are re-read every ``refresh_s``, and an admin change on this
replica applies at once, so limits change without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.errors import TooManyRequests, ValidationError
from adapters_store.quotas import TenantQuota
from serving import metrics

logger = logging.getLogger("loraplex.quotas")
Clock = Callable[[], float]


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a request takes one."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class _TenantState:
    bucket: TokenBucket
    inflight_rows: int = 0


class QuotaBook:
    """Effective quota per tenant (store override over defaults), buckets and rows in flight."""

    def __init__(
        self,
        defaults: TenantQuota,
        source: Callable[[], dict[str, TenantQuota]] | None = None,
        refresh_s: float = 2.0,
        clock: Clock = time.monotonic,
        usage: UsageLedger | None = None,
    ):
        if None in (defaults.rps, defaults.burst, defaults.max_inflight_rows):
            raise ValueError("default quota needs rps, burst and max_inflight_rows")
        self.defaults = defaults
        self.usage = usage
        self._source, self._refresh_s, self._clock = source, refresh_s, clock
        self._overrides: dict[str, TenantQuota] = {}
        self._loaded_at = float("-inf")
        self._tenants: dict[str, _TenantState] = {}
        self._lock = threading.Lock()  # admit/release come from the loop, overrides from threads

    # -- configuration ----------------------------------------------------------------------------
    def quota(self, tenant: str) -> TenantQuota:
        """The limits ``tenant`` is held to now (every field set)."""
        override = self._overrides.get(tenant)
        return override.over(self.defaults) if override else self.defaults

    def overrides(self) -> dict[str, TenantQuota]:
        return dict(self._overrides)

    def set_override(self, tenant: str, quota: TenantQuota | None) -> None:
        """Apply a change at once on this replica (the store copy reaches the others on refresh)."""
        with self._lock:
            if quota is None:
                self._overrides.pop(tenant, None)
            else:
                self._overrides[tenant] = quota
            self._tenants.pop(tenant, None)  # a new bucket with the new size and rate

    def refresh(self, force: bool = False) -> None:
        """Re-read the overrides from the store when they are older than ``refresh_s``."""
        if self._source is None or (not force and self._clock() - self._loaded_at < self._refresh_s):
            return
        self._loaded_at = self._clock()
        try:
            fresh = self._source()
        except Exception:  # the store being briefly unreachable must not stop inference
            logger.exception("reading quota overrides failed; keeping the previous ones")
            return
        with self._lock:
            changed = {t for t in set(fresh) | set(self._overrides) if fresh.get(t) != self._overrides.get(t)}
            self._overrides = fresh
            for tenant in changed:
                self._tenants.pop(tenant, None)

    # -- enforcement ------------------------------------------------------------------------------
    def admit(self, tenant: str, rows: int) -> None:
        """Take one request token and ``rows`` in-flight rows, or raise 429 with ``retry_after``."""
        quota = self.quota(tenant)
        if rows > quota.max_inflight_rows:
            raise ValidationError(
                f"request has {rows} rows; tenant {tenant!r} may have at most {quota.max_inflight_rows} "
                "rows in flight: split it"
            )
        with self._lock:
            state = self._state(tenant, quota)
            if state.inflight_rows + rows > quota.max_inflight_rows:
                self._rejected(tenant, "rows")
                raise TooManyRequests(
                    f"tenant {tenant!r} has {state.inflight_rows} rows in flight; its limit is "
                    f"{quota.max_inflight_rows}: retry when earlier requests have been answered",
                    retry_after=1.0,
                )
            wait = state.bucket.take(self._clock())
            if wait > 0:
                self._rejected(tenant, "rate")
                raise TooManyRequests(
                    f"tenant {tenant!r} is over its rate of {quota.rps:g} requests/s (burst {quota.burst})",
                    retry_after=wait,
                )
            state.inflight_rows += rows
        if self.usage is not None:
            self.usage.request(tenant)

    def release(self, tenant: str, rows: int) -> None:
        with self._lock:
            state = self._tenants.get(tenant)
            if state is not None:
                state.inflight_rows = max(0, state.inflight_rows - rows)

    def _rejected(self, tenant: str, reason: str) -> None:
        if self.usage is not None:
            self.usage.rejected(tenant, reason)

    def inflight_rows(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.inflight_rows if state else 0

    def _state(self, tenant: str, quota: TenantQuota) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            now = self._clock()
            bucket = TokenBucket(quota.rps, float(quota.burst), float(quota.burst), now)
            state = self._tenants[tenant] = _TenantState(bucket)
        return state


@dataclass
class TenantUsage:
    requests: int = 0
    rows: int = 0
    tokens: int = 0
    rejected: int = 0


@dataclass
class UsageLedger:
    """What each tenant used on this replica since it started (also exported on ``/metrics``)."""

    tenants: dict[str, TenantUsage] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # The event loop counts requests while the batcher thread, and the thread that runs full
    # fine-tunes' passes, count answered rows: ``+=`` on a shared counter is not atomic.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def answered(self, tenant: str, rows: int, tokens: int) -> None:
        with self._lock:
            usage = self.tenants.setdefault(tenant, TenantUsage())
            usage.rows += rows
            usage.tokens += tokens
        metrics.observe_usage(tenant, rows, tokens)

    def request(self, tenant: str) -> None:
        with self._lock:
            self.tenants.setdefault(tenant, TenantUsage()).requests += 1

    def rejected(self, tenant: str, reason: str) -> None:
        with self._lock:
            self.tenants.setdefault(tenant, TenantUsage()).rejected += 1
        metrics.observe_rejected(tenant, reason)

    def snapshot(self) -> dict:
        with self._lock:
            tenants = {t: vars(u).copy() for t, u in sorted(self.tenants.items())}
        return {"since": self.started, "tenants": tenants}
