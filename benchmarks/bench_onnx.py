"""ONNX benchmark on the real all-MiniLM-L6-v2: ORT fp32 / int8 / mixed-LoRA against torch eager.

Run: ``.venv/bin/python benchmarks/bench_onnx.py`` (a few minutes on 2 quiet cores). Prints a markdown table
and the issue-18 headline figures (GEMM roof, ORT fp32 share of it, int8/fp32 and its ceiling on this host:
ORT int8 / fp32 of one feed-forward GEMM alone, torch/ORT, fused/plain)
and writes benchmarks/results/onnx.json and onnx.md.

Setup: a temporary local store; MiniLM registered and exported with the project's own code
(``export_base`` fp32 and int8, ``export_lora_base`` for query+value), then loaded with
``serving.onnx_backbone``. One process with the engine's malloc settings (``keep_activation_memory``), torch and ORT on the same thread count (2, then 1; ORT
spinning off), inputs tokenized once beforehand (the same arrays for every path). Every path
computes the same outputs (mean-pooled, CLS, pooler; torch also the token states). Paths run interleaved round by round (start rotated each round); a ratio
is the median of per-round throughput ratios, with the min-max over rounds. With 1 thread the
calling thread's CPU time is reported too: on a shared box it is much less disturbed than wall time.
Targets are judged on the wall-time ratio.

Workloads: batch 32 of short sentences (14 words, ~20 tokens) and batch 8 of ~128-token texts.
"ort_fp32" is the stored fp32 export (fused or plain, whichever the export measured faster);
"ort_fp32_plain" / "ort_fp32_fused" are both candidates, built the same way, for the fused/plain figure.
"ort_fp32_dynamo_export" (``--extra``): the same module exported with dynamo=True, for the exporter choice. Mixed-LoRA: 16 adapters (r=8, alpha=16, query+value, seeded random A and B, PEFT key layout), row i
uses adapter i mod 16. "ort_lora_mixed" is the serving path: the adapters are resident in
``LoraSlots`` (as in ``serving.engine.ort_runtime``) and each call looks their slots up;
"ort_lora_mixed_stack_per_call" packs the 16 adapters into fresh graph inputs on every call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from adapters_store import describe_base, open_store  # noqa: E402
from serving.engine.engine import keep_activation_memory  # noqa: E402
from serving.onnx_backbone import (  # noqa: E402
    LoraSlots,
    LoraWeights,
    OrtBackbone,
    OrtLoraBackbone,
    OrtSettings,
    stack_loras,
)
from training.onnx_export.export import ExportSettings, export_base, load_base_model  # noqa: E402
from training.onnx_export.fusion import fuse_transformer  # noqa: E402
from training.onnx_export.lora_graph import LoraTextFeatures, export_lora_base  # noqa: E402
from training.onnx_export.quantize import ALL_MATMUL, Int8Plan, quantize_int8  # noqa: E402
from training.onnx_export.wrappers import TextFeatures  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
WORDS = (
    "the quick brown fox jumps over a lazy dog while my order of fresh bread arrived late again "
    "please refund the payment because service was slow yet staff were kind and helpful today "
    "our invoice shows a duplicate charge for the premium plan and support has not replied yet"
).split()
TARGETS = {"ort_fp32": 1.3, "ort_int8": 2.8, "ort_lora_mixed": 0.97}
# issue 18 (ratios of the short batch-32 workload at 2 threads)
ROOF_TARGET, INT8_TARGET, INT8_MIN_COSINE = 0.75, 2.0, 0.99


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)).capitalize() + "." for _ in range(n)]


def workloads(folder: str) -> dict[str, dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = {}
    for name, batch in (
        ("short: batch 32 x 14 words", texts(32, 14, 0)),
        ("long: batch 8 x ~128 tokens", texts(8, 110, 1)),
    ):
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
        out[name] = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
    return out


def random_adapters(n: int, layers: int, hidden: int, rank: int = 8, alpha: int = 16) -> list[LoraWeights]:
    """PEFT-layout LoRA tensors (as an adapter_model.safetensors would hold them), seeded."""
    rng = np.random.default_rng(42)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["query", "value"]}
    adapters = []
    for _ in range(n):
        tensors = {}
        for layer in range(layers):
            for t in ("query", "value"):
                key = f"base_model.model.encoder.layer.{layer}.attention.self.{t}"
                tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) * 0.05).astype(
                    np.float32
                )
                tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((hidden, rank)) * 0.05).astype(
                    np.float32
                )
        adapters.append(LoraWeights.from_peft(config, tensors))
    return adapters


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def interleave(
    paths: dict[str, Callable[[], object]], rounds: int, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, process CPU) seconds per call of each path, per round; the start path rotates.

    Process CPU time counts every thread of this process (ORT's pool and torch's alike), so it is the
    work itself, unaffected by time the threads spend descheduled while other processes run."""
    for fn in paths.values():  # warm-up: first calls allocate
        fn()
        fn()
    names = list(paths)
    wall: dict[str, list[float]] = {n: [] for n in paths}
    cpu: dict[str, list[float]] = {n: [] for n in paths}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                paths[name]()
            wall[name].append((time.perf_counter() - t0) / reps)
            cpu[name].append((time.process_time() - c0) / reps)
    return wall, cpu


def ratio(times: dict[str, list[float]], ref: str, path: str) -> dict[str, float]:
    per_round = [a / b for a, b in zip(times[ref], times[path], strict=True)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def cpu_model() -> str:
    """``lscpu``'s model name (the figures depend on it: the same code ran ORT at half speed on another host)."""
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), "?")


ROOF_SIZES = (1024, 2048)


def gemm_roof(threads: int, reps: int = 8) -> tuple[float, float]:
    """The host's fp32 matmul roof: GFLOP/s of large square fp32 GEMMs (torch.mm = MKL/oneDNN sgemm) with
    ``threads`` threads, best over sizes and ``reps`` calls (the best is the roof, the rest is noise).

    Returns (wall-time roof, CPU-time roof): the second is FLOPs / (process CPU seconds / threads), which
    other processes on a shared box barely disturb; compare it with ORT's CPU-time figure."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best_wall = best_cpu = 0.0
    for n in ROOF_SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.mm(a, b)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best_wall = max(best_wall, 2 * n**3 / wall / 1e9)
            best_cpu = max(best_cpu, 2 * n**3 / (cpu / threads) / 1e9)
    torch.set_num_threads(before)
    return best_wall, best_cpu


# MiniLM's feed-forward GEMMs at batch 32 x 22 tokens: [tokens, in] x [in, out], in and out.
GEMM_SHAPES = ((704, 384, 1536), (704, 1536, 384))


def int8_gemm_ceiling(threads: int, rounds: int = 7, reps: int = 5) -> dict[str, dict[str, float]]:
    """ORT int8 / ORT fp32 speed of ONE weight MatMul of MiniLM's feed-forward shapes, quantised exactly
    as the export quantises (``quantize_int8``, every MatMul): the most int8 can give the whole graph on
    this host, since norms, softmax, GELU and the quantise steps do not get faster. Throughput ratio per
    round (fp32 time / int8 time), median over rounds, wall and process CPU time."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for m, k, n in GEMM_SHAPES:
        weight = numpy_helper.from_array((0.05 * rng.standard_normal((k, n))).astype(np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="ffn")],
            "gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [weight],
        )
        fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        opts = OrtSettings(threads=threads).session_options()
        sessions = {
            name: ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"])
            for name, g in (("fp32", fp32), ("int8", quantize_int8(fp32)))
        }
        feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}
        wall: dict[str, list[float]] = {"fp32": [], "int8": []}
        cpu: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(rounds):
            for name, session in sessions.items():
                session.run(None, feed)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    session.run(None, feed)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        out[f"{m}x{k}x{n}"] = {
            "wall": statistics.median(f / i for f, i in zip(wall["fp32"], wall["int8"], strict=True)),
            "cpu": statistics.median(f / i for f, i in zip(cpu["fp32"], cpu["int8"], strict=True)),
            "fp32_gflops": 2 * m * k * n * reps / statistics.median(wall["fp32"]) / 1e9,
        }
    return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def encoder_flops(config, batch: int, seq: int) -> float:
    """FLOPs of one BERT-family encoder pass over a padded [batch, seq] input (a multiply-add is 2):
    Q, K, V, O projections and the feed-forward per token, plus the attention scores and weighted sum."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * h * h + 2 * h * inter) + 2 * 2 * batch * seq * seq * h
    return float(layers * per_layer)


def build(tmp: Path, extra: bool) -> dict:
    from tests.helpers.models import minilm_dir

    folder = minilm_dir()
    store = open_store(str(tmp / "store"))
    store.register_base(describe_base("minilm", folder))
    entry = store.get_base("minilm")
    settings = ExportSettings(threads=THREADS)
    t0 = time.perf_counter()
    fp32 = export_base(store, "minilm", settings=settings)
    t1 = time.perf_counter()
    int8 = export_base(store, "minilm", quantize="int8", settings=settings)
    t2 = time.perf_counter()
    lora = export_lora_base(store, "minilm", targets=("query", "value"), settings=settings)
    t3 = time.perf_counter()
    return {
        "dynamo_graph": dynamo_graph(entry) if extra else None,
        "candidates": fp32_candidates(entry),
        "folder": str(folder),
        "store": store,
        "entry": entry,
        "reports": {"fp32": fp32.manifest, "int8": int8.manifest, "lora-fp32": lora.manifest},
        "export_s": {"fp32": t1 - t0, "int8 (incl. fp32 again + plans)": t2 - t1, "lora-fp32": t3 - t2},
    }


def fp32_candidates(entry) -> dict[str, bytes]:
    """The plain (eager-attention trace) and ORT-fused graphs the export chose between."""
    from training.onnx_export.export import export_graph
    from training.onnx_export.probes import shape_probes
    from training.onnx_export.specs import spec_for
    from training.onnx_export.wrappers import features_module, pooler_of

    model = load_base_model(entry)
    model.set_attn_implementation("eager")
    spec = spec_for(entry.model_type)
    outputs = spec.output_names(has_pooler=pooler_of(model) is not None)
    sample = shape_probes(spec, model.config)[0]
    plain = export_graph(features_module(model, "text"), spec, sample, outputs)
    fused, _ = fuse_transformer(
        plain, spec.fusion, model.config.num_attention_heads, model.config.hidden_size
    )
    return {"plain": plain, "fused": fused}


def dynamo_graph(entry) -> bytes:
    """The same backbone + pooling through the dynamo exporter, only to compare runtime speed."""
    from training.onnx_export.export import export_graph
    from training.onnx_export.probes import shape_probes
    from training.onnx_export.specs import spec_for
    from training.onnx_export.wrappers import features_module, pooler_of

    model = load_base_model(entry)
    spec = spec_for(entry.model_type)
    outputs = spec.output_names(has_pooler=pooler_of(model) is not None)
    sample = shape_probes(spec, model.config)[0]
    return export_graph(features_module(model, "text"), spec, sample, outputs, exporter="dynamo")


def refused_all_matmul(store, entry, threads: int) -> OrtBackbone | None:
    """The fastest int8 plan, built only to report what the gate refused (never stored or served)."""
    from serving.onnx_backbone import load_export

    record, graph = load_export(store, entry, "fp32")
    int8 = quantize_int8(graph, Int8Plan(ALL_MATMUL))
    return OrtBackbone(record, int8, OrtSettings(threads=threads))


def run_workload(setup: dict, feed: dict[str, np.ndarray], rounds: int, reps: int, threads: int) -> dict:
    store, entry = setup["store"], setup["entry"]
    torch_mod = TextFeatures(load_base_model(entry))
    torch.set_num_threads(threads)
    fp32 = OrtBackbone.from_store(store, entry, "fp32", threads=threads)
    int8 = OrtBackbone.from_store(store, entry, "int8", threads=threads)
    lora_bb: OrtLoraBackbone = OrtBackbone.from_store(store, entry, "lora-fp32", threads=threads)
    adapters = random_adapters(16, lora_bb.record.lora.num_layers, fp32.hidden_size)
    stack = stack_loras(lora_bb.record, adapters)
    batch = feed["input_ids"].shape[0]
    idx = np.arange(batch) % 16
    slots = LoraSlots(lora_bb.record)
    keys = [f"adapter-{i}" for i in range(16)]

    def run_lora_resident():
        resident, assigned = slots.assign(keys, lambda k: adapters[int(k.rsplit("-", 1)[1])])
        return lora_bb.features(ids, mask, resident, np.asarray(assigned)[idx])

    ids, mask = feed["input_ids"], feed["attention_mask"]
    tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run_torch():
        with torch.inference_mode():
            return torch_mod(tids, tmask)

    cands = {
        k: OrtBackbone(fp32.record, g, OrtSettings(threads=threads)) for k, g in setup["candidates"].items()
    }
    paths = {
        "torch_eager": run_torch,
        "ort_fp32": lambda: fp32.features(ids, mask),
        "ort_fp32_plain": lambda: cands["plain"].features(ids, mask),
        "ort_fp32_fused": lambda: cands["fused"].features(ids, mask),
        "ort_int8": lambda: int8.features(ids, mask),
        "ort_lora_mixed": run_lora_resident,
    }
    plan = setup["reports"]["int8"].quantization.plan
    if plan != ALL_MATMUL:
        refused = refused_all_matmul(store, entry, threads)
        paths["ort_int8_all_matmul_refused"] = lambda: refused.features(ids, mask)
    if setup["dynamo_graph"] is not None:
        dyn = OrtBackbone(fp32.record, setup["dynamo_graph"], OrtSettings(threads=threads))
        paths["ort_fp32_dynamo_export"] = lambda: dyn.features(ids, mask)
        paths["ort_lora_mixed_stack_per_call"] = lambda: lora_bb.features(
            ids, mask, stack_loras(lora_bb.record, adapters), idx
        )
    load = [os.getloadavg()[0]]
    times, cpu_times = interleave(paths, rounds, reps)
    load.append(os.getloadavg()[0])
    ref = run_torch()[0].numpy()
    quality = {p: min_cosine(paths[p]().mean, ref) for p in paths if p.startswith(("ort_int8", "ort_fp32"))}
    quality.update(lora_quality(lora_bb, stack, idx, ids, mask, entry))
    resident_diff = np.abs(run_lora_resident().mean - lora_bb.features(ids, mask, stack, idx).mean).max()
    quality["ort_lora_mixed_resident_vs_fresh_stack"] = float(resident_diff)
    config = torch_mod.model.config
    return {
        "flops_per_call": encoder_flops(config, batch, int(ids.shape[1])),
        **dict(zip(("roof_gflops", "roof_cpu_gflops"), gemm_roof(threads), strict=True)),
        "batch": batch,
        "seq": int(ids.shape[1]),
        "tokens": int(mask.sum()),
        "times": times,
        "cpu_times": cpu_times,
        "threads": threads,
        "quality": quality,
        "load": load,
    }


def lora_quality(lora_bb, stack, idx, ids, mask, entry) -> dict[str, float]:
    """Mixed-LoRA graph vs the same gathered LoRA in torch eager (max abs diff of mean-pooled)."""
    module = LoraTextFeatures.for_record(load_base_model(entry), lora_bb.record.lora).eval()
    with torch.inference_mode():
        ref = module.run_named(
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            stack.inputs(idx),
        )
    got = lora_bb.features(ids, mask, stack, idx)
    return {"ort_lora_mixed_max_abs_diff_vs_torch": float(np.abs(got.mean - ref[0].numpy()).max())}


def summarize(results: dict) -> list[dict]:
    rows = []
    for wl, res in results.items():
        t = res["times"]
        for path in t:
            ref = "ort_fp32" if path.startswith("ort_lora") else "torch_eager"
            r = ratio(t, ref, path)
            ms = statistics.median(t[path]) * 1000
            rows.append(
                {
                    "workload": wl,
                    "path": path,
                    "ms_per_batch": ms,
                    "rows_per_s": res["batch"] / ms * 1000,
                    "gflops": res["flops_per_call"] / ms / 1e6,
                    "roof_fraction": res["flops_per_call"] / ms / 1e6 / res["roof_gflops"],
                    "ratio_vs": ref,
                    "ratio": r,
                    "cpu_ratio": ratio(res["cpu_times"], ref, path),
                    "target": TARGETS.get(path),
                    "min_cosine_vs_torch": res["quality"].get(path),
                }
            )
    return rows


def results_load(results: dict) -> str:
    loads = [x for r in results.values() for x in r["load"]]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def markdown(rows: list[dict], setup: dict, results: dict, args) -> str:
    out = [
        "| workload | path | ms/batch | rows/s | throughput ratio (median [min-max]) | process CPU-time ratio "
        "| target | min cos vs torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rr = r["ratio"]
        rat = (
            "1.00 (reference)"
            if r["path"] == "torch_eager"
            else (f"{rr['median']:.2f} [{rr['min']:.2f}-{rr['max']:.2f}] vs {r['ratio_vs']}")
        )
        tgt = (
            ""
            if r["target"] is None
            else f">= {r['target']} ({'met' if rr['median'] >= r['target'] else 'MISSED'})"
        )
        cos = "" if r["min_cosine_vs_torch"] is None else f"{r['min_cosine_vs_torch']:.4f}"
        cr = r["cpu_ratio"]
        cpu = (
            ""
            if cr is None or r["path"] == "torch_eager"
            else f"{cr['median']:.2f} [{cr['min']:.2f}-{cr['max']:.2f}]"
        )
        out.append(
            f"| {r['workload']} | {r['path']} | {r['ms_per_batch']:.1f} | {r['rows_per_s']:.0f} | {rat} | {cpu} "
            f"| {tgt} | {cos} |"
        )
    roofs = {wl: res["roof_gflops"] for wl, res in results.items()}
    out += [
        "",
        f"CPU: {cpu_model()}. fp32 GEMM roof (torch.mm sgemm of {' and '.join(f'{n}^3' for n in ROOF_SIZES)}, "
        "best of 8 each, measured next to each workload): "
        + ", ".join(f"{wl} {g:.0f} GFLOP/s" for wl, g in roofs.items()),
        "FLOPs: analytic BERT encoder count on the padded batch (QKVO + FFN GEMMs + attention QK^T and AV; "
        "embeddings, norms, softmax, pooling not counted), the same count for every path.",
    ]
    for r in rows:
        if r["path"] in ("ort_fp32", "torch_eager", "ort_int8"):
            out.append(
                f"- {r['workload']} {r['path']}: {r['gflops']:.0f} GFLOP/s (fp32-equivalent encoder FLOPs "
                f"on the padded batch) = **{r['roof_fraction']:.2f}** of the roof"
            )
    q = setup["reports"]["int8"].quantization
    g = setup["reports"]["fp32"].graph_optimization
    out += [
        "",
        f"int8 gate (export, real-text probe set, min cosine >= {q.min_cosine_required}): "
        + ", ".join(
            f"{a.plan} {a.min_cosine:.4f} (fake-quant estimate "
            f"{'-' if a.predicted_min_cosine is None else f'{a.predicted_min_cosine:.4f}'}) "
            f"{'accepted' if a.accepted else 'refused'}"
            for a in q.attempts
        )
        + f"; stored plan: {q.plan} ({len(q.kept_fp32)} of {len(q.sensitivity)} weight MatMuls kept fp32).",
        f"- stored fp32 graph: {g.kept} ({g.reason}); fused ops: {g.fused_ops}",
    ]
    for wl, res in results.items():
        d = res["quality"].get("ort_lora_mixed_max_abs_diff_vs_torch")
        out.append(
            f"- {wl}: {res['batch']} rows, padded seq {res['seq']}, {res['tokens']} real tokens; "
            f"mixed-LoRA max abs diff vs torch gathered LoRA {d:.2e}, resident slots vs a fresh stack "
            f"{res['quality']['ort_lora_mixed_resident_vs_fresh_stack']:.1e}"
        )
    sizes = ", ".join(f"{v} {m.size / 2**20:.1f} MiB" for v, m in setup["reports"].items())
    out.append(
        f"- graph sizes: {sizes}; export times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in setup["export_s"].items())
    )
    out.append(
        f"- {args.rounds} rounds x {args.reps} calls per path; torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, threads {args.threads} (torch and ORT alike), {os.cpu_count()} CPUs ({platform.machine()}); 1-min load "
        f"average {results_load(results)} during timing (other processes share these CPUs)"
    )
    return "\n".join(out)


def headline(results: dict, ceiling: dict[str, dict[str, float]]) -> str:
    """The issue-18 figures from the short batch-32 workload at the highest thread count measured."""
    wl = max((w for w in results if w.startswith("short")), key=lambda w: results[w]["threads"])
    res, t, c = results[wl], results[wl]["times"], results[wl]["cpu_times"]
    flops = res["flops_per_call"]
    # the roof is the host's: other processes can only lower a measurement, so take the best one
    roof = max(r["roof_gflops"] for r in results.values())
    roof_cpu = max(r["roof_cpu_gflops"] for r in results.values())
    fp32_gflops = flops / statistics.median(t["ort_fp32"]) / 1e9
    share = fp32_gflops / roof
    # the same on CPU time (FLOPs per CPU-second x threads): robust to other processes
    fp32_cpu_gflops = flops / (statistics.median(c["ort_fp32"]) / res["threads"]) / 1e9
    share_cpu = fp32_cpu_gflops / roof_cpu
    int8 = ratio(t, "ort_fp32", "ort_int8")
    int8_cpu = ratio(c, "ort_fp32", "ort_int8")
    cos = res["quality"]["ort_int8"]
    rows = [
        ("fp32 GEMM roof of the host (best of every probe)", f"{roof:.0f} GFLOP/s", "printed", ""),
        (
            "ORT fp32 MiniLM achieved / roof",
            f"{fp32_gflops:.0f} GFLOP/s = {share:.2f}",
            f">= {ROOF_TARGET}",
            "met" if share >= ROOF_TARGET else "MISSED",
        ),
        (
            "same on CPU time (roof, achieved per thread-CPU-second x threads)",
            f"{fp32_cpu_gflops:.0f} / {roof_cpu:.0f} GFLOP/s = {share_cpu:.2f}",
            f">= {ROOF_TARGET}",
            "met" if share_cpu >= ROOF_TARGET else "MISSED",
        ),
        (
            "ORT int8 / ORT fp32 (min cosine)",
            f"{int8['median']:.2f} [{int8['min']:.2f}-{int8['max']:.2f}] (CPU {int8_cpu['median']:.2f}; cos {cos:.4f})",
            f">= {INT8_TARGET} at cos >= {INT8_MIN_COSINE}",
            "met" if int8["median"] >= INT8_TARGET and cos >= INT8_MIN_COSINE else "MISSED",
        ),
        (
            "ceiling of the row above: ORT int8 / fp32 of one feed-forward GEMM alone (MiniLM's shapes, "
            "quantised as the export does)",
            "; ".join(f"{shape}: {r['wall']:.2f} (CPU {r['cpu']:.2f})" for shape, r in ceiling.items()),
            "printed",
            "",
        ),
        ("ORT fp32 / torch fp32", _fmt(ratio(t, "torch_eager", "ort_fp32")), "", ""),
        (
            "ORT fused / ORT plain fp32",
            _fmt(ratio(t, "ort_fp32_plain", "ort_fp32_fused"))
            + f" (CPU {ratio(c, 'ort_fp32_plain', 'ort_fp32_fused')['median']:.2f})",
            "",
            "",
        ),
    ]
    lines = [
        f"### issue 18 figures ({wl}; throughput ratios, median of per-round ratios [min-max])",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    return "\n".join(lines)


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--extra", action="store_true", help="also time the dynamo export and per-call stacking"
    )
    parser.add_argument(
        "--threads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[THREADS],
        help="comma-separated thread counts, each a full set of rounds (1 thread is far less disturbed by "
        "other processes on a shared 2-core box)",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    # the torch reference runs with the malloc settings an engine sets for itself (without them every
    # torch pass pays page faults for its activations, which flattered ORT in earlier runs)
    keep_activation_memory()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        setup = build(Path(tmp), args.extra)
        results = {
            f"{wl}, {t} thr": run_workload(setup, feed, args.rounds, args.reps, t)
            for t in args.threads
            for wl, feed in workloads(setup["folder"]).items()
        }
    ceiling = int8_gemm_ceiling(THREADS)
    rows = summarize(results)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = f"## bench_onnx {stamp}, {cpu_model()}, load {results_load(results)}\n\n{headline(results, ceiling)}\n\n"
    md += markdown(rows, setup, results, args)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx.md").write_text(md + "\n")
    payload = {
        "rows": rows,
        "raw_seconds_per_call": {wl: r["times"] for wl, r in results.items()},
        "raw_thread_cpu_seconds_per_call": {wl: r["cpu_times"] for wl, r in results.items()},
        "quality": {wl: r["quality"] for wl, r in results.items()},
        "export_manifests": {v: m.model_dump(mode="json") for v, m in setup["reports"].items()},
        "export_seconds": setup["export_s"],
        "settings": {"rounds": args.rounds, "reps": args.reps, "threads": args.threads},
        "load_average_1min": {wl: r["load"] for wl, r in results.items()},
        "int8_gemm_ceiling": ceiling,
    }
    (RESULTS / "onnx.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
