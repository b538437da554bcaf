"""SIGTERM with requests in flight: /readyz turns 503 first (so a load balancer stops sending), every
request in flight when the signal came completes with 200, and the process exits within the grace period.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.reliability_support import record
from tests.service_support import seeded_store, serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GRACE_S = 30.0
TEXT = "please cancel my order and refund the money " * 12  # ~100 tokens: within the tiny base's 128


def _client_loop(url: str, stop: threading.Event, out: list) -> None:
    body = {"items": [{"adapter": "intent", "text": TEXT}] * 16}
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = c.post("/v1/classify", json=body, headers=tenant_auth("acme")).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            out.append((t0, time.monotonic(), status))
            if not isinstance(status, int):
                return


def _probe_loop(url: str, stop: threading.Event, out: list) -> None:
    with httpx.Client(base_url=url, timeout=5) as c:
        while not stop.is_set():
            try:
                status = c.get("/readyz").status_code
            except httpx.HTTPError:
                status = "refused"
            out.append((time.monotonic(), status))
            time.sleep(0.02)


def test_sigterm_drains_in_flight_requests(tmp_path, tiny_bert_dir):
    seeded_store(tmp_path / "store", tiny_bert_dir, tmp_path)
    server = serve_ready(
        "serving.service:LoraplexService", service_env(str(tmp_path / "store"), tmp_path), tmp_path
    )
    stop, requests, probes = threading.Event(), [], []
    threads = [threading.Thread(target=_client_loop, args=(server.url, stop, requests)) for _ in range(8)]
    threads.append(threading.Thread(target=_probe_loop, args=(server.url, stop, probes)))
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        t_term = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(GRACE_S)
        except Exception:
            pytest.fail(f"still running {GRACE_S}s after SIGTERM:\n{server.log_tail()}")
        exit_s = time.monotonic() - t_term
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    in_flight = [r for r in requests if r[0] < t_term < r[1]]
    assert in_flight, "no request was in flight at SIGTERM; make them longer"
    failed = [r for r in in_flight if r[2] != 200]
    after = [s for t, s in probes if t > t_term]
    first_change = next((s for s in after if s != 200), None)
    record("sigterm_exit_s", round(exit_s, 2), "s", f"{len(in_flight)} in flight, {len(failed)} failed")
    assert not failed, f"{len(failed)}/{len(in_flight)} in-flight requests failed: {failed[:5]}"
    assert first_change == 503, f"readiness after SIGTERM went {after[:10]}... (expected 503 before refusing)"
    assert exit_s < GRACE_S
