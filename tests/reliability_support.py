"""Helpers for the reliability tests: a raw HTTP/1.1 client (exact bytes on the wire, so traversal
paths are not normalised away), a chunked uploader that stops when the server answers, process
probes (/proc) and a snapshot of files outside the store.

The servers themselves come from tests/service_support.py.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.reliability_corpus import Case
from tests.service_support import ADMIN_TOKEN, TENANT_TOKENS, process_tree


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def token_header(token: str) -> dict[str, str]:
    """``admin`` / a tenant name / ``bad`` -> its Authorization header; ``none`` -> no header."""
    if token == "none":
        return {}
    if token == "bad":
        return {"Authorization": "Bearer not-a-real-token-xyz"}
    value = ADMIN_TOKEN if token == "admin" else TENANT_TOKENS[token]
    return {"Authorization": f"Bearer {value}"}


def encode_case(case: Case) -> tuple[dict[str, str], bytes]:
    """Headers and body bytes of a corpus case (multipart encoded by httpx, sent raw by us)."""
    headers = token_header(case.token)
    body = b""
    if case.files or case.data:
        files = [("files", (n, b, "application/octet-stream")) for n, b in case.files]
        req = httpx.Request("POST", "http://x/", files=files or None, data=case.data or None)
        body = req.read()
        headers["Content-Type"] = req.headers["content-type"]
    elif case.json_body is not None:
        body = json.dumps(case.json_body).encode()
        headers["Content-Type"] = "application/json"
    elif case.content is not None:
        body = case.content
    headers.update(case.headers)
    return headers, body


def raw_request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"", timeout: float = 60.0
) -> RawResponse:
    """One request on a fresh connection, path bytes exactly as given."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if not any(k.lower() in ("content-length", "transfer-encoding") for k in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        data = _read_all(s)
    return parse_response(data)


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise ConnectionError(f"no HTTP response (got {data[:200]!r})")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return b"".join(out)


def send_case(port: int, case: Case) -> RawResponse:
    headers, body = encode_case(case)
    return raw_request(port, case.method, case.path, headers, body)


@dataclass
class StreamedUpload:
    status: int | None
    bytes_sent: int
    seconds: float
    body: bytes = b""


def stream_until_answer(
    port: int,
    path: str,
    headers: dict[str, str],
    chunk: bytes,
    total: int,
    chunked: bool = True,
    declared_length: int | None = None,
    timeout: float = 60.0,
    prefix: bytes = b"",
) -> StreamedUpload:
    """Send up to ``total`` body bytes in ``chunk``-sized pieces, stopping as soon as the server answers.

    ``chunked`` sends ``Transfer-Encoding: chunked`` (no length); otherwise ``declared_length`` is the
    ``Content-Length`` header (which may lie). ``prefix`` is sent first (e.g. a multipart part header)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {declared_length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    start, sent = time.monotonic(), 0
    frame = (lambda b: f"{len(b):x}\r\n".encode() + b + b"\r\n") if chunked else (lambda b: b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(5.0)  # a blocked send means the server stopped reading: look for its answer
        answer = b""
        try:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (frame(prefix) if prefix else b""))
            while sent < total and time.monotonic() - start < timeout:
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered (or closed) before the whole body was sent
                s.sendall(frame(chunk))
                sent += len(chunk)
            else:
                if chunked:
                    s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        s.settimeout(timeout)
        answer += _read_all(s)
    resp = parse_response(answer) if answer.startswith(b"HTTP/") else None
    return StreamedUpload(resp and resp.status, sent, time.monotonic() - start, resp.body if resp else b"")


# -- process and file-system probes ------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """RSS (kB), threads and open fds of one process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            fields[k] = int(v.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def serving_worker(server_pid: int) -> int:
    """The process of the tree that holds the most memory: the BentoML worker with the engine."""
    best, best_rss = server_pid, -1
    for p in process_tree(server_pid):
        try:
            rss = proc_status(p)["VmRSS"]
        except (OSError, KeyError):
            continue
        if rss > best_rss:
            best, best_rss = p, rss
    return best


def tree_snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and link under ``root`` outside ``skip``."""
    out: dict[str, tuple[int, int]] = {}
    skip_s = tuple(str(p) for p in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.startswith(skip_s):
            dirnames[:] = []
            continue
        for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, fn)
            if p.startswith(skip_s) or p.endswith(".log"):
                continue
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


# -- figures (benchmarks/stress.py collects them) ------------------------------------------------------
FIGURES_ENV = "LORAPLEX_RELIABILITY_FIGURES"
STRESS_ENV = "LORAPLEX_STRESS"


def stress_enabled() -> bool:
    return os.environ.get(STRESS_ENV, "") == "1"


def record(key: str, value, unit: str = "", held: str = "") -> None:
    """Append one measured figure to the JSON-lines file named by LORAPLEX_RELIABILITY_FIGURES (if set)."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "value": value, "unit": unit, "held": held}) + "\n")


# -- schemathesis -------------------------------------------------------------------------------------
@dataclass
class FuzzRun:
    generated: int
    failures: list
    exit_code: int
    output: str


def run_schemathesis(
    base_url: str, spec_path: str, token: str, max_examples: int, report_dir: Path, seed: int = 1
) -> FuzzRun:
    """Run the schemathesis CLI against the live server's own spec; only check for 5xx."""
    import glob
    import subprocess
    import sys

    report_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", base_url + spec_path, "-u", base_url,
        "-H", f"Authorization: Bearer {token}", "-c", "not_a_server_error", "-n", str(max_examples),
        "--seed", str(seed), "-w", "1", "--generation-database", "none", "--no-color",
        "--request-timeout", "60", "--report", "json", "--report-dir", str(report_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    reports = sorted(glob.glob(str(report_dir / "*.json")), key=os.path.getmtime)
    if not reports:
        raise RuntimeError(f"schemathesis wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(Path(reports[-1]).read_text())
    return FuzzRun(data["test_cases"]["generated"], data["failures"], proc.returncode, proc.stdout[-4000:])
