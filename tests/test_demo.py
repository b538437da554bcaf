"""The README's main job: `loraplex demo` trains three tenants on the real MiniLM, serves them, and every
curl command it prints works as pasted."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.service_support import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e]


def _read_examples(proc: subprocess.Popen, timeout: float = 1500) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"demo exited early ({proc.poll()}); output so far:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("# (end of examples)"):
            return lines
    raise AssertionError("demo did not print its examples in time:\n" + "".join(lines))


def test_demo_serves_and_its_curl_commands_work(tmp_path):
    """Issue 11: run as a newcomer does (no --store, the tuned options), every printed classify curl is
    answered confidently, progress with an ETA is shown, and `loraplex adapters list` (same folder, no
    --store) lists the demo's adapters."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENTOML_HOME=str(tmp_path / "bentoml"))
    env.pop("LORAPLEX_STORE", None)
    cmd = [sys.executable, "-m", "training.cli", "demo", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        output = _read_examples(proc)
        trained = [line for line in output if line.strip().startswith("trained ")]
        assert len(trained) == 3, output
        assert any("epoch 1/6" in line and "left)" in line for line in output), output  # progress + ETA
        assert any(line.startswith("ready in ") for line in output), output
        assert any(line.startswith("see them with: loraplex adapters list --store ") for line in output)
        curls = [line.strip() for line in output if line.startswith("curl ")]
        assert len(curls) == 9
        answers = []
        for c in curls:
            out = subprocess.run(
                [*shlex.split(c), "-w", "\\n%{http_code}"], capture_output=True, text=True, timeout=60
            )
            body, _, status = out.stdout.rpartition("\n")
            answers.append((c, int(status), body))
        statuses = [s for _, s, _ in answers]
        # 3 tenants classify, cross-tenant 404, embed, upload 201, new adapter classify, tenants, cache
        assert statuses == [200, 200, 200, 404, 200, 201, 200, 200, 200], answers
        assert '"adapter": "brightwave/tickets"' in answers[0][2]
        assert '"adapter": "acme/sentiment"' in answers[6][2]
        for _, _, body in (answers[0], answers[1], answers[2], answers[6]):
            top = json.loads(body)[0]["scores"][0]
            assert top >= 0.6, body  # every printed classify example answers confidently
        runtime = json.loads(answers[8][2])["runtime"]  # issue 18: onnxruntime with no extra step
        assert runtime["name"] == "onnx" and runtime["onnx_passes"] >= 4, answers[8]
        listed = subprocess.run(
            [sys.executable, "-m", "training.cli", "adapters", "list", "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        names = {f"{r['tenant']}/{r['name']}" for r in json.loads(listed.stdout)}
        assert {"brightwave/tickets", "larder/intents", "northpeak/requests"} <= names, listed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
