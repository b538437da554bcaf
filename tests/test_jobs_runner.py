"""The job runner without BentoML: restart recovery, time limit, cancel from another replica, the
subprocess's priority and death with its parent, and the rule that serving never imports training."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from adapters_store.jobs import DATASET_FILE, DatasetSummary, JobOptions, JobRecord, JobRecords, dataset_jsonl
from serving.jobs import RESTARTED, JobRunner
from serving.settings import JobSettings
from tests.helpers.bundles import head_bundle
from tests.training_support import store_with_base, toy_rows

REPO = Path(__file__).resolve().parents[1]


def record(tenant="acme", name="intent", status="queued", replica="me", **kw) -> JobRecord:
    summary = DatasetSummary(source="examples", bytes=10, rows=36, labels={"a": 18, "b": 18})
    return JobRecord(
        id=kw.pop("id", f"j{status}{replica}"),
        tenant=tenant,
        name=name,
        strategy="head",
        options=kw.pop("options", JobOptions(epochs=2)),
        status=status,
        replica=replica,
        dataset=summary,
        **kw,
    )


def runner(store, **settings) -> JobRunner:
    return JobRunner(store, store.url, "tiny", JobSettings(replica="me", **settings))


def test_restart_fails_own_running_jobs_requeues_queued_and_completes_committed_ones(tmp_path, tiny_bert_dir):
    store = store_with_base(tmp_path, tiny_bert_dir)
    records = JobRecords(store)
    base = store.get_base("tiny")
    committed = store.put(head_bundle(base, tenant="acme", name="done", seed=1))
    now = time.time()
    jobs = {
        "running": record(status="running", heartbeat_at=now),
        "queued": record(status="queued"),
        "registering": record(
            name="done", status="registering", digest=committed.digest, alias="production", heartbeat_at=now
        ),
        "interrupted_put": record(id="jput", name="never", status="registering", digest="0" * 64),
        "other_fresh": record(status="running", replica="other", heartbeat_at=now),
        "other_stale": record(status="running", replica="other2", heartbeat_at=now - 3600),
        "finished": record(status="succeeded", version=3),
    }
    for r in jobs.values():
        records.save(r)
    jr = runner(store, stale_s=60)
    jr.recover()
    after = {k: records.get("acme", r.id) for k, r in jobs.items()}
    assert after["running"].status == "failed" and after["running"].error == RESTARTED
    assert after["queued"].status == "queued" and jr._queue.get_nowait() == ("acme", jobs["queued"].id)
    # The put had committed before the restart: the job completes, alias included, never half-done.
    assert after["registering"].status == "succeeded" and after["registering"].version == committed.version
    assert store.aliases("acme", "done")["production"] == committed.version
    assert after["interrupted_put"].status == "failed" and store.list_adapters("acme") == ["done"]
    assert after["other_fresh"].status == "running"  # another live replica's job is left alone
    assert after["other_stale"].status == "failed"
    assert after["finished"].status == "succeeded" and after["finished"].version == 3


def test_a_restarting_worker_settles_only_its_own_jobs_not_a_sibling_workers(tmp_path, tiny_bert_dir):
    """Workers of one replica share its host name; worker 1 restarting must not fail worker 0's live job."""
    store = store_with_base(tmp_path, tiny_bert_dir)
    records = JobRecords(store)
    settings = JobSettings(replica="host", stale_s=60)
    w0, w1 = (JobRunner(store, store.url, "tiny", settings, worker=i) for i in (0, 1))
    assert w0.replica != w1.replica
    now = time.time()
    sibling = record(id="j0", status="running", replica=w0.replica, heartbeat_at=now)
    own = record(id="j1", status="running", replica=w1.replica, heartbeat_at=now)
    for r in (sibling, own):
        records.save(r)
    w1.recover()
    assert records.get("acme", "j0").status == "running"
    assert records.get("acme", "j1").status == "failed"
    # Outside BentoML there is no worker index: the id is the configured replica, as before.
    assert runner(store).replica == "me"


def submit(jr: JobRunner, r: JobRecord) -> JobRecord:
    rows = toy_rows(per_class=60)
    return jr.submit(r, dataset_jsonl([x["text"] for x in rows], [x["label"] for x in rows]))


def wait(records: JobRecords, r: JobRecord, statuses, timeout=180) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = records.get(r.tenant, r.id)
        if got.status in statuses:
            return got
        time.sleep(0.2)
    raise AssertionError(f"job still {got.status}")


@pytest.mark.slow
def test_time_limit_and_remote_cancel_stop_the_process_and_register_nothing(tmp_path, tiny_bert_dir):
    store = store_with_base(tmp_path, tiny_bert_dir)
    records = JobRecords(store)
    jr = runner(store, max_seconds=1.5, max_concurrent=1)
    jr.start()
    slow = record(status="queued", id="jslow", options=JobOptions(epochs=500, batch_size=2))
    submit(jr, slow)
    done = wait(records, slow, ("failed", "succeeded", "cancelled"))
    assert done.status == "failed" and "over the job time limit of 1.5 s" in done.error
    assert store.list_adapters("acme") == []
    assert records.get_file("acme", "jslow", DATASET_FILE, "x").count(b"\n") == 180

    jr2 = runner(store, max_seconds=600, max_concurrent=1)
    jr2.start()
    second = record(status="queued", id="jremote", options=JobOptions(epochs=500, batch_size=2))
    submit(jr2, second)
    running = wait(records, second, ("running",))
    running.cancel_requested = True  # as another replica's cancel route writes it
    JobRecords(store).save(running)
    done = wait(records, second, ("failed", "succeeded", "cancelled"), timeout=60)
    assert done.status == "cancelled" and store.list_adapters("acme") == []


CHILD = """
import subprocess, sys, time
from serving.jobs import child_setup
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=child_setup(7))
time.sleep(0.5)
print(p.pid, open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[16], flush=True)
"""


def test_job_process_is_niced_and_dies_with_the_service():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, timeout=60)
    pid, nice = (int(x) for x in out.stdout.split())
    assert nice == 7
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or state == "Z", "the job process outlived its parent"


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_serving_never_imports_training():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "serving").rglob("*.py")
        if "training" in imported_modules(p)
    ]
    assert offenders == []
    code = "import sys, serving.service, serving.jobs, serving.jobs_routes; print('training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def bounds(field) -> list[str]:
    return sorted(repr(m) for m in field.metadata)  # e.g. ['Ge(ge=1)', 'Le(le=1000)']


def test_job_options_are_train_config_fields_with_the_same_bounds():
    from training.config import TrainConfig

    for name, field in JobOptions.model_fields.items():
        train_field = TrainConfig.model_fields[name]
        assert bounds(field) == bounds(train_field), name
        types = {a for a in typing.get_args(field.annotation) or (field.annotation,) if a is not type(None)}
        assert types <= set(typing.get_args(train_field.annotation) or (train_field.annotation,)), name


def test_job_records_round_trip_and_stay_per_tenant(tmp_path, tiny_bert_dir):
    store = store_with_base(tmp_path, tiny_bert_dir)
    records = JobRecords(store)
    records.save(record(tenant="acme", id="ja"))
    records.save(record(tenant="globex", id="jg"))
    assert [r.id for r in records.list("acme")] == ["ja"]
    assert {r.id for r in records.list()} == {"ja", "jg"}
    with pytest.raises(Exception, match="not found"):
        records.get("acme", "jg")
    assert json.loads(store._read("jobs/acme/ja.json"))["tenant"] == "acme"
