"""``loraplex train`` (the click command the lead mounts) and the head's export folding."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load as load_tensors

from tests.training_support import store_with_base, toy_rows, write_csv
from training.cli import main
from training.cli_train import train_command
from training.heads import Head

torch.set_num_threads(2)


def test_help_lists_options_from_the_config():
    result = CliRunner().invoke(train_command, ["--help"])
    assert result.exit_code == 0
    for option in (
        "--strategy [head|lora|ia3|partial|full]",
        "--lora-r",
        "--layer-lr-decay",
        "--unfreeze-every",
        "--domain-adaptation [none|dann|mmd|self-training]",
        "--grad-accum-steps",
        "--seed",
    ):
        assert option in result.output, option
    assert train_command.name == "train"


def test_cli_trains_and_registers(tmp_path, tiny_bert_dir):
    store = store_with_base(tmp_path, tiny_bert_dir)
    data = write_csv(tmp_path / "d.jsonl.csv", toy_rows(10))
    args = [
        "--store",
        str(tmp_path / "store"),
        "--base",
        "tiny",
        "--tenant",
        "acme",
        "--name",
        "cli",
        "--train-file",
        str(data),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--no-progress",
    ]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert "registered acme/cli@1 (kind head)" in result.output
    assert store.resolve("acme/cli").version == 1


def test_cli_errors_are_clean(tmp_path, tiny_bert_dir):
    store_with_base(tmp_path, tiny_bert_dir)
    (tmp_path / "bad.csv").write_text("text,intent\nhello,greet\n", encoding="utf-8")
    base = ["--store", str(tmp_path / "store"), "--base", "tiny", "--tenant", "acme", "--name", "x"]
    result = CliRunner().invoke(train_command, [*base, "--train-file", str(tmp_path / "bad.csv")])
    assert (
        result.exit_code == 2 and "dataset_error" in result.output and "unknown label column" in result.output
    )
    result = CliRunner().invoke(train_command, [*base, "--train-file", "x.csv", "--epochs", "0"])
    assert result.exit_code == 2 and "epochs" in result.output
    assert "Traceback" not in result.output


# -- issue 16: a training CLI that explains itself --------------------------------------------------
def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def cli(tmp_path, tiny_bert_dir):
    """``loraplex <args> --store S`` through the root group, as a user runs it."""
    store = store_with_base(tmp_path, tiny_bert_dir)
    url = str(tmp_path / "store")

    def run(*args: str):
        return CliRunner().invoke(main, [*args, "--store", url])

    run.store = store
    return run


def _train_args(data, *extra: str, name: str = "x") -> list[str]:
    return ["train", "--base", "tiny", "--tenant", "acme", "--name", name, "--train-file", str(data), *extra]


def test_every_command_refuses_in_one_format_and_status(cli, tmp_path):
    """train used to print 'Error: code: msg' and exit 1; the store commands 'error: msg [code]' and 2."""
    one_class = write_csv(tmp_path / "one.csv", [{"text": "a b", "label": "only"}] * 4)
    cases = [
        (_train_args(one_class), "[dataset_error]"),
        (_train_args(one_class, "--epochs", "0"), "[invalid_train_config]"),
        (["train", "--base", "tiny", "--tenant", "acme", "--name", "x"], "[usage_error]"),
        (["adapters", "show", "acme/nothing@3"], "[not_found]"),
        (["base", "register", "other"], "[invalid_request]"),
    ]
    for args, code in cases:
        result = cli(*args)
        line = _error_line(result)
        assert result.exit_code == 2 and line.endswith(code), (args, result.output)
    single = cli(*_train_args(one_class))
    assert str(one_class) in _error_line(single) and "single class" in single.output  # names the file
    epochs = cli(*_train_args(one_class, "--epochs", "0"))
    assert "--epochs: Input should be greater than or equal to 1" in epochs.output
    missing = cli("train", "--base", "tiny", "--tenant", "acme", "--name", "x")
    assert "--train-file" in missing.output and "train_data" not in missing.output


def test_base_register_without_path_only_takes_the_bundled_name(cli):
    result = cli("base", "register", "anyname")
    assert result.exit_code == 2 and "give --path" in _error_line(result)
    assert [b.name for b in cli.store.list_bases()] == ["tiny"]  # nothing registered
    ok = cli("base", "register", "minilm", "--json")
    assert ok.exit_code == 0, ok.output
    assert {b.name for b in cli.store.list_bases()} == {"tiny", "minilm"}


def test_train_help_says_what_is_required_and_what_the_defaults_are():
    text = " ".join(CliRunner().invoke(train_command, ["--help"], terminal_width=400).output.split())
    assert "--train-file PATH labelled training data" in text and "[required]" in text
    assert "bert query,value" in text and "vit q_proj,v_proj" in text  # --target-modules defaults
    assert "needs only the text column" in text  # --target-file
    assert "serving truncates each text of this adapter the same way" in text  # --max-seq-len
    assert "default auto" in text  # --num-threads


def test_unused_target_file_warns(cli, tmp_path):
    data = write_csv(tmp_path / "d.csv", toy_rows(6))
    target = tmp_path / "target.csv"
    target.write_text("text\nsome unlabelled text\n", encoding="utf-8")
    result = cli(*_train_args(data, "--epochs", "1", "--target-file", str(target)))
    assert result.exit_code == 0, result.output
    assert f"warning: target data ({target}) is unused" in result.output


def test_collapsed_run_warns_and_min_val_accuracy_refuses(cli, tmp_path):
    data = write_csv(tmp_path / "d.csv", toy_rows(10))
    rotate = {"billing": "login", "login": "shipping", "shipping": "billing"}
    wrong = [{"text": r["text"], "label": rotate[r["label"]]} for r in toy_rows(4, seed=5)]
    val = str(write_csv(tmp_path / "val.csv", wrong))  # what the model learns scores ~0 here
    result = cli(*_train_args(data, "--epochs", "2", "--val-file", val, name="noise"))
    assert result.exit_code == 0, result.output
    assert "warning: validation accuracy" in result.output and "may have collapsed" in result.output
    refused = cli(*_train_args(data, "--epochs", "2", "--min-val-accuracy", "0.9", name="strict"))
    assert "below --min-val-accuracy 0.9" in refused.output
    assert refused.exit_code == 2 and _error_line(refused).endswith("[below_min_val_accuracy]")
    assert "strict" not in cli.store.list_adapters("acme")  # nothing registered


def test_collapse_threshold():
    from training.pipeline import near_chance

    assert near_chance(0.27, 1 / 6) and not near_chance(0.6, 1 / 6)  # 6 balanced classes: under ~0.38
    assert near_chance(0.55, 0.5) and not near_chance(0.9, 0.5)


def test_auto_threads_leaves_busy_cores_alone(cli, tmp_path):
    from training.threads import auto_threads

    assert auto_threads(cores=2, load=0.2)[0] == 2
    assert auto_threads(cores=2, load=1.2)[0] == 1
    assert auto_threads(cores=2, load=14.0)[0] == 1
    assert auto_threads(cores=16, load=4.0)[0] == 12
    result = cli(*_train_args(write_csv(tmp_path / "d.csv", toy_rows(6)), "--epochs", "1"))
    assert result.exit_code == 0 and "torch threads: " in result.output, result.output


def test_unfreeze_every_never_restores_a_head_only_epoch(tmp_path, tiny_bert_dir):
    """A 'partial' bundle restored from a head-only epoch would hold blocks equal to the base."""
    from safetensors.torch import load as load_st

    from training import TrainConfig, train_bundle

    store = store_with_base(tmp_path, tiny_bert_dir)
    cfg = TrainConfig(
        store=store,
        base="tiny",
        tenant="acme",
        name="gradual",
        strategy="partial",
        top_k=1,
        unfreeze_every=1,
        epochs=2,
        lr=1e-2,
        backbone_lr=1.0,  # the block's first epoch wrecks it: the head-only epoch 1 scores better
        train_file=write_csv(tmp_path / "d.csv", toy_rows(10)),
        progress=False,
    )
    outcome = train_bundle(cfg, store)
    history = outcome.result.history
    assert history[0].get("head_only") and not history[1].get("head_only")
    assert outcome.result.best_epoch == 2
    stored = load_st(outcome.bundle.files["model.safetensors"])
    base = load_st((tiny_bert_dir / "model.safetensors").read_bytes())
    changed = [k for k, t in stored.items() if not torch.equal(t, base[k])]
    assert changed, "the stored block equals the base"
    with pytest.raises(Exception, match="never trains a block"):
        TrainConfig(
            store=store, base="tiny", tenant="a", name="b", strategy="partial", epochs=2, unfreeze_every=2
        )


def test_head_standardisation_is_folded_into_the_saved_weights():
    torch.manual_seed(0)
    feats = torch.randn(50, 6) * torch.tensor([0.01, 5.0, 1.0, 100.0, 0.5, 2.0]) + 3.0
    for hidden in (None, 4):
        head = Head(6, 3, hidden, "tanh")
        head.standardize_from(feats)
        saved = load_tensors(head.to_safetensors())
        plain = Head(6, 3, hidden, "tanh")
        plain.load_state_dict(saved)  # no standardisation: raw features in, as the engine serves it
        torch.testing.assert_close(plain(feats), head(feats), atol=1e-4, rtol=1e-4)


def test_cli_output_has_no_library_futurewarnings_and_no_bars_off_a_terminal(tmp_path, tiny_bert_dir):
    """A real process (warning filters and tty checks are per process). PEFT's model build raises a
    transformers FutureWarning the user cannot act on; a progress bar in a pipe is noise."""
    import os
    import subprocess
    import sys

    store_with_base(tmp_path, tiny_bert_dir)
    data = write_csv(tmp_path / "d.csv", toy_rows(6))
    args = ["--store", str(tmp_path / "store"), *_train_args(data, "--epochs", "1", "--strategy", "lora")[1:]]
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS=""),
    )
    assert out.returncode == 0, out.stderr
    assert "registered acme/x@1 (kind lora)" in out.stdout
    assert "FutureWarning" not in out.stderr and "epoch 1/1" not in out.stderr, out.stderr
    assert "torch threads: " in out.stderr
