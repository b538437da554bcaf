"""The container image really runs: deploy/smoke-container.sh builds it with podman and drives it.

Out of CI: a first run builds the image (about 15 minutes on 2 busy cores: Debian base, ~1 GB of
wheels, the ONNX exports), a rerun with cached layers about 5. Run it with one command where podman is
installed::

    LORAPLEX_CONTAINER_TESTS=1 .venv/bin/pytest -m container
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.service_support import REPO

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
    pytest.mark.skipif(
        os.environ.get("LORAPLEX_CONTAINER_TESTS") != "1",
        reason="builds a container image (5-15 min): LORAPLEX_CONTAINER_TESTS=1 pytest -m container",
    ),
]


@pytest.mark.timeout(3600)
def test_smoke_container_builds_runs_classifies_and_drains(tmp_path):
    results = tmp_path / "container.md"
    env = dict(os.environ, PYTHON=sys.executable, LORAPLEX_SMOKE_RESULTS=str(results))
    env.setdefault("LORAPLEX_SMOKE_DIR", str(tmp_path / "smoke"))
    run = subprocess.run(
        ["bash", str(REPO / "deploy" / "smoke-container.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    table = results.read_text()
    assert "| cold start: container start -> /readyz 200 |" in table
    assert "readiness 503 seen / exit status / time to exit | yes / 0 /" in table
    assert "[smoke" in run.stderr and "OK" in run.stderr.splitlines()[-1]
