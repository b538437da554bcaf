"""Training results for the README: every strategy on the shipped datasets with the real MiniLM, and
domain adaptation on scikit-learn digits vs. an inverted-and-noisy target domain.

    .venv/bin/python benchmarks/bench_training.py            # full run, prints markdown
    .venv/bin/python benchmarks/bench_training.py --quick    # one dataset, fewer epochs (smoke run)

Writes benchmarks/results/training.json and training.md. Every number is measured in this run on
held-out data (a stratified 25% test split never seen in training or validation). Timings are wall
clock on this machine with 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adapters_store import describe_base, open_store  # noqa: E402
from training import TrainConfig, promote_full_to_base, train_bundle  # noqa: E402
from training.data import LabelledData, encode_labels, read_table, stratified_split  # noqa: E402
from training.loop import predict_proba  # noqa: E402
from training.media import arrays_data  # noqa: E402
from training.metrics import classification_metrics  # noqa: E402

DATA = ROOT / "training" / "data"
DATASETS = ["brightwave_telecom_tickets", "larder_grocery_intents", "northpeak_clinic_requests"]
RESULTS = ROOT / "benchmarks" / "results"
TEST_FRACTION = 0.25
# Per-strategy settings, chosen once before measuring (not tuned on the test split).
STRATEGIES: dict[str, dict[str, Any]] = {
    "head": {"lr": 1e-2, "epochs": 40, "patience": 8},
    "lora": {"lr": 5e-3, "epochs": 6, "lora_r": 8, "lora_alpha": 16},
    "ia3": {"lr": 2e-2, "epochs": 6},
    "partial": {"lr": 2e-3, "backbone_lr": 2e-4, "epochs": 4, "top_k": 2},
    "full": {"lr": 2e-3, "backbone_lr": 1e-4, "layer_lr_decay": 0.9, "epochs": 4},
}
COMMON = {"batch_size": 16, "max_seq_len": 32, "seed": 0, "progress": False, "num_threads": 2}


def weights_bytes(bundle) -> int:
    """What a tenant adds to the registry: weight files and the PEFT config (not the PNG curve)."""
    return sum(len(b) for n, b in bundle.files.items() if n.endswith((".safetensors", ".json")))


def test_metrics(outcome, test: LabelledData) -> dict[str, Any]:
    learner, names = outcome.learner, outcome.bundle.manifest.labels
    pred = predict_proba(learner, learner.prepare(test.inputs), 64).argmax(-1).tolist()
    return classification_metrics(encode_labels(test, names), pred, names)


def run_text(store, work: Path, datasets: list[str], strategies: list[str], scale: float) -> list[dict]:
    rows = []
    for ds in datasets:
        pool, test = stratified_split(read_table(DATA / f"{ds}.csv"), TEST_FRACTION, seed=0)
        train_csv = work / f"{ds}-train.csv"
        with open(train_csv, "w", encoding="utf-8", newline="") as f:
            import csv

            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(zip(pool.inputs, pool.labels, strict=True))
        for strategy in strategies:
            opts = {**STRATEGIES[strategy], **COMMON}
            opts["epochs"] = max(1, round(opts["epochs"] * scale))
            cfg = TrainConfig(
                store=store,
                base="minilm",
                tenant=ds.split("_")[0],
                name=f"{strategy}",
                strategy=strategy,
                train_file=train_csv,
                **opts,
            )
            outcome = train_bundle(cfg, store)
            store.put(outcome.bundle)
            m = test_metrics(outcome, test)
            man = outcome.bundle.manifest
            rows.append(
                {
                    "dataset": ds,
                    "strategy": strategy,
                    "train_examples": len(pool),
                    "test_examples": len(test),
                    "test_accuracy": m["accuracy"],
                    "test_macro_f1": m["macro_f1"],
                    "val_accuracy": man.metrics["accuracy"],
                    "trainable_params": man.metrics["trainable_params"],
                    "weights_bytes": weights_bytes(outcome.bundle),
                    "train_time_s": man.metrics["train_time_s"],
                    "epochs_run": man.metrics["epochs_run"],
                }
            )
            print(
                f"  {ds} {strategy}: test acc {m['accuracy']:.3f} f1 {m['macro_f1']:.3f} "
                f"({man.metrics['train_time_s']:.1f}s)",
                flush=True,
            )
    return rows


# ---- domain adaptation on digits ----------------------------------------------------------------------


def digits_domains(seed: int = 0) -> dict[str, Any]:
    """Source: sklearn digits as 8x8 grey images. Target: the other half with lower contrast, a bright
    background and pixel noise (a covariate shift: same digits, different sensor)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    src, tgt = order[: len(order) // 2], order[len(order) // 2 :]
    shifted = 0.5 * images[tgt] + 100.0 + rng.normal(0, 20, images[tgt].shape)
    tgt_images = np.clip(shifted, 0, 255).astype(np.uint8)
    labels = [str(v) for v in d.target]
    half = len(tgt) // 2
    return {
        "source": arrays_data(images[src], [labels[i] for i in src]),
        "target_pool": arrays_data(tgt_images[:half]),  # unlabelled, used for adaptation
        "target_test": arrays_data(tgt_images[half:], [labels[i] for i in tgt[half:]]),
    }


def make_digits_vit(dest: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=4,
        num_channels=3,
    )
    ViTModel(cfg).save_pretrained(dest, safe_serialization=True)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(dest)
    return dest


def run_domain(store, work: Path, scale: float) -> dict[str, Any]:
    doms = digits_domains()
    store.register_base(describe_base("digits-vit-init", make_digits_vit(work / "vit-init")))
    base_opts = {**COMMON, "task": "image-classification", "batch_size": 32, "seed": 0}
    pre = TrainConfig(
        store=store,
        base="digits-vit-init",
        tenant="digits",
        name="pretrain",
        strategy="full",
        lr=2e-3,
        backbone_lr=1e-3,
        epochs=max(1, round(15 * scale)),
        **base_opts,
    )
    outcome = train_bundle(pre, store, train_data=doms["source"])
    pre_manifest = store.put(outcome.bundle)
    promote_full_to_base(store, f"digits/pretrain@{pre_manifest.version}", "digits-vit", work / "digits-vit")
    rows = []
    for method in ("none", "dann", "mmd", "self-training"):
        cfg = TrainConfig(
            store=store,
            base="digits-vit",
            tenant="digits",
            name=f"da-{method}",
            strategy="head",
            head_hidden=128,
            lr=5e-3,
            epochs=max(1, round(30 * scale)),
            domain_adaptation=method,
            da_weight=0.5,
            pseudo_label_threshold=0.9,
            self_training_rounds=2,
            **base_opts,
        )
        out = train_bundle(cfg, store, train_data=doms["source"], target_data=doms["target_pool"])
        store.put(out.bundle)
        tm = test_metrics(out, doms["target_test"])
        rows.append(
            {
                "method": "source-only" if method == "none" else method,
                "source_val_accuracy": out.bundle.manifest.metrics["accuracy"],
                "target_test_accuracy": tm["accuracy"],
                "target_test_macro_f1": tm["macro_f1"],
                "train_time_s": out.bundle.manifest.metrics["train_time_s"],
            }
        )
        print(f"  digits {method}: target acc {tm['accuracy']:.3f}", flush=True)
    return {
        "pretrain_val_accuracy": pre_manifest.metrics["accuracy"],
        "source_examples": len(doms["source"]),
        "target_pool": len(doms["target_pool"]),
        "target_test": len(doms["target_test"]),
        "rows": rows,
    }


def to_markdown(text_rows: list[dict], domain: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    out = [
        f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, 2 threads; "
        f"base all-MiniLM-L6-v2; max_seq_len 32; test = stratified 25% held out. Machine shared with other "
        f"jobs (load average {meta['load_avg_at_end'][0]:.1f} on {meta['cpu_count']} cores at the end): "
        "times are wall clock and inflated by that load.",
        "",
        "| dataset | strategy | test acc | test macro-F1 | trainable params | weights size | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in text_rows:
        out.append(
            f"| {r['dataset']} | {r['strategy']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | "
            f"{r['trainable_params']:,} | {r['weights_bytes'] / 1024:,.0f} KiB | {r['train_time_s']:.1f} s |"
        )
    if domain:
        out += [
            "",
            f"Domain adaptation, digits (source: {domain['source_examples']} sklearn digits; target: the "
            f"other half at half contrast on a bright background + noise, {domain['target_pool']} unlabelled for adaptation, "
            f"{domain['target_test']} labelled for test). Backbone: a small ViT pretrained on the source "
            f"(`full`, val acc {domain['pretrain_val_accuracy']:.3f}) and promoted to a base; head with one "
            "hidden layer.",
            "",
            "| method | source val acc | target test acc | target macro-F1 | train time |",
            "|---|---|---|---|---|",
        ]
        for r in domain["rows"]:
            out.append(
                f"| {r['method']} | {r['source_val_accuracy']:.3f} | {r['target_test_accuracy']:.3f} | "
                f"{r['target_test_macro_f1']:.3f} | {r['train_time_s']:.1f} s |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one dataset, a third of the epochs")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--no-domain", action="store_true", help="skip the digits domain-adaptation table")
    ap.add_argument("--no-text", action="store_true", help="skip the text strategies table")
    ap.add_argument("--out", default="training", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from tests.helpers.models import minilm_dir

    scale = 1 / 3 if args.quick else 1.0
    datasets = DATASETS[:1] if args.quick else DATASETS
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = open_store(work / "store")
        store.register_base(describe_base("minilm", minilm_dir()))
        text_rows = [] if args.no_text else run_text(store, work, datasets, args.strategies.split(","), scale)
        domain = None if args.no_domain else run_domain(store, work, scale)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine() + " CPU",
        "load_avg_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "total_s": round(time.perf_counter() - start, 1),
        "quick": args.quick,
    }
    md = to_markdown(text_rows, domain, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"meta": meta, "text": text_rows, "domain": domain}, indent=2)
    )
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)
    print(f"total {meta['total_s']} s")


if __name__ == "__main__":
    main()
