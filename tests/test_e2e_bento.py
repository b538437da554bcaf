"""``bentoml build`` with the repository's bentofile.yaml, then ``bentoml serve <tag>`` of the built bento."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import yaml

from tests.service_support import REPO, seeded_store, serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_build_then_serve_the_bento(tmp_path, tiny_bert_dir):
    store = seeded_store(tmp_path / "store", tiny_bert_dir, tmp_path)
    env = service_env(str(tmp_path / "store"), tmp_path)
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-o", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("loraplex:"), built.stdout
    bento_dir = tmp_path / "bentoml-home" / "bentos" / "loraplex" / tag.split(":")[1]
    src = bento_dir / "src"
    assert (src / "serving" / "service.py").is_file() and (src / "adapters_store" / "store.py").is_file()
    assert not (src / "tests").exists()
    # Training jobs run training/ in a subprocess (serving itself never imports it: test_jobs_runner).
    assert (src / "training" / "job_runner.py").is_file()
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "serving.service:LoraplexService"
    assert (bento_dir / "env" / "docker" / "Dockerfile").is_file()

    server = serve_ready(tag, env, tmp_path / "serve")
    try:
        r = httpx.post(
            f"{server.url}/v1/classify",
            json={"items": [{"adapter": "intent", "text": "hi"}], "include": ["digest"]},
            headers=tenant_auth("acme"),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()[0]["digest"] == store.resolve("acme/intent@production").digest
        console = httpx.get(f"{server.url}/console/", timeout=30)  # its static files are in the bento
        assert console.status_code == 200 and "loraplex console" in console.text
    finally:
        assert server.stop() is not None
