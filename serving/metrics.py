"""Prometheus metrics of the service, exported on BentoML's ``/metrics``.

Plain ``prometheus_client`` metrics (BentoML 1.4 deprecates ``bentoml.metrics``); BentoML's workers
run prometheus in multiprocess mode, so gauges say how to merge workers (``multiprocess_mode``).
Tenant labels are bounded: only tenants with a token (or ``-`` before authentication) appear.

BentoML gives every server on a host the same multiprocess folder (``$BENTOML_HOME/
prometheus_multiproc_dir``) and empties it when a server starts, so a second server wiped the first
one's metrics (``loraplex_ready 0`` on a ready server). :func:`use_server_folder` runs before any
metric below exists and moves this process to a folder of its own server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SERVER_FOLDERS = "loraplex-metrics"


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid, it names one server for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def server_folder_name(pid: int) -> str:
    start = _start_time(pid)
    return f"{pid}-{start}" if start else str(pid)


def use_server_folder(environ: dict[str, str] | os._Environ = os.environ) -> Path | None:
    """In a BentoML worker (``PROMETHEUS_MULTIPROC_DIR`` set), point prometheus at a folder of this
    server's own, next to BentoML's shared one: ``loraplex-metrics/<server pid>-<start time>``. The
    server is the worker's parent (BentoML's arbiter), so all its workers share the folder and no other
    server touches it. Folders of servers that are gone are removed. Elsewhere: nothing (None)."""
    shared = environ.get(MULTIPROC_ENV)
    if not shared:
        return None
    if Path(shared).parent.name == SERVER_FOLDERS:  # already moved (a second import)
        return Path(shared)
    root = Path(shared).resolve().parent / SERVER_FOLDERS
    own = server_folder_name(os.getppid())
    folder = root / own
    folder.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():
        pid = other.name.split("-", 1)[0]
        if other.name != own and pid.isdigit() and server_folder_name(int(pid)) != other.name:
            with contextlib.suppress(OSError):
                shutil.rmtree(other)
    environ[MULTIPROC_ENV] = str(folder)
    return folder


use_server_folder()

from prometheus_client import Counter, Gauge, Histogram  # noqa: E402  (after the folder is chosen)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter(
    name="loraplex_requests_total",
    documentation="HTTP requests by tenant, route and status code",
    labelnames=["tenant", "route", "status"],
)
LATENCY = Histogram(
    name="loraplex_request_duration_seconds",
    documentation="HTTP request latency by tenant and route",
    labelnames=["tenant", "route"],
    buckets=LATENCY_BUCKETS,
)
ITEMS = Counter(
    name="loraplex_inference_items_total",
    documentation="Inference rows answered, by tenant, task and outcome (ok or error code)",
    labelnames=["tenant", "task", "outcome"],
)
BATCH_ROWS = Histogram(
    name="loraplex_engine_batch_rows",
    documentation="Rows per engine call (one adaptive batch)",
    labelnames=["task"],
    buckets=BATCH_BUCKETS,
)
BATCH_TENANTS = Histogram(
    name="loraplex_engine_batch_tenants",
    documentation="Distinct tenants merged into one engine call",
    labelnames=["task"],
    buckets=BATCH_BUCKETS,
)
CACHE = Gauge(
    name="loraplex_cache",
    documentation="Adapter cache counters from the engine (hits, misses, evictions, loads, bytes, entries)",
    labelnames=["stat"],
    multiprocess_mode="livesum",
)
READY = Gauge(
    name="loraplex_ready",
    documentation="1 once the backbone is loaded and the replica serves",
    multiprocess_mode="livemax",
)


def route_label(path: str) -> str:
    """A bounded route name for labels: never the raw path (tenant and adapter names live there)."""
    if path.startswith("/v1/admin"):
        return "admin"
    if path.startswith("/v1/adapters"):
        return "adapters"
    if path in ("/v1/classify", "/v1/embed"):
        return path.rsplit("/", 1)[1]
    return "other"


def observe_request(tenant: str | None, path: str, status: int, seconds: float) -> None:
    route = route_label(path)
    REQUESTS.labels(tenant=tenant or "-", route=route, status=str(status)).inc()
    LATENCY.labels(tenant=tenant or "-", route=route).observe(seconds)


def observe_batch(task: str, rows: int, tenants: int) -> None:
    BATCH_ROWS.labels(task=task).observe(rows)
    BATCH_TENANTS.labels(task=task).observe(tenants)


def observe_item(tenant: str, task: str, outcome: str) -> None:
    ITEMS.labels(tenant=tenant, task=task, outcome=outcome).inc()


def publish_cache_stats(stats: Mapping[str, object], prefix: str = "") -> None:
    """Copy the engine's numeric cache counters into the ``loraplex_cache`` gauge; nested mappings
    (the full-model LRU's ``full``) become ``full_<stat>``."""
    for key, value in stats.items():
        if isinstance(value, Mapping):
            publish_cache_stats(value, prefix=f"{prefix}{key}_")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            CACHE.labels(stat=f"{prefix}{key}").set(float(value))


def set_ready(ready: bool) -> None:
    READY.set(1.0 if ready else 0.0)


TENANT_ROWS = Counter(
    name="loraplex_tenant_rows_total",
    documentation="Inference rows answered per tenant (items x fanned-out adapters), for billing",
    labelnames=["tenant"],
)
TENANT_TOKENS = Counter(
    name="loraplex_tenant_tokens_total",
    documentation="Tokens the backbone read for each tenant's text rows",
    labelnames=["tenant"],
)
TENANT_REJECTED = Counter(
    name="loraplex_tenant_rejected_total",
    documentation="Requests refused with 429 per tenant: rate (token bucket), rows (in flight), queue (waited too long)",
    labelnames=["tenant", "reason"],
)


def observe_usage(tenant: str, rows: int, tokens: int) -> None:
    TENANT_ROWS.labels(tenant=tenant).inc(rows)
    if tokens:
        TENANT_TOKENS.labels(tenant=tenant).inc(tokens)


def observe_rejected(tenant: str, reason: str) -> None:
    TENANT_REJECTED.labels(tenant=tenant, reason=reason).inc()


RESIDENT = Gauge(
    name="loraplex_adapter_resident_bytes",
    documentation="Adapter versions loaded on this replica, in bytes (0 once evicted): input for "
    "adapter-aware routing. Only exported when /metrics needs a token.",
    labelnames=["tenant", "adapter", "version"],
    multiprocess_mode="livesum",
)
_resident_published: set[tuple[str, str, str]] = set()


def publish_residency(resident: Iterable[Mapping[str, object]], protected: bool) -> None:
    """Per-adapter residency (``Engine.resident()``) into ``loraplex_adapter_resident_bytes``.

    Tenant and adapter names are customer data, so nothing is published while /metrics is public.
    Evicted versions drop to 0 rather than disappearing: prometheus' multiprocess files cannot
    remove a series."""
    if not protected:
        return
    now = {(str(r["tenant"]), str(r["name"]), str(r["version"])): float(r["bytes"]) for r in resident}
    for labels in _resident_published - now.keys():
        RESIDENT.labels(*labels).set(0.0)
    for labels, nbytes in now.items():
        RESIDENT.labels(*labels).set(nbytes)
    _resident_published.update(now)
