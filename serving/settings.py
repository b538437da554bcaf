"""The service's one typed settings object: ``LORAPLEX_*`` environment variables plus an optional file.

Precedence: defaults < the file named by ``LORAPLEX_CONFIG`` (JSON or YAML, same field names, limits
nested under ``limits``) < environment variables. Example::

    LORAPLEX_STORE=/srv/loraplex-store LORAPLEX_BASE=minilm \\
    LORAPLEX_ADMIN_TOKEN=... LORAPLEX_TENANT_TOKENS="acme:tok-a,globex:tok-g" \\
    bentoml serve serving.service:LoraplexService --host 127.0.0.1 --port 3000
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic import ValidationError as PydanticValidationError

from adapters_store.errors import InvalidSettings
from adapters_store.names import NAME_RULE, is_valid_name
from adapters_store.tokens import entry_digest

ENV_PREFIX = "LORAPLEX_"
CONFIG_ENV = "LORAPLEX_CONFIG"
# loraplex's own inference routes (answered in the gateway), path -> engine task, and, with the
# OpenAI-style ones, every route that runs the engine: their per-request BentoML telemetry follows
# ``inference_telemetry``.
NATIVE_INFERENCE_ROUTES = {"/v1/classify": "classify", "/v1/embed": "embed"}
INFERENCE_ROUTES = (*NATIVE_INFERENCE_ROUTES, "/v1/embeddings", "/v1/classifications")
# BentoML's own default access-log skip list (probes and the scrape), kept when we extend it; a test
# compares it with the installed BentoML's default configuration.
BENTOML_LOG_SKIP_PATHS = ("/metrics", "/healthz", "/livez", "/readyz")


class LimitSettings(BaseModel):
    """Request bounds. Every one has a specific error (see docs/service.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, description="Inference body (413).")
    max_upload_bytes: int = Field(
        default=600 << 20, ge=1024, le=8 << 30, description="Upload body, all files together (413)."
    )
    max_inputs: int = Field(default=64, ge=1, le=4096, description="Items in one inference request (422).")
    max_chars: int = Field(default=8192, ge=1, le=1 << 20, description="Characters in one text (422).")
    max_tokens: int = Field(default=256, ge=8, le=8192, description="Tokens per text fed to the backbone.")
    token_policy: Literal["truncate", "reject"] = Field(
        default="truncate", description="Texts over max_tokens: 'truncate' (silently cut) or 'reject' (422)."
    )
    max_image_bytes: int = Field(default=4 << 20, ge=1024, le=1 << 30, description="Encoded image (413).")
    max_image_pixels: int = Field(default=4096 * 4096, ge=64, le=1 << 30, description="Decoded image (422).")
    max_audio_bytes: int = Field(default=4 << 20, ge=1024, le=1 << 30, description="Encoded WAV (413).")
    max_audio_seconds: float = Field(default=60.0, gt=0, le=3600, description="WAV duration (422).")
    max_inflight: int = Field(
        default=512, ge=1, le=1 << 20, description="Requests in progress at once; more get 429 at once."
    )
    max_management: int = Field(
        default=2,
        ge=1,
        le=256,
        description="Management and listing requests handled at once; more wait their turn (inference never does).",
    )
    max_queue_ms: int = Field(
        default=10_000, ge=10, le=600_000, description="Longest an inference item may wait to be batched."
    )
    max_fanout: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Adapters one item (or OpenAI-style request) may fan out to (422).",
    )
    tenant_rps: float = Field(
        default=1000.0,
        gt=0,
        le=1e6,
        description="Default per-tenant requests/s (token bucket; 429 + Retry-After).",
    )
    tenant_burst: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Default per-tenant burst: requests above the rate at once.",
    )
    tenant_max_inflight_rows: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Default per-tenant rows queued or running at once (429 + Retry-After; more in one request: 422).",
    )
    quota_refresh_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="How often per-tenant quota overrides are re-read from the store.",
    )


class JobSettings(BaseModel):
    """Training jobs over HTTP (``serving.jobs``): bounds and how hard a job may use the machine.
    Environment: ``LORAPLEX_JOB_<FIELD>``; in the settings file under ``jobs:``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrent: int = Field(default=1, ge=0, le=64, description="Jobs training at once; 0 = jobs off.")
    max_queued: int = Field(default=8, ge=1, le=10_000, description="Jobs waiting or running here (429).")
    threads: int = Field(default=1, ge=1, le=256, description="torch/OMP threads of a job process.")
    nice: int = Field(default=10, ge=0, le=19, description="CPU niceness of a job process.")
    max_dataset_bytes: int = Field(
        default=10 << 20, ge=1024, le=1 << 30, description="Uploaded dataset (413)."
    )
    max_rows: int = Field(default=100_000, ge=4, le=10_000_000, description="Examples per dataset (422).")
    max_labels: int = Field(default=200, ge=2, le=100_000, description="Distinct labels (422).")
    max_epochs: int = Field(default=50, ge=1, le=1000, description="Epochs a job may ask for (422).")
    max_seconds: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="Wall time of one job; then it is killed, failed."
    )
    stale_s: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="Another replica's job without a heartbeat this long is failed.",
    )
    replica: str = Field(
        default_factory=lambda: os.environ.get("HOSTNAME") or os.uname().nodename,
        min_length=1,
        description="This replica's id in job records: at start it fails its own unfinished jobs.",
    )


class ServiceSettings(BaseModel):
    """Everything the service needs to start. ``from_env()`` builds it.

    Secrets (tokens) are ``SecretStr`` from the moment they are read: they print as ``**********`` and
    no error message built here contains any part of one (see :func:`settings_error`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(description="Adapter store URL: a folder path or s3://bucket/prefix?endpoint=...")
    base: str = Field(default="minilm", description="Registered base model name served by this replica.")
    admin_token: SecretStr | None = Field(default=None, description="Token for management routes.")
    tenant_tokens: dict[str, tuple[SecretStr, ...]] = Field(
        default_factory=dict, description="tenant -> tokens ('sha256:<hex>' entries are pre-hashed)."
    )
    tokens_file: Path | None = Field(
        default=None,
        description='JSON {"admin": [tok...], "tenants": {"acme": [tok...]}, "metrics": [tok...]}; merged in.',
    )
    insecure_dev: bool = Field(
        default=False, description="Demo only: no tokens; tenant from X-Loraplex-Tenant; admin open."
    )
    metrics_auth: Literal["token", "public"] = Field(
        default="token",
        description="/metrics needs the admin or the metrics token ('token'), or none ('public'). "
        "Insecure-dev mode serves it without a token.",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="A token that may read /metrics and nothing else (for the scraper)."
    )
    token_refresh_s: float = Field(
        default=5.0,
        ge=0.5,
        le=300.0,
        description="How often tenant tokens stored in the store are re-read: the bound on how long a "
        "token created or revoked on another replica takes to work or stop working here.",
    )
    cache_bytes: int = Field(default=256 << 20, ge=0, le=1 << 40, description="Engine adapter cache budget.")
    pins: tuple[str, ...] = Field(default=(), description="'tenant' or 'tenant/name' kept in cache.")
    alias_ttl_s: float = Field(
        default=2.0, ge=0.0, le=3600.0, description="Max age of a cached alias resolution (replica lag)."
    )
    runtime: Literal["torch", "onnx", "onnx-int8", "auto"] = Field(
        default="auto",
        description="Backbone runtime; 'auto' serves on onnxruntime when the base's validated export is "
        "stored (base register builds it) and says in the log why it falls back to torch otherwise.",
    )
    threads: int = Field(default=2, ge=1, le=256, description="Intra-op threads of the backbone.")
    max_batch_size: int = Field(default=64, ge=2, le=4096, description="Rows per adaptive batch.")
    workers: int = Field(
        default=1, ge=1, le=64, description="BentoML worker processes, each with its own engine and queue."
    )
    request_timeout_s: float = Field(
        default=120.0, ge=1.0, le=3600.0, description="BentoML's per-request timeout (traffic.timeout)."
    )
    drain_s: float = Field(
        default=2.0,
        ge=0.0,
        le=300.0,
        description="After SIGTERM: seconds of /readyz 503 while still serving.",
    )
    inference_telemetry: bool = Field(
        default=False,
        description="BentoML's per-request OpenTelemetry span and access-log line for the inference "
        "routes (/v1/classify, /v1/embed, /v1/embeddings, /v1/classifications). Off by default: the "
        "span alone costs more server CPU per request than loraplex's own HTTP code "
        "(benchmarks/bench_asgi_layers.py); loraplex's metrics count every request either way, and "
        "every other route keeps both.",
    )
    limits: LimitSettings = Field(default_factory=LimitSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not is_valid_name(v):
            raise ValueError(f"invalid base name ({NAME_RULE})")
        return v

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            entry_digest(v.get_secret_value())  # a ValueError says why, without the value
        return v

    @field_validator("tenant_tokens")
    @classmethod
    def _tenants(cls, v: dict[str, tuple[SecretStr, ...]]) -> dict[str, tuple[SecretStr, ...]]:
        for tenant, tokens in v.items():
            if not is_valid_name(tenant):
                raise ValueError(f"a tenant name is invalid ({NAME_RULE})")
            if not tokens:
                raise ValueError(f"tenant {tenant!r} has no token")
            for i, token in enumerate(tokens, 1):
                try:
                    entry_digest(token.get_secret_value())
                except ValueError as e:
                    raise ValueError(f"tenant {tenant!r} token {i}: {e}") from None
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Build from ``LORAPLEX_*`` variables (and the ``LORAPLEX_CONFIG`` file); errors name the
        variable (or the file and key) and never contain a value."""
        env = os.environ if environ is None else environ
        config_path = env.get(CONFIG_ENV)
        data: dict[str, Any] = _read_config_file(config_path)
        if not isinstance(data.get("limits") or {}, dict):
            raise InvalidSettings(f"{CONFIG_ENV} file {config_path}, key limits: must be a mapping")
        file_fields = {"": set(data), "limits": set(data.get("limits") or {})}
        env_fields = _fields_from_env(env)
        data.update(env_fields)
        limits = dict(data.pop("limits", {}) or {})
        env_limits = _limits_from_env(env)
        limits.update(env_limits)
        jobs = dict(data.pop("jobs", {}) or {})
        env_jobs = _jobs_from_env(env)
        jobs.update(env_jobs)
        file_fields["jobs"] = set(jobs) - set(env_jobs)
        from_file = {s: keys - set(env_fields) - set(env_limits) for s, keys in file_fields.items()}
        try:
            limit_settings = LimitSettings(**limits)
        except PydanticValidationError as e:
            raise settings_error(e, config_path, from_file, "limits") from None
        try:
            job_settings = JobSettings(**jobs)
        except PydanticValidationError as e:
            raise settings_error(e, config_path, from_file, "jobs") from None
        try:
            return cls(**data, limits=limit_settings, jobs=job_settings)
        except PydanticValidationError as e:
            raise settings_error(e, config_path, from_file) from None


def bentoml_config(settings: ServiceSettings | None) -> dict[str, Any]:
    """The ``@bentoml.service`` arguments derived from the settings (the defaults when the settings
    could not be read: the service then refuses to start with that error, see serving/service.py)."""

    def value(name: str) -> Any:
        return getattr(settings, name) if settings is not None else ServiceSettings.model_fields[name].default

    config = {
        "workers": value("workers"),
        "traffic": {"timeout": value("request_timeout_s")},
        "resources": {"cpu": str(value("threads"))},
    }
    if not value("inference_telemetry"):
        # BentoML's request metrics share this list but only skip their last-request timestamp.
        config["logging"] = {"access": {"skip_paths": [*BENTOML_LOG_SKIP_PATHS, *INFERENCE_ROUTES]}}
        config["tracing"] = {"excluded_urls": [f"{re.escape(p)}$" for p in INFERENCE_ROUTES]}
    return config


def settings_error(
    error: PydanticValidationError,
    config_path: str | None,
    from_file: Mapping[str, set[str]],
    section: str = "",
) -> InvalidSettings:
    """One line naming the variable (or the settings file and key) and pydantic's reason, never the
    input: pydantic's own ``str(error)`` shows ``input_value``, which put a token prefix in the log."""
    problems = []
    for err in error.errors(include_url=False, include_context=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        if field and field in from_file.get(section, set()):
            key = ".".join([section, *loc] if section else loc)
            where = f"{CONFIG_ENV} file {config_path}, key {key}"
        else:
            prefix = ENV_PREFIX + ("JOB_" if section == "jobs" else "")  # jobs: LORAPLEX_JOB_<FIELD>
            where = prefix + field.upper() if field else "settings"
        problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return InvalidSettings("invalid loraplex settings: " + "; ".join(problems[:5]))


def parse_tenant_tokens(
    text: str, variable: str = "LORAPLEX_TENANT_TOKENS"
) -> dict[str, tuple[SecretStr, ...]]:
    """``"acme:tok1,acme:tok2,globex:tok3"`` -> ``{"acme": (tok1, tok2), "globex": (tok3,)}`` as
    ``SecretStr``. Errors name the variable, the entry's position and (when valid) its tenant."""
    out: dict[str, list[SecretStr]] = {}
    position = 0
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        position += 1
        tenant, sep, token = part.partition(":")
        tenant, token = tenant.strip(), token.strip()
        if not sep or not token or not tenant:
            raise InvalidSettings(f"{variable}: entry {position} must look like 'tenant:token'")
        if not is_valid_name(tenant):
            raise InvalidSettings(f"{variable}: entry {position} has an invalid tenant name ({NAME_RULE})")
        try:
            entry_digest(token)
        except ValueError as e:
            raise InvalidSettings(f"{variable}: entry {position} (tenant {tenant!r}): {e}") from None
        out.setdefault(tenant, []).append(SecretStr(token))
    return {k: tuple(v) for k, v in out.items()}


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise InvalidSettings(f"{CONFIG_ENV}={path!r} is not a file")
    text = p.read_text()
    # Parser messages quote the offending line, which may hold a token: say where, not what.
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InvalidSettings(f"{CONFIG_ENV} file {path}: not valid YAML{at}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            at = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise InvalidSettings(f"{CONFIG_ENV} file {path}: not valid JSON{at}") from None
    if not isinstance(data, dict):
        raise InvalidSettings(f"{CONFIG_ENV} file {path}: the settings file must hold a mapping")
    return data


_BOOL = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_PLAIN_FIELDS = (
    "store",
    "base",
    "admin_token",
    "tokens_file",
    "metrics_auth",
    "metrics_token",
    "token_refresh_s",
    "cache_bytes",
    "alias_ttl_s",
    "runtime",
    "threads",
    "max_batch_size",
    "workers",
    "request_timeout_s",
    "drain_s",
    "inference_telemetry",
)


def _fields_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in _PLAIN_FIELDS:
        if (value := env.get(ENV_PREFIX + name.upper())) not in (None, ""):
            data[name] = value
    if (value := env.get("LORAPLEX_TENANT_TOKENS")) not in (None, ""):
        data["tenant_tokens"] = parse_tenant_tokens(value)
    if (value := env.get("LORAPLEX_PINS")) not in (None, ""):
        data["pins"] = tuple(p.strip() for p in value.split(",") if p.strip())
    if (value := env.get("LORAPLEX_INSECURE_DEV")) not in (None, ""):
        if value.strip().lower() not in _BOOL:
            raise InvalidSettings("LORAPLEX_INSECURE_DEV must be 0/1/true/false")
        data["insecure_dev"] = _BOOL[value.strip().lower()]
    return data


def _limits_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in LimitSettings.model_fields:
        if (value := env.get(ENV_PREFIX + name.upper())) not in (None, ""):
            out[name] = value
    return out


def _jobs_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in JobSettings.model_fields:
        if (value := env.get(f"{ENV_PREFIX}JOB_{name.upper()}")) not in (None, ""):
            out[name] = value
    return out
