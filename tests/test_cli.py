"""The `loraplex` command line against a local store."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.helpers.bundles import head_bundle, save_peft_lora
from training.cli import main


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "store")

    def _run(*args: str, ok: bool = True):
        result = runner.invoke(main, [*args, "--store", store] if args[-1] != "--help" else list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    _run.store = store
    return _run


def _all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _all_commands(cmd, (*prefix, name))


def test_help_on_every_level():
    runner = CliRunner()
    paths = [(), *list(_all_commands(main))]
    assert ("adapters", "push") in paths and ("base", "register") in paths and ("train",) in paths
    for path in paths:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, path


def test_register_push_list_show_promote_rm(run, tiny_bert_dir, tmp_path):
    out = run("base", "register", "tiny", "--path", str(tiny_bert_dir), "--json", "--no-onnx")
    fingerprint = json.loads(out.output)[0]["fingerprint"]
    assert len(fingerprint) == 64
    peft = save_peft_lora(tiny_bert_dir, tmp_path / "peft", r=4)
    push = (
        "adapters",
        "push",
        str(peft),
        "--tenant",
        "acme",
        "--name",
        "intent",
        "--base",
        "tiny",
        "--labels",
        "a,b,c",
    )
    pushed = json.loads(run(*push, "--alias", "production", "--json").output)
    assert pushed[0]["version"] == 1 and pushed[0]["kind"] == "lora"
    run(*push)
    listed = json.loads(run("adapters", "list", "--json").output)
    assert listed[0]["versions"] == 2 and "production=v1" in listed[0]["aliases"]
    shown = json.loads(run("adapters", "show", "acme/intent@production", "--json").output)
    assert shown["version"] == 1 and shown["labels"] == ["a", "b", "c"]
    assert "promote" not in run("adapters", "promote", "acme/intent@2").output
    assert json.loads(run("adapters", "show", "acme/intent@production", "--json").output)["version"] == 2
    run("adapters", "rm", "acme/intent@1")
    versions = json.loads(run("adapters", "show", "acme/intent", "--json").output)
    assert [v["version"] for v in versions] == [2]
    assert "ok" in run("adapters", "verify").output


def test_push_bundle_folder_and_verify_failure(run, tiny_bert_dir, tmp_path):
    from adapters_store import describe_base, open_store

    run("base", "register", "tiny", "--path", str(tiny_bert_dir), "--no-onnx")
    folder = head_bundle(describe_base("tiny", tiny_bert_dir)).write_dir(tmp_path / "bundle")
    run("adapters", "push", str(folder))
    store = open_store(run.store)
    blob = store.root / "tenants/acme/blobs" / store.resolve("acme/head").files["head.safetensors"].sha256
    blob.write_bytes(b"tampered")
    result = run("adapters", "verify", ok=False)
    assert result.exit_code == 1 and "FAILED" in result.output


def test_errors_are_one_line_with_exit_2(run):
    result = run("adapters", "show", "acme/nothing@3", ok=False)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    result = run("adapters", "show", "../etc/passwd", ok=False)
    assert result.exit_code == 2 and "invalid" in result.output
    result = run("adapters", "push", "/", "--tenant", "a", ok=False)
    assert result.exit_code != 0
