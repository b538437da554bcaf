"""Policy: an LRU of loaded adapters keyed by content digest, with a byte budget, pins and leases.

It never looks inside an entry (packing tensors is loader.py's job). The rules:

* a miss loads the new entry completely (the load function validates it) *before* anything is
  evicted, so a bad or slow load never costs a good resident adapter;
* an entry leased by an in-flight batch is never evicted; if leases and pins leave no room, the new
  entry is admitted over budget and the excess is trimmed as soon as leases are released;
* pinned owners (``tenant`` or ``tenant/name``) are never evicted;
* concurrent misses on one key load it once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Owner = tuple[str, str]  # (tenant, adapter name)


@dataclass
class _Entry:
    value: Any
    nbytes: int
    owner: Owner
    leases: int = 0


class Lease:
    """One in-flight user's hold on a cached value; ``release()`` exactly once (or use ``with``)."""

    __slots__ = ("_cache", "_entry", "_released")

    def __init__(self, cache: AdapterCache, entry: _Entry):
        self._cache, self._entry, self._released = cache, entry, False

    @property
    def value(self) -> Any:
        return self._entry.value

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    load_time_s: float = 0.0


class AdapterCache:
    """Thread-safe LRU by key with ``max_bytes`` and ``max_entries`` bounds and leases."""

    def __init__(self, max_bytes: int, max_entries: int | None = None, pins: Iterable[str] = ()):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._pins: set[str] = set(pins)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.counters = CacheCounters()

    # -- leases -----------------------------------------------------------------------------------
    def acquire(self, key: str, owner: Owner, load: Callable[[], tuple[Any, int]]) -> Lease:
        """Take a lease on ``key``'s value; ``load() -> (value, nbytes)`` runs on a miss. Release it."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.leases += 1
                    self.counters.hits += 1
                    return Lease(self, entry)
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    self.counters.misses += 1
                    break
            waiting.wait()  # another thread is loading this key; then look again
        return self._load(key, owner, load)

    def _load(self, key: str, owner: Owner, load: Callable[[], tuple[Any, int]]) -> Lease:
        started = time.perf_counter()
        try:
            value, nbytes = load()
        except BaseException:
            with self._lock:
                self.counters.load_failures += 1
                self._loading.pop(key).set()
            raise
        with self._lock:
            self.counters.loads += 1
            self.counters.load_time_s += time.perf_counter() - started
            entry = _Entry(value, nbytes, owner, leases=1)
            self._entries[key] = entry
            self._bytes += nbytes
            self._trim()  # only now, with the new entry complete, make room
            self._loading.pop(key).set()
        return Lease(self, entry)

    def _release(self, entry: _Entry) -> None:
        # The lease points at its own entry, so a re-load of an invalidated key is never miscounted.
        with self._lock:
            entry.leases -= 1
            self._trim()

    # -- policy -----------------------------------------------------------------------------------
    def _over(self) -> bool:
        too_many = self.max_entries is not None and len(self._entries) > self.max_entries
        return self._bytes > self.max_bytes or too_many

    def _pinned(self, owner: Owner) -> bool:
        return owner[0] in self._pins or f"{owner[0]}/{owner[1]}" in self._pins

    def _trim(self) -> None:
        if not self._over():
            return
        for key in [k for k, e in self._entries.items() if e.leases == 0 and not self._pinned(e.owner)]:
            self._drop(key)
            self.counters.evictions += 1
            if not self._over():
                return

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    # -- admin ------------------------------------------------------------------------------------
    def pin(self, owner_pattern: str) -> None:
        with self._lock:
            self._pins.add(owner_pattern)

    def unpin(self, owner_pattern: str) -> None:
        with self._lock:
            self._pins.discard(owner_pattern)
            self._trim()

    def invalidate(self, predicate: Callable[[Owner, Any], bool]) -> int:
        """Forget entries for which ``predicate(owner, value)`` holds now. A batch holding one keeps its
        own reference until it ends."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if predicate(e.owner, e.value)]
            for key in keys:
                self._drop(key)
            return len(keys)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def resident(self) -> list[tuple[Owner, Any, int]]:
        """``(owner, value, nbytes)`` of every loaded entry, least recently used first."""
        with self._lock:
            return [(e.owner, e.value, e.nbytes) for e in self._entries.values()]

    def residents(self) -> list[dict[str, Any]]:
        """What is loaded, least recently used first (evicted first): owner, key, bytes, pin, leases."""
        with self._lock:
            return [
                {
                    "tenant": e.owner[0],
                    "name": e.owner[1],
                    "key": key,
                    "bytes": e.nbytes,
                    "pinned": self._pinned(e.owner),
                    "leases": e.leases,
                }
                for key, e in self._entries.items()
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self.counters
            return {
                "hits": c.hits,
                "misses": c.misses,
                "loads": c.loads,
                "load_failures": c.load_failures,
                "evictions": c.evictions,
                "load_time_s": c.load_time_s,
                "bytes_used": self._bytes,
                "max_bytes": self.max_bytes,
                "entries": len(self._entries),
                "pinned": sum(1 for e in self._entries.values() if self._pinned(e.owner)),
                "leased": sum(1 for e in self._entries.values() if e.leases > 0),
            }
