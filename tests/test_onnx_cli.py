"""``loraplex onnx export``: the click group on a tiny base in a local store."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from adapters_store import describe_base, open_store
from training.onnx_export import OnnxExportError, onnx_group

torch.set_num_threads(1)


def _store(tmp_path, tiny_bert_dir) -> str:
    url = str(tmp_path / "store")
    open_store(url).register_base(describe_base("tiny", tiny_bert_dir))
    return url


def test_export_then_reuse_then_json(tmp_path, tiny_bert_dir):
    url = _store(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    first = runner.invoke(onnx_group, ["export", "--base", "tiny", "--store", url, "--threads", "1"])
    assert first.exit_code == 0, first.output
    assert "tiny fp32: backbone-fp32.onnx" in first.output and "stored in" in first.output
    again = runner.invoke(onnx_group, ["export", "--base", "tiny", "--store", url, "--json"])
    manifest = json.loads(again.output)
    entry = open_store(url).get_base("tiny")
    assert manifest["fingerprint"] == entry.fingerprint and manifest["variant"] == "fp32"
    assert open_store(url).has_artifact("tiny", entry.fingerprint, "backbone-fp32.onnx")


def test_int8_and_lora_exports_from_the_cli(tmp_path, tiny_bert_dir):
    url = _store(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    q = runner.invoke(onnx_group, ["export", "--base", "tiny", "--store", url, "--quantize", "int8"])
    assert q.exit_code == 0, q.output
    assert "int8 plan" in q.output and "also stored the fp32 graph" in q.output
    lora = runner.invoke(
        onnx_group, ["export", "--base", "tiny", "--store", url, "--lora-targets", "query,value"]
    )
    assert lora.exit_code == 0, lora.output
    assert "tiny lora-fp32" in lora.output


def test_bad_target_and_conflicting_flags(tmp_path, tiny_bert_dir):
    url = _store(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    bad = runner.invoke(onnx_group, ["export", "--base", "tiny", "--store", url, "--lora-targets", "bogus"])
    assert isinstance(bad.exception, OnnxExportError) and "unknown LoRA target 'bogus'" in str(bad.exception)
    both = runner.invoke(
        onnx_group,
        ["export", "--base", "tiny", "--store", url, "--lora-targets", "query", "--quantize", "int8"],
    )
    assert both.exit_code == 2 and "one at a time" in both.output


def test_mounted_in_the_loraplex_cli():
    from training.cli import main

    result = CliRunner().invoke(main, ["onnx", "export", "--help"])
    assert result.exit_code == 0 and "--quantize [int8]" in result.output and "--store" in result.output


def test_ia3_targets_and_fusion_options_shape_the_stored_graphs(tmp_path, tiny_bert_dir):
    url = _store(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    base = ["export", "--base", "tiny", "--store", url, "--threads", "1"]
    fused = runner.invoke(onnx_group, [*base, "--fusion", "fused"])
    assert fused.exit_code == 0, fused.output
    stored = open_store(url)
    entry = stored.get_base("tiny")
    fp32 = json.loads(runner.invoke(onnx_group, [*base, "--json"]).output)
    assert fp32["graph_optimization"]["kept"] == "fused" and "graph: fused" in fused.output

    lora_only = runner.invoke(onnx_group, [*base, "--lora-targets", "query,value", "--ia3-targets", "none"])
    assert lora_only.exit_code == 0, lora_only.output
    assert "IA3 on none" in lora_only.output
    custom_args = [
        *base,
        *("--lora-targets", "query", "--ia3-targets", "value,intermediate.dense,output.dense"),
        *("--ia3-feedforward", "intermediate.dense"),
    ]
    custom = runner.invoke(onnx_group, custom_args)
    assert custom.exit_code == 0, custom.output
    record = json.loads(runner.invoke(onnx_group, [*custom_args, "--json"]).output)["lora"]
    assert record["ia3_in"] == ["intermediate.dense"]
    assert set(record["ia3_out"]) == {"attention.self.value", "attention.output.dense", "output.dense"}
    assert "stored in" in custom.output  # a different IA3 set is a new graph, not the LoRA-only one reused
    assert stored.has_artifact("tiny", entry.fingerprint, "backbone-lora-fp32.onnx")


def test_ia3_options_are_refused_where_they_mean_nothing(tmp_path, tiny_bert_dir):
    url = _store(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    base = ["export", "--base", "tiny", "--store", url]
    alone = runner.invoke(onnx_group, [*base, "--ia3-targets", "value"])
    assert alone.exit_code == 2 and "give --lora-targets too" in alone.output
    stray = runner.invoke(
        onnx_group,
        [*base, "--lora-targets", "query", "--ia3-targets", "value", "--ia3-feedforward", "output.dense"],
    )
    assert stray.exit_code == 2 and "must be among --ia3-targets" in stray.output
    bogus = runner.invoke(onnx_group, [*base, "--lora-targets", "query", "--ia3-targets", "bogus"])
    assert isinstance(bogus.exception, OnnxExportError) and "unknown IA3 target 'bogus'" in str(
        bogus.exception
    )
    entry = open_store(url).get_base("tiny")
    assert not open_store(url).has_artifact("tiny", entry.fingerprint, "backbone-lora-fp32.onnx")
