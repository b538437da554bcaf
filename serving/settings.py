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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from adapters_store.errors import InvalidRequest
from adapters_store.names import validate_name

ENV_PREFIX = "LORAPLEX_"
CONFIG_ENV = "LORAPLEX_CONFIG"


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


class ServiceSettings(BaseModel):
    """Everything the service needs to start. ``from_env()`` builds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(description="Adapter store URL: a folder path or s3://bucket/prefix?endpoint=...")
    base: str = Field(default="minilm", description="Registered base model name served by this replica.")
    admin_token: SecretStr | None = Field(default=None, description="Token for management routes.")
    tenant_tokens: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="tenant -> tokens ('sha256:<hex>' entries are pre-hashed)."
    )
    tokens_file: Path | None = Field(
        default=None, description='JSON {"admin": [tok...], "tenants": {"acme": [tok...]}}; merged in.'
    )
    insecure_dev: bool = Field(
        default=False, description="Demo only: no tokens; tenant from X-Loraplex-Tenant; admin open."
    )
    cache_bytes: int = Field(default=256 << 20, ge=0, le=1 << 40, description="Engine adapter cache budget.")
    pins: tuple[str, ...] = Field(default=(), description="'tenant' or 'tenant/name' kept in cache.")
    alias_ttl_s: float = Field(
        default=2.0, ge=0.0, le=3600.0, description="Max age of a cached alias resolution (replica lag)."
    )
    runtime: Literal["torch", "onnx", "onnx-int8", "auto"] = Field(
        default="torch", description="Backbone runtime."
    )
    threads: int = Field(default=2, ge=1, le=256, description="Intra-op threads of the backbone.")
    max_batch_size: int = Field(default=64, ge=2, le=4096, description="Rows per adaptive batch.")
    drain_s: float = Field(
        default=2.0,
        ge=0.0,
        le=300.0,
        description="After SIGTERM: seconds of /readyz 503 while still serving.",
    )
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        return validate_name(v, "base name")

    @field_validator("tenant_tokens")
    @classmethod
    def _tenants(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for tenant, tokens in v.items():
            validate_name(tenant, "tenant")
            if not tokens or any(len(t) < 8 for t in tokens):
                raise ValueError(f"tenant {tenant!r}: every token must have at least 8 characters")
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Build from ``LORAPLEX_*`` variables (and the ``LORAPLEX_CONFIG`` file); errors say which."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = _read_config_file(env.get(CONFIG_ENV))
        data.update(_fields_from_env(env))
        limits = dict(data.pop("limits", {}) or {})
        limits.update(_limits_from_env(env))
        try:
            return cls(**data, limits=LimitSettings(**limits))
        except InvalidRequest:
            raise
        except Exception as e:
            raise InvalidRequest(f"invalid loraplex service settings: {e}") from None


def parse_tenant_tokens(text: str) -> dict[str, tuple[str, ...]]:
    """``"acme:tok1,acme:tok2,globex:tok3"`` -> ``{"acme": ("tok1", "tok2"), "globex": ("tok3",)}``."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        tenant, sep, token = part.partition(":")
        if not sep or not token:
            raise InvalidRequest("LORAPLEX_TENANT_TOKENS entries must look like 'tenant:token'")
        out.setdefault(tenant.strip(), []).append(token.strip())
    return {k: tuple(v) for k, v in out.items()}


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise InvalidRequest(f"{CONFIG_ENV}={path!r} is not a file")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: the settings file must hold a mapping")
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
    "cache_bytes",
    "alias_ttl_s",
    "runtime",
    "threads",
    "max_batch_size",
    "drain_s",
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
            raise InvalidRequest(f"LORAPLEX_INSECURE_DEV must be 0/1/true/false, got {value!r}")
        data["insecure_dev"] = _BOOL[value.strip().lower()]
    return data


def _limits_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in LimitSettings.model_fields:
        if (value := env.get(ENV_PREFIX + name.upper())) not in (None, ""):
            out[name] = value
    return out
