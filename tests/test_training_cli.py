"""``loraplex train`` (the click command the lead mounts) and the head's export folding."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import load as load_tensors

from tests.training_support import store_with_base, toy_rows, write_csv
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
        result.exit_code == 1 and "dataset_error" in result.output and "unknown label column" in result.output
    )
    result = CliRunner().invoke(train_command, [*base, "--epochs", "0"])
    assert result.exit_code == 1 and "epochs" in result.output
    assert "Traceback" not in result.output


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
