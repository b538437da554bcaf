"""The fast path is the default: registering a base builds the validated ONNX exports, the service's
default runtime 'auto' serves on them, says why when it cannot, and the bento carries what ORT needs."""

from __future__ import annotations

import ast
import json
import logging
from importlib.metadata import packages_distributions
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.settings import ServiceSettings
from tests.helpers.bundles import lora_bundle
from tests.helpers.models import make_tiny_wav2vec2
from training.cli import main
from training.onnx_export.serving_exports import export_for_serving

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def _register(store_url: str, base_dir: Path, *flags: str) -> dict:
    result = CliRunner().invoke(
        main, ["base", "register", "tiny", "--path", str(base_dir), "--store", store_url, "--json", *flags]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]


def test_base_register_builds_the_exports_and_auto_serves_lora_rows_on_ort(tmp_path, tiny_bert_dir):
    url = str(tmp_path / "store")
    row = _register(url, tiny_bert_dir)
    assert "fp32 + lora-fp32 validated against PyTorch and stored" in row["onnx"], row
    store = open_store(url)
    base = store.get_base("tiny")
    for name in ("backbone-fp32.json", "backbone-lora-fp32.json"):
        assert store.has_artifact("tiny", base.fingerprint, name)
    store.put(lora_bundle(tiny_bert_dir, base, tmp_path, tenant="acme", name="intent", seed=1))
    # EngineSettings' default runtime is 'auto' too: a library user gets onnxruntime without asking
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    assert engine.runtime == "onnx" and "LoRA on attention.self.query" in engine.runtime_note
    items = [
        InferenceItem("acme", "intent", "classify", text="hello"),
        InferenceItem("acme", None, "embed", text="x"),
    ]
    assert all(not isinstance(r, Exception) for r in engine.infer(items))
    runtime = engine.cache_stats()["runtime"]
    assert runtime["name"] == "onnx" and runtime["onnx_passes"] == 1 and runtime["torch_fallbacks"] == {}
    # registering again reuses the stored graphs instead of exporting twice
    assert "already stored" in _register(url, tiny_bert_dir)["onnx"]


def test_no_onnx_then_auto_serves_torch_and_says_why(tmp_path, tiny_bert_dir, caplog):
    url = str(tmp_path / "store")
    assert _register(url, tiny_bert_dir, "--no-onnx")["onnx"] == "skipped (--no-onnx)"
    store = open_store(url)
    with caplog.at_level(logging.WARNING, logger="serving.engine.engine"):
        engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    assert engine.runtime == "torch" and engine.ort is None
    assert (
        "has no stored ONNX export" in engine.runtime_note and "loraplex onnx export" in engine.runtime_note
    )
    assert engine.runtime_note in caplog.text
    assert engine.cache_stats()["runtime"]["note"] == engine.runtime_note


def test_a_base_the_exporter_cannot_take_is_registered_and_the_report_says_torch(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.register_base(describe_base("speech", make_tiny_wav2vec2(tmp_path / "w2v")))
    report = export_for_serving(store, "speech")
    assert report.variants == [] and "wav2vec2" in report.skipped
    assert "will run base speech on torch" in report.summary()


def test_the_service_defaults_to_runtime_auto():
    assert ServiceSettings(store="x").runtime == "auto"
    assert ServiceSettings.from_env({"LORAPLEX_STORE": "x"}).runtime == "auto"
    assert EngineSettings().runtime == "auto"  # the engine library's default is the service's


def _third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_the_bento_carries_every_package_serving_imports():
    """`LORAPLEX_RUNTIME=onnx` never became ready in a built bento: serving imports onnx, the bento lacked it."""
    dists = packages_distributions()
    wanted = {
        d.lower().replace("_", "-")
        for m in _third_party_imports(REPO / "serving") | _third_party_imports(REPO / "adapters_store")
        for d in dists.get(m, [])
    }
    packages = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    carried = {
        p.split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-") for p in packages
    }
    assert "onnx" in wanted and "onnxruntime" in wanted
    # the project itself; bentoml brings starlette, uvicorn, anyio, prometheus-client, pyyaml; boto3 brings botocore
    implied = {
        "loraplex",
        "starlette",
        "uvicorn",
        "anyio",
        "prometheus-client",
        "pyyaml",
        "httpx",
        "botocore",
    }
    assert wanted - carried - implied == set()
