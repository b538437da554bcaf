"""Adapter references -> manifests, with alias answers trusted for at most ``ttl_s`` seconds.

A reference inside a tenant is ``name``, ``name@3`` or ``name@production``. Without ``@`` the alias
``production`` is tried first and ``latest`` second. A manifest carries its content digest, which is
the cache key downstream, so a re-push under the same alias is served as soon as the TTL lapses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from adapters_store.bundle import AdapterManifest
from adapters_store.errors import InvalidName, NotFound, StoreUnavailable
from adapters_store.names import LATEST, AdapterRef, validate_name

PRODUCTION = "production"
_MAX_CACHED = 65_536  # resolutions kept; expired ones are pruned when this is reached
# After the store failed to answer, requests do not wait on it again for this long: warm tenants get
# their last known answer, others a 503 at once. The first request after it asks the store again.
STORE_RETRY_S = 5.0
# An expired answer whose alias still names the same version is kept after reading only the alias (a
# version never changes), but its manifest is read again at least this often: a store replaced under
# a running server (numbers start again at 1) is noticed within this bound.
FULL_RECHECK_S = 60.0

T = TypeVar("T")


class Resolved(NamedTuple):
    """A resolved reference; ``digest`` is computed once here (it hashes the manifest's JSON)."""

    manifest: AdapterManifest
    digest: str


def parse_tenant_ref(tenant: str, adapter: str) -> tuple[AdapterRef, bool]:
    """(reference, explicit selector?). A tenant can only name its own adapters: no '/' allowed.

    >>> parse_tenant_ref("acme", "intent")
    (AdapterRef(tenant='acme', name='intent', selector='latest'), False)
    """
    validate_name(tenant, "tenant")
    if not isinstance(adapter, str) or "/" in adapter:
        raise InvalidName(
            f"adapter {str(adapter)[:80]!r} must be 'name', 'name@version' or 'name@alias' (no '/')"
        )
    return AdapterRef.parse(adapter, tenant=tenant), "@" in adapter


class AliasResolver:
    """Resolves ``(tenant, adapter)`` through an AdapterStore with a small TTL cache."""

    def __init__(self, store, ttl_s: float, store_retry_s: float = STORE_RETRY_S):
        self._store = store
        self._ttl = ttl_s
        self._store_retry_s = store_retry_s
        self._store_down_until = 0.0
        # (tenant, adapter) -> (answer, expires at, next full manifest read at)
        self._cache: dict[tuple[str, str], tuple[Resolved, float, float]] = {}
        # Stores that can name a version without its manifest (every ObjectStore); test doubles and
        # wrappers that only resolve() get the full read on every expiry.
        self._version_of = getattr(store, "resolve_version", None)
        self._generation = 0  # bumped by forget(): an answer read before a forget is never cached
        self._lock = threading.Lock()

    def resolve(self, tenant: str, adapter: str) -> Resolved:
        key = (tenant, adapter)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            generation = self._generation
        if hit is not None and hit[1] > now:
            return hit[0]
        ref = parse_tenant_ref(tenant, adapter)
        if now < self._store_down_until:  # failed a moment ago: answer without waiting on it again
            if hit is not None:
                return hit[0]
            raise StoreUnavailable("the adapter store is unreachable; retry later")
        try:
            resolved, full = self._fresh(*ref, hit, now)
        except StoreUnavailable:
            self._store_down_until = time.monotonic() + self._store_retry_s
            # Stale-if-error: while the store is unreachable a tenant served before keeps its last
            # known version (nothing can have been promoted meanwhile: promotes go through the store).
            if hit is not None:
                return hit[0]
            raise
        if self._ttl > 0:
            with self._lock:
                if generation != self._generation:  # a forget() ran while we read: our answer may be stale
                    return resolved
                if len(self._cache) >= _MAX_CACHED:
                    self._prune(now)
                self._cache[key] = (resolved, now + self._ttl, full)
        return resolved

    def _fresh(
        self, ref: AdapterRef, explicit: bool, hit: tuple[Resolved, float, float] | None, now: float
    ) -> tuple[Resolved, float]:
        """The current answer and when its manifest must next be read in full. An expired answer whose
        alias still names its version is kept after one alias read (no manifest read and parse: that
        was most of a busy batch's Python time when answers lapsed together)."""
        if hit is not None and now < hit[2] and ref.version is None and self._version_of is not None:
            if self._lookup_version(ref, explicit) == hit[0].manifest.version:
                return hit[0], hit[2]
        manifest = self._lookup(ref, explicit)
        if hit is not None and _same_version(hit[0].manifest, manifest):
            # A stored version never changes (numbers are never reused), so its digest is kept: hashing
            # the manifest again on every expiry was ~3% of a busy server's CPU.
            return Resolved(manifest, hit[0].digest), now + FULL_RECHECK_S
        return Resolved(manifest, manifest.digest), now + FULL_RECHECK_S

    def peek(self, tenant: str, adapter: str) -> Resolved | None:
        """The cached, unexpired resolution, or None; never reads the store."""
        with self._lock:
            hit = self._cache.get((tenant, adapter))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def _prune(self, now: float) -> None:
        for key in [k for k, (_, expiry, _) in self._cache.items() if expiry <= now]:
            del self._cache[key]
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()

    def _lookup(self, ref: AdapterRef, explicit: bool) -> AdapterManifest:
        return _by_alias(self._store.resolve, ref, explicit)

    def _lookup_version(self, ref: AdapterRef, explicit: bool) -> int:
        """The version :meth:`_lookup` would answer, from the alias (or the version listing) alone."""
        return _by_alias(self._version_of, ref, explicit)

    def forget(self, tenant: str, name: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            for key in [
                k for k in self._cache if k[0] == tenant and (name is None or _name_of(k[1]) == name)
            ]:
                del self._cache[key]


def _name_of(adapter: str) -> str:
    return adapter.partition("@")[0]


def _same_version(a: AdapterManifest, b: AdapterManifest) -> bool:
    """The same stored version, field for field. Its digest can then be kept. Comparing only the number
    and ``created_at`` (stamped to the second) took a replaced store's new v1, put within the same
    second, for the old one: the old weights stayed served under the new manifest."""
    return a == b


def _by_alias(read: Callable[[AdapterRef], T], ref: AdapterRef, explicit: bool) -> T:
    """``read`` of what a bare adapter name means: ``@production``, else ``@latest``; an explicit
    selector as given."""
    if explicit:
        return read(ref)
    try:
        return read(AdapterRef(ref.tenant, ref.name, PRODUCTION))
    except NotFound:
        return read(AdapterRef(ref.tenant, ref.name, LATEST))
