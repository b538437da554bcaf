"""Engine benchmark on the real all-MiniLM-L6-v2: throughput ratios, memory, cold-load latency.

Run: ``.venv/bin/python benchmarks/bench_engine.py`` (about 3-5 minutes on 2 cores). Prints a markdown
table and writes benchmarks/results/engine.json and engine.md. One process, 2 threads, paths
interleaved round by round; every ratio is the median of per-round ratios.

Paths (batch of 32 sentences of ~20 tokens, classification):
  (a) the plain HF base model alone (tokenize, forward, pooler)
  (b) the engine, 32 rows over 16 LoRA tenants (r=8, query+value, PEFT SEQ_CLS classifier)
  (c) the engine, 64 tenants of every kind (LoRA on several modules, IA3, heads, partial) in two
      batches of 32
  (d) PEFT ``adapter_names`` mixed batch over the same 16 adapters as (b)
  (e) naive: PEFT ``set_adapter`` then a forward of one row, for each row
  (f) the engine with ``runtime="onnx"`` on the same rows as (b): the base's graphs as ``loraplex base
      register`` stores them (fp32 + the LoRA graph), LoRA adapters resident in the graph's slots; the
      16 classifiers still run in torch
  (g) the engine on the service's DEFAULT runtime (``auto``: onnxruntime when the graphs are stored),
      64 shared-backbone tenants in two batches of 32, each holding every kind: heads, LoRA of ranks
      4-32, IA3 (input and output scaling) and bare-base rows; passes the graphs cannot take fall back
      to torch, and the report lists them (``OrtRuntime.fallbacks``)
  (h) the base alone on onnxruntime (the stored fp32 graph: tokenize, forward, mean pooling), the
      same 64 rows
Ratios compare time per row.

Targets: (g)/(h) >= 0.92 (the mix on the default runtime costs little over the base on it) and
(b)/(a) >= 0.95 (the torch runtime, kept as the fallback). ``--quick`` runs 4 rounds and a smaller
memory part (a smoke run; its figures are not the targets').
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import facts_line, run_facts  # noqa: E402  (benchmarks/ is the script's folder)
from safetensors.torch import save as save_safetensors  # noqa: E402
from texts import sentences  # noqa: E402

from adapters_store import Bundle, describe_base, open_store  # noqa: E402
from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE  # noqa: E402
from adapters_store.peft_import import bundle_from_peft_files, import_peft_dir  # noqa: E402
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult  # noqa: E402
from serving.settings import ServiceSettings  # noqa: E402

DEFAULT_RUNTIME = ServiceSettings.model_fields["runtime"].default  # what `loraplex serve` uses

RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()
LABELS = ["neg", "neu", "pos"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- tenants ----------------------------------------------------------------------------------------
def peft_lora(base_dir: Path, out: Path, seed: int, r: int, targets: list[str], cls: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if cls:
        model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS))
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=r, target_modules=targets)
    else:
        model, cfg = (
            BertModel.from_pretrained(base_dir),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
        )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.normal_(0.0, 0.02)
    pm.save_pretrained(out)
    return out


def peft_ia3(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import BertModel

    torch.manual_seed(seed)
    pm = get_peft_model(BertModel.from_pretrained(base_dir), IA3Config())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.05 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def head_files(seed: int, dim: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    head = {
        "out.weight": 0.05 * torch.randn(len(LABELS), dim, generator=g),
        "out.bias": torch.zeros(len(LABELS)),
    }
    return {HEAD_WEIGHTS_FILE: save_safetensors(head)}


def build_tenants(store, base, base_dir: Path, work: Path) -> dict[str, list]:
    """16 LoRA SEQ_CLS tenants (b, d, e) and a 64-tenant mix of every shared kind (c)."""
    lora16 = [peft_lora(base_dir, work / f"l{i}", i, 8, ["query", "value"], cls=True) for i in range(16)]
    for i, d in enumerate(lora16):
        store.put(import_peft_dir(d, f"t{i:02d}", "sent", base, labels=LABELS))
    mix: list[tuple[str, str]] = [(f"t{i:02d}", "sent") for i in range(16)]
    kinds = [(4, ["query", "value"]), (16, ["query", "key", "value"]), (8, ["dense"])]
    for i in range(24):
        r, targets = kinds[i % 3]
        d = peft_lora(base_dir, work / f"m{i}", 100 + i, r, targets, cls=False)
        store.put(import_peft_dir(d, f"m{i:02d}", "emb", base))
        mix.append((f"m{i:02d}", "emb"))
    for i in range(8):
        store.put(import_peft_dir(peft_ia3(base_dir, work / f"ia{i}", 200 + i), f"ia{i}", "emb", base))
        mix.append((f"ia{i}", "emb"))
    for i in range(12):
        store.put(
            Bundle.build(
                head_files(300 + i, 384),
                tenant=f"h{i:02d}",
                name="intent",
                kind="head",
                task="text-classification",
                labels=LABELS,
                base=base.ref,
                head={"in_features": 384, "num_outputs": 3},
            )
        )
        mix.append((f"h{i:02d}", "intent"))
    ranks: list[tuple[str, str | None]] = []
    for i in range(16):  # LoRA embedders of several ranks on the modules the LoRA graph takes
        r = (4, 8, 16, 32)[i % 4]
        d = peft_lora(base_dir, work / f"s{i}", 500 + i, r, ["query", "value"], cls=False)
        store.put(import_peft_dir(d, f"s{i:02d}", "emb", base))
        ranks.append((f"s{i:02d}", "emb"))
    shared = round_robin(
        [(f"t{i:02d}", "sent") for i in range(16)],
        ranks,
        [(f"ia{i}", "emb") for i in range(8)],
        [(f"h{i:02d}", "intent") for i in range(12)],
        [(f"b{i:02d}", None) for i in range(12)],  # bare-base embeddings
    )
    top = partial_top_layer(base_dir)
    for i in range(4):
        files = {MODEL_WEIGHTS_FILE: save_safetensors({k: v + 0.01 * i for k, v in top.items()})}
        store.put(
            Bundle.build(
                files | head_files(400 + i, 384),
                tenant=f"p{i}",
                name="top",
                kind="partial",
                task="text-classification",
                labels=LABELS,
                base=base.ref,
                first_trained_layer=5,
                head={"in_features": 384, "num_outputs": 3},
            )
        )
        mix.append((f"p{i}", "top"))
    return {"lora16": lora16, "mix": mix, "shared": shared}


def round_robin(*groups: list) -> list:
    """One of each group in turn: every 32-row batch of the mix holds every kind, as a server's does."""
    out = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def partial_top_layer(base_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import BertModel

    sd = BertModel.from_pretrained(base_dir).state_dict()
    return {k: v.clone() for k, v in sd.items() if k.startswith("encoder.layer.5.")}


# -- throughput --------------------------------------------------------------------------------------
def mix_items(mix: list, start: int, texts: list[str]) -> list[InferenceItem]:
    """``len(texts)`` rows from ``mix`` starting at ``start`` (wrapping): classify where a row's adapter
    classifies, embed otherwise (LoRA/IA3 embedders are named 'emb'; bare-base rows have no adapter)."""
    picks = [mix[(start + j) % len(mix)] for j in range(len(texts))]
    return [
        InferenceItem(t, n, "embed" if n in ("emb", None) else "classify", text=x)
        for (t, n), x in zip(picks, texts, strict=True)
    ]


def make_paths(
    engine: Engine,
    base_dir: Path,
    tenants: dict,
    texts: list[str],
    onnx_engine: Engine | None = None,
    default_engine: Engine | None = None,
):
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    lora16, mix = tenants["lora16"], tenants["mix"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    plain = BertModel.from_pretrained(base_dir).eval()
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS)),
        lora16[0],
        adapter_name="a0",
    )
    for i, d in enumerate(lora16[1:], start=1):
        peft_model.load_adapter(d, adapter_name=f"a{i}")
    peft_model.eval()
    names = [f"a{j % 16}" for j in range(len(texts))]
    items_b = [InferenceItem(f"t{j % 16:02d}", "sent", "classify", text=t) for j, t in enumerate(texts)]

    def enc(batch):
        return tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")

    def a():
        plain(**enc(texts)).pooler_output.tolist()

    def b():
        out = engine.infer(items_b)
        assert all(isinstance(r, InferenceResult) for r in out), out[0]

    # Mixes: every call answers all 64 tenants in two batches of 32, so each timed call does the same
    # work (one half alone could be all LoRA, the other all heads). Times are per row (see ``ROWS``).
    def c():
        for start in (0, 32):
            out = engine.infer(mix_items(mix, start, texts))
            assert all(isinstance(r, InferenceResult) for r in out), out

    def d():
        peft_model(**enc(texts), adapter_names=names).logits.tolist()

    def e():
        for name, text in zip(names, texts, strict=True):
            peft_model.set_adapter(name)
            peft_model(**enc([text])).logits.tolist()

    paths = {"a": a, "b": b, "c": c, "d": d, "e": e}
    if onnx_engine is not None:

        def f():
            calls = onnx_engine.ort.calls
            out = onnx_engine.infer(items_b)
            assert all(isinstance(r, InferenceResult) for r in out), out[0]
            assert onnx_engine.ort.calls == calls + 1, "the batch fell back to torch"

        paths["f"] = f
    if default_engine is not None:
        shared = tenants["shared"]

        def g():
            for start in (0, 32):
                out = default_engine.infer(mix_items(shared, start, texts))
                assert all(isinstance(r, InferenceResult) for r in out), out

        paths["g"] = g
        if default_engine.ort is not None:
            ort_base = default_engine.ort.plain

            def h():
                for _ in range(2):  # the same 64 rows as (g)
                    inputs = enc(texts)
                    hidden, _ = ort_base.hidden_and_pooler(inputs)
                    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    ((hidden * mask).sum(1) / mask.sum(1)).tolist()

            paths["h"] = h
    return paths


ROWS = {"c": 64, "g": 64, "h": 64}  # rows per call; every other path answers one batch of 32


def interleaved(paths: dict, rounds: int, repeats: int = 3) -> dict[str, list[float]]:
    """Per round, each path's best of ``repeats`` calls (the machine is shared: min filters stalls),
    in seconds per row."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        for fn in paths.values():  # warm-up
            fn()
        for _ in range(rounds):
            for key, fn in paths.items():
                best = float("inf")
                for _ in range(repeats if key != "e" else 1):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                times[key].append(best / ROWS.get(key, 32))
    return times


def ratio(times: dict, num: str, den: str) -> tuple[float, float, float, float]:
    """Throughput ratio num/den = time(den)/time(num): median, min and max over rounds, and the ratio
    of each path's fastest round (a cross-check that is robust to other processes on the machine)."""
    per_round = [d / n for n, d in zip(times[num], times[den], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round), min(times[den]) / min(times[num])


# -- memory and cold load ------------------------------------------------------------------------------
def put_synthetic_loras(store, base, template_cfg: bytes, n: int) -> int:
    """n r=8 query+value LoRAs in PEFT's exact key layout (as save_pretrained writes them); returns bytes."""
    total = 0
    for i in range(n):
        g = torch.Generator().manual_seed(10_000 + i)
        w = {}
        for layer in range(6):
            for mod in ("query", "value"):
                key = f"base_model.model.encoder.layer.{layer}.attention.self.{mod}"
                w[f"{key}.lora_A.weight"] = 0.05 * torch.randn(8, 384, generator=g)
                w[f"{key}.lora_B.weight"] = 0.02 * torch.randn(384, 8, generator=g)
        data = save_safetensors(w)
        total += len(data)
        store.put(bundle_from_peft_files(template_cfg, data, f"u{i:04d}", "emb", base))
    return total


def memory_and_cold_load(store, n: int, cycles: int) -> dict:
    """Run in a fresh process (see main): RSS must not reuse memory freed by the throughput part."""
    engine = Engine(
        store, base="minilm", settings=EngineSettings(cache_bytes=4 << 30, threads=2, runtime="torch")
    )
    backbone_bytes = sum(p.numel() * p.element_size() for p in engine.backbone.model.parameters())
    with torch.inference_mode():
        engine.infer([InferenceItem("u0000", "emb", "embed", text=t) for t in sentences(32)])
    gc.collect()
    rss0 = rss_mb()
    for i in range(n):
        engine.warm(f"u{i:04d}/emb")
    gc.collect()
    rss1 = rss_mb()
    stats = engine.cache_stats()
    cold = []
    for i in range(0, n, max(1, n // 200)):
        engine.invalidate(f"u{i:04d}")
        t0 = time.perf_counter()
        engine.warm(f"u{i:04d}/emb")
        cold.append(time.perf_counter() - t0)
    del engine
    gc.collect()
    return {
        "rss_before_mb": rss0,
        "rss_after_mb": rss1,
        "rss_growth_mb": rss1 - rss0,
        "adapters_resident": stats["entries"],
        "cache_bytes_used_mb": stats["bytes_used"] / 2**20,
        "cold": cold,
        "backbone_mb": backbone_bytes / 2**20,
        "cycles": churn(store, n, cycles),
    }


def churn(store, n: int, cycles: int) -> dict:
    """Load/evict cycles through a cache that holds 50 adapters: RSS at cycle 100 and at the end."""
    probe = Engine(store, base="minilm", settings=EngineSettings(threads=2, runtime="torch"))
    probe.warm("u0000/emb")
    one = probe.cache_stats()["bytes_used"]
    del probe
    engine = Engine(
        store, base="minilm", settings=EngineSettings(cache_bytes=50 * one, threads=2, runtime="torch")
    )
    marks = {}
    for cycle in range(1, cycles + 1):
        engine.warm(f"u{cycle % n:04d}/emb")
        if cycle in (100, cycles):
            gc.collect()
            marks[cycle] = rss_mb()
    stats = engine.cache_stats()
    return {
        "rss_at_100_mb": marks[100],
        f"rss_at_{cycles}_mb": marks[cycles],
        "growth_mb": marks[cycles] - marks[100],
        "evictions": stats["evictions"],
        "loads": stats["loads"],
    }


def memory_in_child(store_path: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--memory-part",
        str(store_path),
        "--tenants",
        str(args.tenants),
        "--cycles",
        str(args.cycles),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(r: tuple[float, float, float, float], digits: int) -> str:
    return f"{r[0]:.{digits}f} (rounds {r[1]:.2f}-{r[2]:.2f}; fastest-round ratio {r[3]:.{digits}f})"


# -- report --------------------------------------------------------------------------------------------
def runtime_facts(engine: Engine | None) -> dict:
    """Which runtime the default engine chose, why, and which passes it sent to torch."""
    if engine is None:
        return {}
    stats = engine.cache_stats()["runtime"]
    return {"runtime": stats["name"], "note": stats["note"], "onnx_passes": stats["onnx_passes"]} | {
        "torch_fallbacks": stats["torch_fallbacks"]
    }


def report(times: dict, mem: dict, lora_bytes: int, n: int, rounds: int, runtime: dict) -> tuple[str, dict]:
    r_ba, r_bd, r_be = ratio(times, "b", "a"), ratio(times, "b", "d"), ratio(times, "b", "e")
    r_ca, r_da = ratio(times, "c", "a"), ratio(times, "d", "a")
    sps = {k: 1 / statistics.median(v) for k, v in times.items()}
    growth_ratio = mem["rss_growth_mb"] / (lora_bytes / 2**20)
    cold_p50 = statistics.median(mem["cold"]) * 1000
    cold_p90 = sorted(mem["cold"])[int(0.9 * len(mem["cold"]))] * 1000
    naive_gb = n * mem["backbone_mb"] / 1024
    cyc = mem["cycles"]
    rows = [
        (
            "(b)/(a) engine 16 LoRA vs base",
            _fmt(r_ba, 3),
            ">= 0.95",
            r_ba[0] >= 0.95,
        ),
        (
            "(b)/(d) engine vs PEFT adapter_names",
            _fmt(r_bd, 2),
            ">= 1.15",
            r_bd[0] >= 1.15,
        ),
        (
            "(b)/(e) engine vs naive set_adapter per row",
            _fmt(r_be, 2),
            ">= 3.5",
            r_be[0] >= 3.5,
        ),
        ("(c)/(a) engine 64-tenant mix vs base", _fmt(r_ca, 3), "-", None),
        *(
            [
                (
                    "(f)/(a) engine, runtime onnx, 16 LoRA vs base (torch)",
                    _fmt(ratio(times, "f", "a"), 3),
                    "-",
                    None,
                ),
                (
                    "(f)/(d) engine, runtime onnx, vs PEFT adapter_names",
                    _fmt(ratio(times, "f", "d"), 2),
                    "-",
                    None,
                ),
                (
                    "(f)/(e) engine, runtime onnx, vs naive set_adapter per row",
                    _fmt(ratio(times, "f", "e"), 2),
                    "-",
                    None,
                ),
            ]
            if "f" in times
            else []
        ),
        *(
            [
                (
                    f"(g)/(h) engine, default runtime ({DEFAULT_RUNTIME}), 64-tenant shared mix vs the "
                    "base alone on onnxruntime",
                    _fmt(ratio(times, "g", "h"), 3),
                    ">= 0.92",
                    ratio(times, "g", "h")[0] >= 0.92,
                ),
                ("(h)/(a) base alone: onnxruntime vs torch", _fmt(ratio(times, "h", "a"), 3), "-", None),
            ]
            if "h" in times
            else []
        ),
        ("(d)/(a) PEFT mixed vs base", _fmt(r_da, 3), "-", None),
        (
            f"RSS growth, {n} LoRA r=8 resident / adapters' bytes",
            f"{growth_ratio:.2f}x ({mem['rss_growth_mb']:.0f} MB for {lora_bytes / 2**20:.0f} MB)",
            "<= 1.3x",
            growth_ratio <= 1.3,
        ),
        (
            f"naive: {n} full model copies (computed)",
            f"{naive_gb:.1f} GB ({mem['backbone_mb']:.1f} MB each)",
            "-",
            None,
        ),
        (
            "cold load r=8 adapter (resolve+read+sha256+validate+pack)",
            f"p50 {cold_p50:.2f} ms, p90 {cold_p90:.2f} ms",
            "p50 <= 5 ms",
            cold_p50 <= 5,
        ),
        (
            "RSS growth load/evict cycle 100 -> last",
            f"{cyc['growth_mb']:.1f} MB ({cyc['evictions']} evictions)",
            "< 50 MB",
            cyc["growth_mb"] < 50,
        ),
    ]
    lines = ["| metric | measured | target | met |", "|---|---|---|---|"]
    lines += [
        f"| {m} | {v} | {t} | {'' if ok is None else ('yes' if ok else 'NO')} |" for m, v, t, ok in rows
    ]
    lines += ["", "| path | sentences/s (median round) |", "|---|---|"]
    names = {
        "a": "(a) base alone",
        "b": "(b) engine, 16 LoRA tenants",
        "c": "(c) engine, 64-tenant mix",
        "d": "(d) PEFT adapter_names",
        "e": "(e) naive set_adapter + 1 row",
        "f": "(f) engine, runtime onnx, 16 LoRA tenants",
        "g": f"(g) engine, default runtime ({DEFAULT_RUNTIME}), 64-tenant shared mix",
        "h": "(h) base alone, onnxruntime",
    }
    lines += [f"| {names[k]} | {sps[k]:.0f} |" for k in names if k in sps]
    if runtime:
        passes = runtime["onnx_passes"] + sum(runtime["torch_fallbacks"].values())
        fallbacks = ", ".join(f"{k}: {v}" for k, v in runtime["torch_fallbacks"].items()) or "none"
        lines += [
            "",
            f"(g) default runtime `{DEFAULT_RUNTIME}` -> {runtime['runtime']} ({runtime['note']}). Backbone "
            f"passes of (g) on onnxruntime: {runtime['onnx_passes']} of {passes}; sent to torch, by reason: "
            f"{fallbacks}.",
        ]
    facts = run_facts(LOAD_AT_START[0])
    lines += [
        "",
        f"{rounds} interleaved rounds, batch 32 x ~20 tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ratios are medians of per-round throughput ratios (range over rounds), each round "
        "timing a path as its best of 3 batches ((e): 1). " + facts_line(facts),
    ]
    data = {
        "facts": facts,
        "default_runtime": runtime,
        "ratios": {"b/a": r_ba, "b/d": r_bd, "b/e": r_be, "c/a": r_ca, "d/a": r_da}
        | (
            {"f/a": ratio(times, "f", "a"), "f/d": ratio(times, "f", "d"), "f/e": ratio(times, "f", "e")}
            if "f" in times
            else {}
        )
        | ({"g/h": ratio(times, "g", "h"), "h/a": ratio(times, "h", "a")} if "h" in times else {}),
        "sentences_per_s": sps,
        "round_seconds_per_row": times,
        "memory": {**mem, "cold": None},
        "cold_load_ms": {"p50": cold_p50, "p90": cold_p90, "samples": len(mem["cold"])},
        "rss_growth_ratio": growth_ratio,
        "lora_bytes": lora_bytes,
        "naive_full_copies_gb": naive_gb,
    }
    return "\n".join(lines), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tenants", type=int, default=1000, help="resident LoRA tenants for the memory figure")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument(
        "--no-onnx", action="store_true", help="skip paths (f)-(h): no ONNX export, torch runtime only"
    )
    ap.add_argument("--quick", action="store_true", help="4 rounds, 200 tenants, 200 cycles (smoke run)")
    ap.add_argument("--memory-part", metavar="STORE", help=argparse.SUPPRESS)  # internal: child process
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.tenants, args.cycles = 4, 200, 200
    torch.set_num_threads(2)
    if args.memory_part:
        print(json.dumps(memory_and_cold_load(open_store(args.memory_part), args.tenants, args.cycles)))
        return
    from tests.helpers.models import minilm_dir

    base_dir = minilm_dir()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(tmp)
        store = open_store(work / "store")
        base = store.register_base(describe_base("minilm", base_dir))
        t0 = time.perf_counter()
        tenants = build_tenants(store, base, base_dir, work)
        template = (
            peft_lora(base_dir, work / "tpl", 9, 8, ["query", "value"], cls=False) / "adapter_config.json"
        )
        lora_bytes = put_synthetic_loras(store, base, template.read_bytes(), args.tenants)
        print(f"setup {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        engine = Engine(store, base="minilm", settings=EngineSettings(threads=2, runtime="torch"))
        onnx_engine = default_engine = None
        if not args.no_onnx:
            from training.onnx_export.serving_exports import export_for_serving

            # The graphs `loraplex base register` builds and stores for a text base.
            print(export_for_serving(store, "minilm").summary(), file=sys.stderr)
            onnx_engine = Engine(store, base="minilm", settings=EngineSettings(threads=2, runtime="onnx"))
            default_engine = Engine(
                store, base="minilm", settings=EngineSettings(threads=2, runtime=DEFAULT_RUNTIME)
            )
        texts = sentences(32)
        paths = make_paths(engine, base_dir, tenants, texts, onnx_engine, default_engine)
        times = interleaved(paths, args.rounds)
        runtime = runtime_facts(default_engine)
        del engine, onnx_engine, default_engine, paths
        mem = memory_in_child(work / "store", args)
    table, data = report(times, mem, lora_bytes, args.tenants, args.rounds, runtime)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(data, indent=2))
    (RESULTS / "engine.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
