"""Head-step benchmark: what per-tenant heads cost in a batch served on onnxruntime (real all-MiniLM-L6-v2).

Run: ``.venv/bin/python benchmarks/bench_heads.py`` (about 2 minutes on 2 cores, most of it the fp32
export). Prints one line per figure and writes benchmarks/results/heads.md.

Setup: a temporary store with the real MiniLM as base ``minilm``, its validated fp32 export, and 64
tenants with a 3-label head each (half with a 64-wide hidden layer, tanh). One engine call answers 64
rows, one per tenant, different short sentences, ``runtime="onnx"`` (the plain graph: heads only).
Measured per round: the whole ``Engine.infer`` and the time spent inside the heads (``HeadParams``,
one op per adapter on all of its rows, as ``serving/engine/forward.py`` applies them). Also measured
on the same pooled features: the two batched forms tried instead of one op per adapter (every head's
weights in ONE GEMM over all rows; per-row weights gathered for one ``bmm``). Figures are medians over
rounds (issue 18: torch may keep the head step if it is under 2% of the batch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from texts import sentences  # noqa: E402

from adapters_store import describe_base, open_store  # noqa: E402
from serving.engine import Engine, EngineSettings, InferenceItem  # noqa: E402
from serving.engine.heads import HeadParams  # noqa: E402


def one_gemm(heads: list[HeadParams], feats: torch.Tensor) -> torch.Tensor:
    """One-layer heads only: every row times every head's weights in one GEMM (then pick columns)."""
    return torch.addmm(torch.cat([h.out_b for h in heads]), feats, torch.cat([h.out_w for h in heads]).t())


def gathered_bmm(heads: list[HeadParams], feats: torch.Tensor) -> torch.Tensor:
    """One-layer heads only, one row each: each row's weights gathered into [rows, out, H], one bmm."""
    w = torch.stack([h.out_w for h in heads])
    b = torch.stack([h.out_b for h in heads])
    return torch.baddbmm(b.unsqueeze(1), feats.unsqueeze(1), w.transpose(1, 2))


def time_alternatives(heads: list[HeadParams], feats: torch.Tensor, call) -> dict[str, float]:
    """Seconds for the engine's form (one op per adapter, here one row each) and the two batched forms."""
    forms = {
        "per adapter": lambda: [call(h, feats[i : i + 1]) for i, h in enumerate(heads)],
        "one GEMM": lambda: one_gemm(heads, feats),
        "gathered bmm": lambda: gathered_bmm(heads, feats),
    }
    out = {}
    with torch.inference_mode():
        for name, fn in forms.items():
            t0 = time.perf_counter()
            fn()
            out[name] = time.perf_counter() - t0
    return out


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from tests.helpers.models import minilm_dir
    from tests.test_engine_support import head_bundle
    from training.onnx_export import export_base

    torch.set_num_threads(args.threads)
    store = open_store(tempfile.mkdtemp(prefix="bench-heads-") + "/store")
    base = store.register_base(describe_base("minilm", minilm_dir()))
    for i in range(64):
        store.put(
            head_bundle(base, f"t{i:02d}", "intent", i, ["a", "b", "c"], hidden=64 if i % 2 else None)[0]
        )
    export_base(store, "minilm")
    engine = Engine(store, base="minilm", settings=EngineSettings(threads=args.threads, runtime="onnx"))
    spent = [0.0]
    call = HeadParams.__call__

    def timed(self: HeadParams, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return call(self, x)
        finally:
            spent[0] += time.perf_counter() - t0

    HeadParams.__call__ = timed  # type: ignore[method-assign]
    texts = sentences(64 * (args.rounds + 2), seed=18)
    batch, heads, share = [], [], []
    one = [HeadParams(out_w=torch.randn(3, 384), out_b=torch.randn(3)) for _ in range(64)]
    alt = {"per adapter": [], "one GEMM": [], "gathered bmm": []}
    for r in range(args.rounds + 2):
        items = [InferenceItem(f"t{i:02d}", "intent", "classify", text=texts[r * 64 + i]) for i in range(64)]
        spent[0] = 0.0
        t0 = time.perf_counter()
        engine.infer(items)
        total, in_heads = time.perf_counter() - t0, spent[0]
        for name, seconds in time_alternatives(one, torch.randn(64, 384), call).items():
            alt[name].append(seconds)
        if r >= 2:  # warm-up rounds dropped
            batch.append(total)
            heads.append(in_heads)
            share.append(in_heads / total)
    load = os.getloadavg()
    lines = [
        f"# Head step on onnxruntime (real MiniLM, {cpu_model()}, {args.threads} threads, "
        f"load average {load[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{args.rounds} rounds)",
        "",
        f"- engine call, 64 rows of 64 head tenants: {statistics.median(batch) * 1e3:.1f} ms",
        f"- of which inside the heads: {statistics.median(heads) * 1e3:.2f} ms, "
        f"share {statistics.median(share) * 100:.2f}% (max {max(share) * 100:.2f}%)",
        "- 64 one-layer 3-label heads on 64 rows, medians: "
        + ", ".join(f"{k} {statistics.median(v[2:]) * 1e3:.2f} ms" for k, v in alt.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "benchmarks" / "results" / "heads.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
