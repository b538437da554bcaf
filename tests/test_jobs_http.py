"""Training jobs over HTTP, end to end: a real ``bentoml serve`` (tiny base, local store) runs
``python -m training.job_runner`` subprocesses; datasets are checked before anything is stored."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import httpx
import pytest

from adapters_store.jobs import JobRecords
from tests.service_support import ADMIN, process_tree, seeded_store, serve_ready, service_env, tenant_auth
from tests.training_support import toy_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_LIMITS = {
    "LORAPLEX_JOB_MAX_EPOCHS": "40",
    "LORAPLEX_JOB_MAX_ROWS": "400",
    "LORAPLEX_JOB_MAX_LABELS": "3",
    "LORAPLEX_JOB_MAX_DATASET_BYTES": "32768",
    "LORAPLEX_JOB_REPLICA": "replica-a",
    # Below the dataset limit: a job's dataset takes the upload limit, not the inference body limit.
    "LORAPLEX_MAX_BODY_BYTES": "16384",
}


def csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(rows)
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("e2e-jobs")
    store = seeded_store(tmp / "store", tiny_bert_dir, tmp)
    server = serve_ready(
        "serving.service:LoraplexService", service_env(str(tmp / "store"), tmp, **JOB_LIMITS), tmp
    )
    client = httpx.Client(base_url=server.url, timeout=60)
    state = {"server": server, "client": client, "store": store}
    yield state
    client.close()
    state["server"].stop()


def post_csv(
    c: httpx.Client, data: bytes, headers: dict, path: str = "/v1/jobs", filename="data.csv", **fields
):
    form = {k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in fields.items()}
    return c.post(path, files={"dataset": (filename, data, "text/csv")}, data=form, headers=headers)


def wait_job(
    c: httpx.Client, job_id: str, headers: dict, until=("succeeded", "failed", "cancelled"), timeout=240
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def test_tenant_trains_promotes_and_serves_an_adapter_over_http(env):
    c, acme = env["client"], tenant_auth("acme")
    r = post_csv(
        c,
        csv_bytes(toy_rows(per_class=12)),
        acme,
        name="tickets",
        strategy="lora",
        alias="production",
        options={"epochs": 3, "lr": 0.01, "batch_size": 8},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["tenant"] == "acme"
    assert job["dataset"] == {
        "source": "data.csv",
        "bytes": job["dataset"]["bytes"],
        "rows": 36,
        "labels": {"billing": 12, "login": 12, "shipping": 12},
    }
    # Another tenant cannot see it: the same 404 as a missing job.
    other = c.get(f"/v1/jobs/{job['id']}", headers=tenant_auth("globex"))
    assert other.status_code == 404 and other.json()["error"] == "not_found"

    done = wait_job(c, job["id"], acme)
    assert done["status"] == "succeeded", done
    p = done["progress"]
    assert [h["epoch"] for h in p["history"]] == [1, 2, 3] and p["epoch"] == 3 and p["eta_s"] == 0
    assert p["steps_per_epoch"] > 0 and p["loss"] is not None and 0 <= p["val"]["accuracy"] <= 1
    assert done["version"] == 1 and done["error"] is None
    assert c.get(f"/v1/jobs/{job['id']}/curve.png", headers=acme).content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/v1/jobs/{job['id']}/log", headers=acme).status_code == 200

    # Registered and promoted: the tenant's plain name now answers with the new version.
    answer = c.post(
        "/v1/classify",
        headers=acme,
        json={"items": [{"adapter": "tickets", "text": "refund my invoice payment"}]},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()[0]
    assert body["adapter"] == "acme/tickets" and body["version"] == 1
    assert sorted(body["labels"]) == ["billing", "login", "shipping"]
    assert env["store"].aliases("acme", "tickets")["production"] == 1
    # Listed for the tenant and for the admin (all tenants).
    assert job["id"] in [j["id"] for j in c.get("/v1/jobs", headers=acme).json()["jobs"]]
    assert job["id"] in [j["id"] for j in c.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]]


def test_admin_posts_json_examples_and_a_failing_job_registers_nothing(env):
    c = env["client"]
    # Two examples per class with val_fraction 0.2 cannot give every class a validation example:
    # training's own rule fails the job, with its message, and nothing is registered.
    examples = [{"text": r["text"], "label": r["label"]} for r in toy_rows(per_class=2)]
    r = c.post(
        "/v1/admin/tenants/initech/jobs",
        headers=ADMIN,
        json={"name": "tiny-set", "strategy": "head", "examples": examples, "options": {"epochs": 1}},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    done = wait_job(c, job["id"], tenant_auth("initech"))
    assert done["status"] == "failed" and "too small to split" in done["error"], done
    assert done["version"] is None
    assert "tiny-set" not in env["store"].list_adapters("initech")
    shown = c.get(f"/v1/admin/tenants/initech/jobs/{job['id']}", headers=ADMIN).json()
    assert shown["status"] == "failed"


def test_cancel_stops_a_running_job_and_registers_nothing(env):
    c, globex = env["client"], tenant_auth("globex")
    r = post_csv(
        c,
        csv_bytes(toy_rows(per_class=100)),
        globex,
        name="slow",
        strategy="lora",
        options={"epochs": 40, "batch_size": 4},
    )
    job = r.json()
    wait_job(c, job["id"], globex, until=("running",), timeout=60)
    cancelled = c.post(f"/v1/jobs/{job['id']}/cancel", headers=globex)
    assert cancelled.status_code == 200, cancelled.text
    done = wait_job(c, job["id"], globex, timeout=60)
    assert done["status"] == "cancelled" and done["version"] is None
    assert "slow" not in env["store"].list_adapters("globex")
    again = c.post(f"/v1/jobs/{job['id']}/cancel", headers=globex)
    assert again.status_code == 409 and "already cancelled" in again.json()["message"]


GOOD = csv_bytes(toy_rows(per_class=5))


@pytest.mark.parametrize(
    ("case", "status", "code", "message"),
    [
        ({"options": {"epochs": 41}}, 422, "validation_error", "over this service's limit of 40"),
        ({"options": {"epochs": 0}}, 422, "validation_error", "epochs"),
        ({"options": {"warmup": 3}}, 422, "validation_error", "warmup"),
        ({"strategy": "magic"}, 422, "validation_error", "strategy 'magic'"),
        ({"name": "Bad Name"}, 400, "invalid_name", "adapter name"),
        (
            {"data": GOOD + b"x,4th-label\n"},
            422,
            "dataset_error",
            "4 distinct labels; this service takes at most 3",
        ),
        ({"data": csv_bytes(toy_rows(per_class=300))}, 413, "payload_too_large", "limit of 32768 bytes"),
        ({"data": csv_bytes(toy_rows(per_class=134))}, 422, "dataset_error", "at most 400"),
        (
            {"data": GOOD.replace(b"label", b"intent", 1)},
            422,
            "dataset_error",
            "unknown label column 'label'",
        ),
        ({"data": b"text,label\n\xff\xfe,a\n"}, 422, "dataset_error", "not valid UTF-8"),
        ({"data": b"text,label\nhello,a\nworld,a\n"}, 422, "dataset_error", "a single label"),
        ({"filename": "data.xlsx"}, 422, "dataset_error", "unsupported data file"),
    ],
)
def test_bad_jobs_get_specific_4xx_and_store_nothing(env, case, status, code, message):
    c, acme = env["client"], tenant_auth("acme")
    before = len(JobRecords(env["store"]).list("acme"))
    fields = {"name": "intent2", "strategy": "lora", "options": {"epochs": 2}}
    fields.update({k: v for k, v in case.items() if k in ("options", "strategy", "name")})
    r = post_csv(c, case.get("data", GOOD), acme, filename=case.get("filename", "data.csv"), **fields)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and message in r.json()["message"], r.json()
    assert len(JobRecords(env["store"]).list("acme")) == before


def test_job_routes_need_the_right_token(env):
    c = env["client"]
    assert c.get("/v1/jobs").status_code == 401
    assert c.get("/v1/jobs", headers=ADMIN).status_code == 403  # the admin uses /v1/admin/...
    assert c.get("/v1/admin/jobs", headers=tenant_auth("acme")).status_code == 403
    r = c.post("/v1/jobs", headers={**tenant_auth("acme"), "Content-Type": "text/plain"}, content=b"x")
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    assert c.get("/v1/jobs/j0000nothere", headers=tenant_auth("acme")).status_code == 404


def test_stopping_the_service_fails_the_running_job_and_registers_nothing(env, tmp_path):
    """Last in this module: it replaces the module's server with a restarted one."""
    c, globex = env["client"], tenant_auth("globex")
    r = post_csv(
        c,
        csv_bytes(toy_rows(per_class=100)),
        globex,
        name="restarted",
        strategy="lora",
        alias="production",
        options={"epochs": 40, "batch_size": 4},
    )
    job = r.json()
    wait_job(c, job["id"], globex, until=("running",), timeout=60)
    old = env["server"]
    deadline = time.monotonic() + 30
    while not (job_pids := [p for p in process_tree(old.proc.pid) if "training.job_runner" in cmdline(p)]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert job_pids, "the job should run as a subprocess of the service"
    old.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in job_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in job_pids), "the job process outlived the service"

    new = serve_ready("serving.service:LoraplexService", old.env, tmp_path)
    env["server"] = new  # the module's teardown stops this one
    with httpx.Client(base_url=new.url, timeout=60) as c2:
        done = c2.get(f"/v1/jobs/{job['id']}", headers=globex).json()
    # A graceful stop records why at once; after a kill -9 the restart does (test_jobs_runner.py).
    assert done["status"] == "failed" and "service stopped" in done["error"], done
    assert "restarted" not in env["store"].list_adapters("globex")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
