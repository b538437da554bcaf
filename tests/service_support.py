"""Harness for end-to-end service tests: a real ``bentoml serve`` process on 127.0.0.1.

The server runs in its own process group and is stopped by its own PID (SIGTERM, then SIGKILL);
readiness is polled on ``/readyz``. Stores are filled with tiny random models' adapters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters_store import AdapterStore, describe_base, open_store
from tests.helpers.bundles import head_bundle, lora_bundle

REPO = Path(__file__).resolve().parents[1]
BASE = "tiny"
ADMIN_TOKEN = "admin-token-0123456789"
TENANT_TOKENS = {
    "acme": "acme-token-0123456789",
    "globex": "globex-token-0123456789",
    "initech": "initech-token-0123456789",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tenant_auth(tenant: str) -> dict[str, str]:
    return auth(TENANT_TOKENS[tenant])


ADMIN = auth(ADMIN_TOKEN)


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server, SIGKILL after ``timeout``; then make sure its workers are gone too.
        BentoML starts workers in sessions of their own, so a worker still draining when the arbiter
        died was once left running (and holding CPU) after its test."""
        workers = [
            p for p in process_tree(self.proc.pid) if p != self.proc.pid
        ]  # before they are re-parented
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while (alive := [w for w in workers if _alive(w)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for w in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        return self.proc.returncode


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def service_env(store_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LORAPLEX_STORE": store_url,
            "LORAPLEX_BASE": BASE,
            "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
            "LORAPLEX_TENANT_TOKENS": ",".join(f"{t}:{tok}" for t, tok in TENANT_TOKENS.items()),
            "LORAPLEX_THREADS": "1",
            "BENTOML_HOME": str(workdir / "bentoml-home"),
            "BENTOML_DO_NOT_TRACK": "True",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def start_serve(target: str, env: dict[str, str], workdir: Path, cwd: Path = REPO) -> ServeProcess:
    """``bentoml serve <target>`` on a free port, in its own process group."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return ServeProcess(proc, port, log_path, env)


def wait_ready(server: ServeProcess, timeout: float = 120.0) -> float:
    """Poll ``/readyz`` until 200; returns seconds waited. Fails with the log tail if the process dies."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"not ready after {timeout}s:\n{server.log_tail()}")


def serve_ready(target: str, env: dict[str, str], workdir: Path, timeout: float = 120.0) -> ServeProcess:
    server = start_serve(target, env, workdir)
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def seeded_store(url: str | Path, base_dir: Path, tmp: Path, ensure_bucket: bool = False) -> AdapterStore:
    """A store with base ``tiny`` and: acme/intent (LoRA, v1 + v2, production -> v1), globex/sentiment
    (head), initech/topics (LoRA). Different seeds, so tenants really answer differently."""
    store = open_store(url)
    if ensure_bucket:
        store.ensure_bucket()
    base = store.register_base(describe_base(BASE, base_dir))
    store.put(lora_bundle(base_dir, base, tmp, tenant="acme", name="intent", seed=1))
    store.put(lora_bundle(base_dir, base, tmp, tenant="acme", name="intent", seed=2))
    store.set_alias("acme", "intent", "production", 1)
    store.put(head_bundle(base, tenant="globex", name="sentiment", seed=3))
    store.put(lora_bundle(base_dir, base, tmp, tenant="initech", name="topics", seed=4))
    return store
