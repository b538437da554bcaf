"""Graceful shutdown: on SIGTERM, report not-ready first, keep serving for a drain period, then stop.

Kubernetes (or any load balancer polling ``/readyz``) sends SIGTERM and keeps routing requests until
readiness fails. Uvicorn stops listening at once on SIGTERM, so without a drain period clients see
refused connections instead of a 503. The handler chains to the server's own handler (uvicorn's
``handle_exit``) after ``drain_s`` seconds; uvicorn then finishes the requests in flight and exits.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger("loraplex.shutdown")


def install_drain_handler(drain_s: float, on_drain: Callable[[], None]) -> bool:
    """Wrap the current SIGTERM handler; False (and nothing changed) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    started = threading.Event()

    def handler(sig: int, frame) -> None:
        if started.is_set():  # a second SIGTERM: stop now
            return _chain(previous, sig, frame)
        started.set()
        on_drain()
        logger.info("SIGTERM: readiness is 503; draining for %.1fs before shutdown", drain_s)
        timer = threading.Timer(drain_s, _chain, args=(previous, sig, frame))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    return True


def _chain(previous, sig: int, frame) -> None:
    if callable(previous):
        previous(sig, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
