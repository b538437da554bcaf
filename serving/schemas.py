"""Request and response bodies of the HTTP API (pydantic; they are the OpenAPI schemas too).

Inference bodies are ``{"items": [...]}``: BentoML's adaptive batching concatenates the ``items`` of
concurrent requests (from any tenants) into one engine call. The caller's tenant is stamped on each
item from its token (a private attribute, so no body field can set it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, model_validator

from adapters_store.bundle import AdapterManifest

ADAPTER_REF_MAX = 200


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="Input text (text backbones).")
    image_b64: str | None = Field(default=None, description="Base64 PNG/JPEG (image backbones).")
    audio_b64: str | None = Field(
        default=None,
        description="Base64 WAV, 16-bit PCM mono at the base's sampling rate (audio backbones).",
    )
    _tenant: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.text, self.image_b64, self.audio_b64)) != 1:
            raise ValueError("give exactly one of 'text', 'image_b64' or 'audio_b64'")
        return self

    @property
    def tenant(self) -> str | None:
        return self._tenant


class ClassifyItem(_Item):
    adapter: str = Field(
        min_length=1,
        max_length=ADAPTER_REF_MAX,
        description="'name', 'name@3' or 'name@alias' within your tenant; no '@' -> production, else latest.",
    )


class EmbedItem(_Item):
    adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=ADAPTER_REF_MAX,
        description="As for classify; null embeds with the bare shared backbone.",
    )


class ErrorBody(BaseModel):
    error: str = Field(description="Stable error code, e.g. 'not_found'.")
    message: str = Field(description="What went wrong and how to fix it.")


class ItemResult(BaseModel):
    """One answered item; names the exact adapter version and content digest that answered."""

    adapter: str | None = Field(default=None, description="Adapter name (null: bare backbone).")
    version: int | None = None
    digest: str | None = Field(default=None, description="Content digest of the adapter bundle.")
    labels: list[str] | None = Field(default=None, description="classify: labels, most probable first.")
    scores: list[float] | None = Field(default=None, description="classify: softmax scores, same order.")
    embedding: list[float] | None = Field(default=None, description="embed: the vector.")
    error: ErrorBody | None = Field(default=None, description="Set when this item failed.")
    _status: int = PrivateAttr(default=200)


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict: JSON true, 1.0 and "1" are refused (422), not coerced into version 1.
    version: StrictInt = Field(ge=1, description="Version the alias should point at (a JSON integer).")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(default="production", description="Alias to move back to the previous version.")


def version_view(manifest: AdapterManifest) -> dict[str, Any]:
    """What the API shows of one stored version (files by size and digest, never contents)."""
    return {
        "tenant": manifest.tenant,
        "name": manifest.name,
        "version": manifest.version,
        "digest": manifest.digest,
        "kind": manifest.kind,
        "task": manifest.task,
        "labels": manifest.labels,
        "base": manifest.base.name,
        "created_at": manifest.created_at,
        "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in manifest.files.items()},
        "metrics": manifest.metrics,
    }
