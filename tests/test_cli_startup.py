"""``loraplex --help`` and the store commands start without importing torch (issue 12: ~6 s before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from adapters_store import describe_base, open_store
from tests.helpers.bundles import head_bundle

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "onnxruntime", "onnx", "bentoml", "safetensors.torch")
SCRIPT = """
import json, sys, time
t0 = time.process_time()
from training.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args, standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps({"heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules),
                  "cpu_s": time.process_time() - t0}))
"""


def test_help_and_store_commands_never_import_torch(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    store.put(head_bundle(base))
    url = str(tmp_path / "store")
    commands = [
        ["--help"],
        ["base", "list", "--store", url],
        ["adapters", "list", "--store", url],
        ["adapters", "show", "acme/head", "--store", url],
        ["adapters", "verify", "--store", url],
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(commands), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], out.stdout
    assert "acme" in out.stdout and "head" in out.stdout  # the commands really ran
