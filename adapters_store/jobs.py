"""Training-job records: the schema and where they live in the store, so any replica answers for a job.

Layout (next to the adapters, same primitives on disk and S3)::

    jobs/<tenant>/<id>.json          JobRecord: status, options, progress, result or reason
    jobs/<tenant>/<id>/dataset.jsonl the uploaded examples, normalised to {"text", "label"} lines
    jobs/<tenant>/<id>/log.txt       the training subprocess's output (tail)
    jobs/<tenant>/<id>/curve.png     training loss and validation metric per epoch

The service writes these (``serving.jobs``); the training subprocess only reads its dataset file and
reports progress on stdout. ``JobOptions`` is the whitelist of training options a job may set: its
bounds equal ``training.TrainConfig``'s (a test checks), so a bad option is a 422 before anything runs.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.errors import NotFound
from adapters_store.names import validate_name

JobStatus = Literal["queued", "running", "registering", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running", "registering"})
JOB_STRATEGIES = ("head", "lora", "ia3", "partial", "full")
DATASET_FILE, LOG_FILE, CURVE_FILE = "dataset.jsonl", "log.txt", "curve.png"


class JobOptions(BaseModel):
    """Training options a job may set (a subset of ``TrainConfig``, same bounds); others are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=5, ge=1, le=1000, description="passes over the training data")
    lr: float | None = Field(
        default=None, gt=0.0, le=1.0, description="learning rate; None = strategy default"
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per forward pass")
    max_seq_len: int = Field(default=128, ge=4, le=8192, description="tokens kept per text")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.9, description="stratified validation share")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="split, init and shuffling seed")
    patience: int = Field(default=0, ge=0, le=1000, description="early stop after N epochs w/o gain")
    lora_r: int = Field(default=8, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float = Field(default=16.0, gt=0.0, le=4096.0, description="LoRA scaling numerator")
    top_k: int = Field(default=2, ge=1, le=1024, description="partial: top blocks to train")
    head_hidden: int | None = Field(default=None, ge=1, le=65536, description="hidden width of the head")

    def train_fields(self) -> dict[str, Any]:
        """The ``TrainConfig`` fields to pass (unset optional ones are left to training's defaults)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class JobProgress(BaseModel):
    """Where a running job is; ``history`` has one entry per finished epoch."""

    model_config = ConfigDict(extra="ignore")

    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    loss: float | None = None
    val: dict[str, float] = Field(default_factory=dict)
    eta_s: float | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)


class DatasetSummary(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: str
    bytes: int
    rows: int
    labels: dict[str, int]


class JobRecord(BaseModel):
    """One training job. ``version`` is set only once the bundle is registered (status succeeded)."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    id: str
    tenant: str
    name: str
    strategy: str
    options: JobOptions
    alias: str | None = None
    status: JobStatus = "queued"
    replica: str = ""
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    dataset: DatasetSummary
    progress: JobProgress = Field(default_factory=JobProgress)
    error: str | None = None
    digest: str | None = None
    version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def new_job_id() -> str:
    """Unguessable (a tenant cannot probe others' ids), name-safe, sortable by creation second."""
    return f"j{int(time.time()):x}{secrets.token_hex(6)}"


class JobRecords:
    """Read and write job records and their files through a store's object primitives."""

    def __init__(self, store: Any):
        self.store = store

    @staticmethod
    def _root(tenant: str) -> str:
        return f"jobs/{validate_name(tenant, 'tenant')}/"

    def _key(self, tenant: str, job_id: str, file: str | None = None) -> str:
        root = self._root(tenant) + validate_name(job_id, "job id")
        return f"{root}.json" if file is None else f"{root}/{file}"

    def save(self, record: JobRecord) -> None:
        self.store._write(self._key(record.tenant, record.id), record.model_dump_json().encode())

    def get(self, tenant: str, job_id: str) -> JobRecord:
        try:
            data = self.store._read(self._key(tenant, job_id))
        except NotFound:
            raise NotFound(f"job {job_id!r} not found") from None
        return JobRecord.model_validate_json(data)

    def list(self, tenant: str | None = None) -> list[JobRecord]:
        """Newest first; one tenant's jobs, or everyone's (admin)."""
        tenants = [tenant] if tenant else self.tenants()
        out = []
        for t in tenants:
            for file_name in self.store._names(self._root(t)):
                if file_name.endswith(".json"):
                    try:
                        out.append(self.get(t, file_name.removesuffix(".json")))
                    except (NotFound, ValueError):
                        continue  # removed meanwhile, or damaged
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def tenants(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.store._keys("jobs/") if k.count("/") == 2})

    def put_file(self, tenant: str, job_id: str, file: str, data: bytes) -> None:
        self.store._write(self._key(tenant, job_id, file), data)

    def get_file(self, tenant: str, job_id: str, file: str, missing: str) -> bytes:
        try:
            return self.store._read(self._key(tenant, job_id, file))
        except NotFound:
            raise NotFound(missing) from None


def dataset_jsonl(texts: list[str], labels: list[str]) -> bytes:
    """The normalised dataset a job's subprocess reads (``text`` / ``label`` columns)."""
    return "".join(
        json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)
    ).encode()
