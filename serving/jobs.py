"""Training jobs: a bounded queue in the service that runs ``python -m training.job_runner`` subprocesses.

Serving never imports training: a job is a separate process, started niced, with a thread cap and
``PR_SET_PDEATHSIG`` (it dies with the service). It reports progress as JSON lines on stdout (see
``training/job_runner.py``) and writes the bundle to a scratch folder; this module then registers it
(``store.put``, the store's atomic commit point) and moves the alias. Job records live in the store
(``adapters_store.jobs``), so any replica answers status; the replica that runs a job heartbeats it.

At start a replica fails its own unfinished jobs (a job whose bundle was already registered is
completed instead, found by digest), re-queues its queued ones, and fails other replicas' jobs whose
heartbeat is older than ``stale_s``: no job stays "running" forever, no version is half-registered.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store.bundle import Bundle
from adapters_store.errors import Conflict, LoraplexError, TooManyRequests
from adapters_store.jobs import CURVE_FILE, DATASET_FILE, LOG_FILE, JobRecord, JobRecords
from serving.settings import JobSettings

logger = logging.getLogger("loraplex.jobs")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 2.0
LOG_TAIL_BYTES = 64 << 10
PR_SET_PDEATHSIG = 1
RESTARTED = "the service restarted while this job was running; nothing was registered"
STOPPED = "the service stopped while this job was running; nothing was registered"


def child_setup(nice: int) -> Callable[[], None]:
    """Runs in the job process before exec: lower its priority, and die if the service dies."""

    def setup() -> None:
        os.nice(nice)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: the heartbeat sweep still fails the job later
            pass

    return setup


def job_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    pythonpath = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(pythonpath)),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


class JobRunner:
    """Queue, run, watch, cancel and register training jobs of this replica."""

    def __init__(
        self,
        store: Any,
        store_url: str,
        base: str,
        settings: JobSettings,
        on_registered: Callable[[str, str], None] = lambda tenant, name: None,
        worker: int | None = None,
    ):
        self.store, self.store_url, self.base, self.settings = store, store_url, base, settings
        if worker is None:
            from bentoml import server_context

            worker = server_context.worker_index
        # Several BentoML workers share one host name: each owns its jobs under its own id, so a worker
        # that restarts settles only its own jobs, never a live sibling's. The circus worker id is a
        # stable slot, so a restarted worker gets its old id back.
        self.replica = settings.replica if worker is None else f"{settings.replica}/worker-{worker}"
        self.records = JobRecords(store)
        self.on_registered = on_registered
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, name=f"loraplex-job-{i}", daemon=True)
            for i in range(settings.max_concurrent)
        ]

    def start(self) -> None:
        self.recover()
        for w in self._workers:
            w.start()
        threading.Thread(target=self._sweep_loop, name="loraplex-job-sweep", daemon=True).start()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, record: JobRecord, dataset: bytes) -> JobRecord:
        if self.settings.max_concurrent == 0:
            raise Conflict("training jobs are switched off on this service (LORAPLEX_JOB_MAX_CONCURRENT=0)")
        if self.local_active() >= self.settings.max_queued:
            raise TooManyRequests(
                f"{self.settings.max_queued} jobs are already queued or running here; retry when one finishes"
            )
        record.replica = self.replica
        self.records.put_file(record.tenant, record.id, DATASET_FILE, dataset)
        self.records.save(record)  # the record last: a listed job always has its dataset
        self._queue.put((record.tenant, record.id))
        logger.info("job %s queued: %s/%s (%s)", record.id, record.tenant, record.name, record.strategy)
        return record

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Queued: cancelled at once. Running here: the process is killed. On another replica: flagged,
        and that replica kills it at its next heartbeat. Registering or finished: 409."""
        record = self.records.get(tenant, job_id)
        if record.status == "registering":
            raise Conflict(f"job {job_id} is registering its adapter and can no longer be cancelled")
        if not record.active:
            raise Conflict(f"job {job_id} already {record.status}")
        if record.status == "queued":
            return self._finish(record, "cancelled", "cancelled before it started")
        record.cancel_requested = True
        self.records.save(record)
        with self._lock:
            self._cancel.add(job_id)
            proc = self._procs.get(job_id)
        if proc is not None:
            _kill(proc)
        return record

    def stop(self) -> None:
        """The service is shutting down: end running jobs now (each is recorded failed, with why);
        queued ones stay queued and run after the restart."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs.values())
        for proc in procs:
            _kill(proc)

    def local_active(self) -> int:
        with self._lock:
            return self._queue.qsize() + len(self._procs)

    # -- recovery --------------------------------------------------------------------------------
    def recover(self) -> None:
        """Settle jobs left unfinished by a previous life of this replica (or a dead other one)."""
        now = time.time()
        for record in self.records.list():
            if not record.active:
                continue
            mine = record.replica == self.replica
            stale = now - (record.heartbeat_at or record.created_at) > self.settings.stale_s
            if mine and record.status == "queued":
                self._queue.put((record.tenant, record.id))  # nothing ran yet: run it now
            elif mine or stale:
                self._settle_interrupted(record)

    def _settle_interrupted(self, record: JobRecord) -> None:
        version = self._registered_version(record) if record.status == "registering" else None
        if version is not None:  # the put committed before the restart: finish the job, alias included
            self._complete(record, version)
            return
        self._finish(record, "failed", RESTARTED)

    def _registered_version(self, record: JobRecord) -> int | None:
        try:
            for m in self.store.list_versions(record.tenant, record.name):
                if m.digest == record.digest:
                    return m.version
        except LoraplexError:
            return None
        return None

    def _sweep_loop(self) -> None:
        while True:
            time.sleep(max(self.settings.stale_s / 2, 1.0))
            try:
                now = time.time()
                for r in self.records.list():
                    hb = r.heartbeat_at or r.created_at
                    if r.active and r.replica != self.replica and now - hb > self.settings.stale_s:
                        self._settle_interrupted(r)
            except Exception:
                logger.exception("job sweep failed")

    # -- running ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            tenant, job_id = self._queue.get()
            if self._stopping:
                return
            try:
                record = self.records.get(tenant, job_id)
                if record.status == "queued":
                    self._run(record)
            except Exception as e:  # a job's failure must never stop the worker
                logger.exception("job %s crashed the runner", job_id)
                try:
                    self._finish(self.records.get(tenant, job_id), "failed", f"internal error: {e}")
                except Exception:
                    logger.exception("could not record the failure of job %s", job_id)

    def _run(self, record: JobRecord) -> None:
        with tempfile.TemporaryDirectory(prefix=f"loraplex-job-{record.id}-") as tmp:
            work = Path(tmp)
            record.status, record.started_at = "running", time.time()
            record.heartbeat_at = record.started_at
            self.records.save(record)
            proc, log = self._spawn(record, work)
            outcome = self._watch(record, proc, work, log)
            log.close()
            self._store_log(record, work)
            if outcome["status"] == "trained":
                self._register(record, work, outcome)
            else:
                self._finish(record, outcome["status"], outcome["reason"])

    def _spawn(self, record: JobRecord, work: Path) -> tuple[subprocess.Popen, Any]:
        dataset = work / DATASET_FILE
        dataset.write_bytes(self.records.get_file(record.tenant, record.id, DATASET_FILE, "dataset missing"))
        spec = {
            "store": self.store_url,
            "base": self.base,
            "tenant": record.tenant,
            "name": record.name,
            "strategy": record.strategy,
            "options": record.options.train_fields(),
            "dataset": str(dataset),
            "out_dir": str(work / "out"),
            "threads": self.settings.threads,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        log = open(work / LOG_FILE, "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "training.job_runner", str(work / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=job_env(self.settings.threads),
            cwd=work,
            preexec_fn=child_setup(self.settings.nice),  # noqa: PLW1509 (only os.nice and prctl run there)
        )
        with self._lock:
            self._procs[record.id] = proc
        logger.info("job %s started: pid %s", record.id, proc.pid)
        return proc, log

    def _watch(self, record: JobRecord, proc: subprocess.Popen, work: Path, log: Any) -> dict[str, Any]:
        """Follow the events until the process ends; heartbeat, enforce the time limit, honour cancel."""
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_events, args=(proc.stdout, events), daemon=True).start()
        outcome: dict[str, Any] = {"status": "failed", "reason": None}
        deadline = time.monotonic() + self.settings.max_seconds
        last_beat, stopped = 0.0, None
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = {}
            if event is None:
                break
            if event:
                self._apply(record, event, work, outcome)
            if stopped is None and time.monotonic() > deadline:
                stopped = f"over the job time limit of {self.settings.max_seconds:g} s; stopped"
                _kill(proc)
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                stopped = stopped or self._beat(record, proc, work)
        rc = proc.wait()
        with self._lock:
            self._procs.pop(record.id, None)
            cancelled = record.id in self._cancel
            self._cancel.discard(record.id)
        if self._stopping:
            return {"status": "failed", "reason": STOPPED}
        if cancelled or stopped == "cancelled":
            return {"status": "cancelled", "reason": "cancelled while training; nothing was registered"}
        if stopped:
            return {"status": "failed", "reason": stopped}
        if outcome["status"] == "trained" and rc == 0:
            return outcome
        reason = outcome["reason"] or f"the training process exited with status {rc}: {_last_line(work)}"
        return {"status": "failed", "reason": reason}

    def _apply(self, record: JobRecord, event: dict[str, Any], work: Path, outcome: dict[str, Any]) -> None:
        kind, p = event.get("event"), record.progress
        if kind == "step":
            p.epoch, p.epochs, p.step = event["epoch"], event["epochs"], event["step"]
            p.steps_per_epoch, p.loss, p.eta_s = event["steps"], event["loss"], event.get("eta_s")
        elif kind == "epoch":
            p.history = [*p.history, {k: event[k] for k in ("epoch", "train_loss", "val") if k in event}]
            p.val, p.eta_s, p.loss = event.get("val", {}), event.get("eta_s"), event.get("train_loss")
            p.step = p.steps_per_epoch
            curve = work / "out" / "curve.png"
            if curve.is_file():
                self.records.put_file(record.tenant, record.id, CURVE_FILE, curve.read_bytes())
        elif kind == "trained":
            outcome.update(status="trained", digest=event.get("digest"), metrics=event.get("metrics", {}))
            return
        elif kind == "failed":
            outcome["reason"] = event.get("reason")
            return
        record.progress = p
        record.heartbeat_at = time.time()
        self.records.save(record)

    def _beat(self, record: JobRecord, proc: subprocess.Popen, work: Path) -> str | None:
        """Heartbeat, keep the log tail current, and see whether another replica asked to cancel."""
        stored = self.records.get(record.tenant, record.id)
        self._store_log(record, work)
        if stored.cancel_requested:
            _kill(proc)
            return "cancelled"
        record.heartbeat_at = time.time()
        self.records.save(record)
        return None

    def _store_log(self, record: JobRecord, work: Path) -> None:
        path = work / LOG_FILE
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                self.records.put_file(record.tenant, record.id, LOG_FILE, f.read())

    def _register(self, record: JobRecord, work: Path, outcome: dict[str, Any]) -> None:
        """The job's one write to the adapters: ``put`` (atomic), then the alias. A failure of the alias
        withdraws the version, so a job either fully succeeds or leaves nothing."""
        try:
            bundle = Bundle.read_dir(work / "out" / "bundle")
        except LoraplexError as e:
            self._finish(record, "failed", f"the trained bundle is unreadable: {e.message}")
            return
        record.status, record.digest = "registering", bundle.manifest.digest
        record.metrics = outcome.get("metrics") or {}
        self.records.save(record)
        try:
            manifest = self.store.put(bundle)
        except LoraplexError as e:
            self._finish(record, "failed", f"registering the adapter failed: {e.code}: {e.message}")
            return
        self._complete(record, manifest.version)

    def _complete(self, record: JobRecord, version: int) -> None:
        if record.alias:
            try:
                self.store.set_alias(record.tenant, record.name, record.alias, version)
            except LoraplexError as e:
                self.store.delete_version(record.tenant, record.name, version)
                self._finish(
                    record, "failed", f"moving alias {record.alias!r} failed ({e.message}); withdrawn"
                )
                return
        record.version = version
        self.on_registered(record.tenant, record.name)
        self._finish(record, "succeeded", None)
        logger.info("job %s registered %s/%s@%s", record.id, record.tenant, record.name, version)

    def _finish(self, record: JobRecord, status: str, reason: str | None) -> JobRecord:
        record.status, record.error, record.finished_at = status, reason, time.time()
        record.heartbeat_at = record.finished_at
        if status == "succeeded":
            record.progress.eta_s = 0.0
        self.records.save(record)
        if status != "succeeded":
            logger.info("job %s %s: %s", record.id, status, reason)
        return record


def _read_events(stream: Any, out: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        try:
            event = json.loads(raw)
        except ValueError:
            continue  # not an event (the runner sends only JSON lines; be robust anyway)
        if isinstance(event, dict):
            out.put(event)
    out.put(None)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s (from a helper thread, so the caller never blocks)."""
    if proc.poll() is not None:
        return
    proc.terminate()

    def reap() -> None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

    threading.Thread(target=reap, daemon=True).start()


def _last_line(work: Path) -> str:
    try:
        lines = (work / LOG_FILE).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1][:500] if lines else "no output"
