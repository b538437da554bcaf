"""HTTP routes of training jobs (mounted with the management routes at ``/v1``).

Tenant token: ``POST /v1/jobs`` (train one of your own adapters), ``GET /v1/jobs``,
``GET /v1/jobs/{id}``, ``/log``, ``/curve.png``, ``POST /v1/jobs/{id}/cancel``; another tenant's job
is a 404 like a missing one. Admin token: the same under ``/v1/admin/tenants/{tenant}/jobs``, and
``GET /v1/admin/jobs`` for every tenant.

A job is posted as JSON ``{"name", "strategy", "options", "alias", "examples": [{"text", "label"}]}``
or as multipart with a ``dataset`` file (CSV/TSV/JSONL, read by ``adapters_store.tables`` like
``training/`` reads it; optional ``text_column``/``label_column``) and the same fields (``options`` as
JSON). Everything is checked before the job is queued: limits answer 413/422, nothing is stored.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pydantic import ValidationError as PydanticValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from adapters_store.errors import (
    DatasetError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationError,
)
from adapters_store.jobs import (
    CURVE_FILE,
    JOB_STRATEGIES,
    LOG_FILE,
    DatasetSummary,
    JobOptions,
    JobRecord,
    dataset_jsonl,
    new_job_id,
)
from adapters_store.names import validate_alias, validate_name
from adapters_store.tables import column, parse_rows, table_format
from serving.management import ManagementContext, principal_of, route
from serving.settings import JobSettings

FORM_OVERHEAD = 64 << 10  # multipart boundaries and the small fields around the dataset file
JOB_FIELDS = {"name", "strategy", "options", "alias", "examples", "text_column", "label_column"}


# -- intake ----------------------------------------------------------------------------------------
def job_view(record: JobRecord) -> dict[str, Any]:
    return json.loads(record.model_dump_json(exclude={"replica", "heartbeat_at"}))


def check_options(raw: Any, settings: JobSettings) -> JobOptions:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise InvalidRequest("options must be a JSON object") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValidationError("options must be a JSON object")
    try:
        options = JobOptions(**raw)
    except PydanticValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in e.errors()[:5])
        raise ValidationError(f"invalid options: {details}") from None
    if options.epochs > settings.max_epochs:
        raise ValidationError(
            f"options.epochs={options.epochs} is over this service's limit of {settings.max_epochs} "
            "(LORAPLEX_JOB_MAX_EPOCHS)"
        )
    return options


def check_dataset(texts: list[str], labels: list[str], size: int, source: str, settings: JobSettings):
    if len(texts) > settings.max_rows:
        raise DatasetError(
            f"{source}: {len(texts)} examples; this service takes at most {settings.max_rows} "
            "(LORAPLEX_JOB_MAX_ROWS)"
        )
    counts = Counter(labels)
    if len(counts) > settings.max_labels:
        raise DatasetError(
            f"{source}: {len(counts)} distinct labels; this service takes at most {settings.max_labels} "
            "(LORAPLEX_JOB_MAX_LABELS)"
        )
    if len(counts) < 2:
        raise DatasetError(
            f"{source}: a single label ({next(iter(counts))!r}); classification needs two or more"
        )
    return DatasetSummary(source=source, bytes=size, rows=len(texts), labels=dict(sorted(counts.items())))


def rows_to_examples(rows: list[dict[str, Any]], fields: dict[str, Any], where: str) -> tuple[list, list]:
    text_col = str(fields.get("text_column") or "text")
    label_col = str(fields.get("label_column") or "label")
    return column(rows, text_col, where, "text"), column(rows, label_col, where, "label")


async def read_job_body(request: Request, settings: JobSettings) -> tuple[dict[str, Any], bytes, str]:
    """(fields, dataset bytes, dataset file name or 'examples'), with the size limit applied."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_dataset_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + FORM_OVERHEAD:
        raise PayloadTooLarge(
            f"the dataset is over this service's limit of {limit} bytes (LORAPLEX_JOB_MAX_DATASET_BYTES)"
        )
    if ctype == "application/json":
        body = await request.body()
        if len(body) > limit + FORM_OVERHEAD:
            raise PayloadTooLarge(f"the dataset is over this service's limit of {limit} bytes")
        try:
            fields = json.loads(body)
        except ValueError:
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ValidationError("the body must be a JSON object")
        return fields, body, "examples"
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            "post a job as JSON (examples) or multipart/form-data with a 'dataset' file (CSV/TSV/JSONL)"
        )
    fields: dict[str, Any] = {}
    data, file_name = None, ""
    async with request.form(max_files=1, max_fields=16, max_part_size=FORM_OVERHEAD) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key == "dataset":
                file_name = (value.filename or "dataset").rsplit("/", 1)[-1]
                data = await value.read(limit + 1)
            else:
                raise ValidationError(f"unexpected file part {key!r}; send the data as 'dataset'")
    if data is None:
        raise ValidationError("multipart job without a 'dataset' file part")
    if len(data) > limit:
        raise PayloadTooLarge(f"the dataset is over this service's limit of {limit} bytes")
    return fields, data, file_name


def build_job(tenant: str, fields: dict[str, Any], data: bytes, source: str, settings: JobSettings):
    """Validate everything; -> (record, normalised dataset). Raises before anything is stored."""
    unknown = sorted(set(fields) - JOB_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown job fields: {', '.join(unknown)}; allowed: {', '.join(sorted(JOB_FIELDS))}"
        )
    name = validate_name(fields.get("name"), "adapter name")
    strategy = fields.get("strategy") or "lora"
    if strategy not in JOB_STRATEGIES:
        raise ValidationError(f"strategy {strategy!r} is not one of {', '.join(JOB_STRATEGIES)}")
    alias = validate_alias(fields["alias"]) if fields.get("alias") else None
    options = check_options(fields.get("options"), settings)
    if source == "examples":
        examples = fields.get("examples")
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            raise ValidationError('examples must be a list of {"text": ..., "label": ...} objects')
        texts, labels = rows_to_examples(examples, fields, "examples")
    else:
        rows = parse_rows(data, table_format(source, source), source)
        texts, labels = rows_to_examples(rows, fields, source)
    summary = check_dataset(texts, labels, len(data), source, settings)
    record = JobRecord(
        id=new_job_id(),
        tenant=tenant,
        name=name,
        strategy=strategy,
        options=options,
        alias=alias,
        dataset=summary,
    )
    return record, dataset_jsonl(texts, labels)


# -- routes ----------------------------------------------------------------------------------------
async def create(ctx: ManagementContext, request: Request, tenant: str) -> dict[str, Any]:
    runner, settings = ctx.need_runner(), ctx.job_settings
    fields, data, source = await read_job_body(request, settings)
    record, dataset = build_job(tenant, fields, data, source, settings)
    record = await run_in_threadpool(runner.submit, record, dataset)
    return job_view(record)


def own(request: Request) -> str:
    return principal_of(request).require_tenant()


def admin_tenant(request: Request) -> str:
    return validate_name(request.path_params["tenant"], "tenant")


def job_id(request: Request) -> str:
    return validate_name(request.path_params["job"], "job id")


async def show(ctx: ManagementContext, tenant: str, jid: str) -> dict[str, Any]:
    return job_view(await run_in_threadpool(ctx.need_runner().records.get, tenant, jid))


async def listing(ctx: ManagementContext, tenant: str | None) -> dict[str, Any]:
    records = await run_in_threadpool(ctx.need_runner().records.list, tenant)
    return {"jobs": [job_view(r) for r in records]}


async def job_file(ctx: ManagementContext, tenant: str, jid: str, file: str) -> Response:
    records = ctx.need_runner().records
    await run_in_threadpool(records.get, tenant, jid)  # 404 for a job that is not the caller's
    missing = (
        "no training curve yet (one is drawn after the first epoch)" if file == CURVE_FILE else "no log yet"
    )
    data = await run_in_threadpool(records.get_file, tenant, jid, file, missing)
    media = "image/png" if file == CURVE_FILE else "text/plain; charset=utf-8"
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})


async def cancel(ctx: ManagementContext, tenant: str, jid: str) -> dict[str, Any]:
    return job_view(await run_in_threadpool(ctx.need_runner().cancel, tenant, jid))


ADMIN_JOBS = "/admin/tenants/{tenant}/jobs"


@route("/jobs", ["POST"], "tenant", status=202)
async def create_own_job(request: Request, ctx: ManagementContext):
    """Start a training job for one of your adapters (JSON examples or a multipart 'dataset' file)."""
    return await create(ctx, request, own(request))


@route("/jobs", ["GET"], "tenant")
async def list_own_jobs(request: Request, ctx: ManagementContext):
    """Your training jobs, newest first."""
    return await listing(ctx, own(request))


@route("/jobs/{job}", ["GET"], "tenant")
async def show_own_job(request: Request, ctx: ManagementContext):
    """One of your jobs: status, progress (epoch, step, loss, val metrics, ETA), result or reason."""
    return await show(ctx, own(request), job_id(request))


@route("/jobs/{job}/log", ["GET"], "tenant")
async def own_job_log(request: Request, ctx: ManagementContext):
    """The job process's output (last 64 KiB), plain text."""
    return await job_file(ctx, own(request), job_id(request), LOG_FILE)


@route("/jobs/{job}/curve.png", ["GET"], "tenant")
async def own_job_curve(request: Request, ctx: ManagementContext):
    """Training loss and validation metric per epoch (PNG)."""
    return await job_file(ctx, own(request), job_id(request), CURVE_FILE)


@route("/jobs/{job}/cancel", ["POST"], "tenant")
async def cancel_own_job(request: Request, ctx: ManagementContext):
    """Cancel a queued or running job; nothing is registered."""
    return await cancel(ctx, own(request), job_id(request))


@route("/admin/jobs", ["GET"], "admin")
async def list_all_jobs(request: Request, ctx: ManagementContext):
    """Every tenant's training jobs, newest first."""
    return await listing(ctx, None)


@route(ADMIN_JOBS, ["POST"], "admin", status=202)
async def create_job(request: Request, ctx: ManagementContext):
    """Start a training job for a tenant's adapter (JSON examples or a multipart 'dataset' file)."""
    return await create(ctx, request, admin_tenant(request))


@route(ADMIN_JOBS, ["GET"], "admin")
async def list_jobs(request: Request, ctx: ManagementContext):
    """A tenant's training jobs, newest first."""
    return await listing(ctx, admin_tenant(request))


@route(ADMIN_JOBS + "/{job}", ["GET"], "admin")
async def show_job(request: Request, ctx: ManagementContext):
    """One job: status, progress, result or reason."""
    return await show(ctx, admin_tenant(request), job_id(request))


@route(ADMIN_JOBS + "/{job}/log", ["GET"], "admin")
async def job_log(request: Request, ctx: ManagementContext):
    """The job process's output (last 64 KiB), plain text."""
    return await job_file(ctx, admin_tenant(request), job_id(request), LOG_FILE)


@route(ADMIN_JOBS + "/{job}/curve.png", ["GET"], "admin")
async def job_curve(request: Request, ctx: ManagementContext):
    """Training loss and validation metric per epoch (PNG)."""
    return await job_file(ctx, admin_tenant(request), job_id(request), CURVE_FILE)


@route(ADMIN_JOBS + "/{job}/cancel", ["POST"], "admin")
async def cancel_job(request: Request, ctx: ManagementContext):
    """Cancel a queued or running job; nothing is registered."""
    return await cancel(ctx, admin_tenant(request), job_id(request))


JOB_ROUTES = [
    create_own_job,
    list_own_jobs,
    show_own_job,
    own_job_log,
    own_job_curve,
    cancel_own_job,
    list_all_jobs,
    create_job,
    list_jobs,
    show_job,
    job_log,
    job_curve,
    cancel_job,
]
