"""What each of BentoML's per-request ASGI middlewares costs, alone, in front of a trivial app.

Run: ``.venv/bin/python benchmarks/bench_asgi_layers.py`` (about 20 s). Prints a markdown table and
writes benchmarks/results/asgi_layers.md.

Each layer is built as BentoML 1.4's service app builds it (``_bentoml_impl/server/app.py``
``middlewares``: its tracer provider, metrics client and access logger) and wrapped around an app that
answers 200 with a small JSON body. The ASGI callable is driven directly in one event loop (no socket,
no HTTP parsing), ``--requests`` times per round, rounds interleaved; the figure is the median of
rounds of (µs per request with the layer) - (µs per request of the bare app), for a path the layer
handles and for one in its skip list (how loraplex's ``inference_telemetry=false`` leaves the
inference routes; BentoML's request metrics skip only their last-request timestamp there). The access logger writes to /dev/null: the cost of formatting and emitting the
line, not of a terminal or a log collector.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import facts_line, run_facts  # noqa: E402

LOAD_AT_START = os.getloadavg()[0]
PATH, SKIPPED = "/v1/adapters", "/v1/classify"
BODY = b'[{"adapter":"intent","version":1,"labels":["a","b","c"],"scores":[0.5,0.3,0.2]}]'


async def bare(scope, receive, send) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def layers() -> dict[str, object]:
    """name -> the bare app wrapped in that one BentoML layer, configured as BentoML does."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.server.http.access import AccessLogMiddleware
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.util.http import ExcludeList

    @bentoml.service(name="layers")
    class Layers:  # BentoML's own defaults, merged as `bentoml serve` merges a service's config
        pass

    Layers.inject_config()
    access = logging.getLogger("bentoml.access")
    access.handlers[:] = [logging.StreamHandler(open(os.devnull, "w"))]  # noqa: SIM115
    access.setLevel(logging.INFO)
    access.propagate = False
    namespace = BentoMLContainer.api_server_config.metrics.namespace.get()
    return {
        "RunnerTrafficMetrics (prometheus)": RunnerTrafficMetricsMiddleware(
            bare, namespace=namespace, skip_paths=[SKIPPED]
        ),
        "OpenTelemetry (span per request)": OpenTelemetryMiddleware(
            bare,
            excluded_urls=ExcludeList([f"{SKIPPED}$"]),
            default_span_details=None,
            tracer_provider=BentoMLContainer.tracer_provider.get(),
        ),
        "AccessLog (one line per request)": AccessLogMiddleware(
            bare,
            has_request_content_length=True,
            has_request_content_type=True,
            has_response_content_length=True,
            has_response_content_type=True,
            skip_paths=[SKIPPED],
        ),
        "Timeout (traffic.timeout)": TimeoutMiddleware(bare, timeout=120.0),
    }


def scope(path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:3000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }


async def per_request_us(app, path: str, n: int) -> float:
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        return None

    start = time.perf_counter()
    for _ in range(n):
        await app(scope(path), receive, send)
    return (time.perf_counter() - start) / n * 1e6


async def measure(apps: dict[str, object], rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {name: {"handled": [], "skipped": []} for name in apps}
    for app in apps.values():  # warm-up: first-call setup (metrics registration, loggers)
        await per_request_us(app, PATH, 50)
    for _ in range(rounds):
        base = await per_request_us(bare, PATH, n)
        for name, app in apps.items():
            out[name]["handled"].append(await per_request_us(app, PATH, n) - base)
            out[name]["skipped"].append(await per_request_us(app, SKIPPED, n) - base)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--requests", type=int, default=2000)
    args = p.parse_args()
    try:  # the loop the server runs on (uvicorn's loop="auto")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    results = asyncio.run(measure(layers(), args.rounds, args.requests))
    rows = [
        f"| {name} | {statistics.median(r['handled']):.1f} ({min(r['handled']):.1f}-{max(r['handled']):.1f}) "
        f"| {statistics.median(r['skipped']):.1f} |"
        for name, r in results.items()
    ]
    loop = type(asyncio.new_event_loop()).__module__.split(".")[0]
    md = "\n".join(
        [
            "# BentoML's per-request ASGI layers: extra µs per request, each alone",
            "",
            "| layer | handled path: µs/request (median; min-max of rounds) | skipped path: µs/request |",
            "|---|---|---|",
            *rows,
            "",
            f"{args.rounds} rounds x {args.requests} requests, driven in-process on {loop}'s loop "
            "(no socket, no HTTP parsing); cost = layer - bare app in the same round. The timeout layer "
            "has no skip list (BentoML applies it to every route).",
            "",
            facts_line(run_facts(LOAD_AT_START)),
        ]
    )
    print(md)
    (REPO / "benchmarks" / "results" / "asgi_layers.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
