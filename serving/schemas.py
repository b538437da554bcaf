"""Request and response bodies of the HTTP API (pydantic; they are the OpenAPI schemas too).

Inference bodies are ``{"items": [...]}``: BentoML's adaptive batching concatenates the ``items`` of
concurrent requests (from any tenants) into one engine call. The caller's tenant is stamped on each
item from its token (a private attribute, so no body field can set it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, model_validator

from adapters_store.bundle import AdapterManifest

ADAPTER_REF_MAX = 200
# Extras an answer carries only when the request asks for them (``"include": [...]``): most callers
# want labels and scores, and a digest is 64 characters on every item.
Extra = Literal["digest", "logits"]


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
    adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=ADAPTER_REF_MAX,
        description="'name', 'name@3' or 'name@alias' within your tenant; no '@' -> production, else latest.",
    )
    adapters: list[Annotated[str, Field(min_length=1, max_length=ADAPTER_REF_MAX)]] | None = Field(
        default=None,
        min_length=1,
        description="Fan-out: send this one input to several adapters (instead of 'adapter'); the answer "
        "holds one result per adapter in 'results', computed in one engine call.",
    )

    @model_validator(mode="after")
    def _one_adapter_field(self):
        if (self.adapter is None) == (self.adapters is None):
            raise ValueError("give exactly one of 'adapter' or 'adapters'")
        return self

    @property
    def targets(self) -> list[str | None]:
        """The adapters this item goes to (one, or the fan-out list)."""
        return [self.adapter] if self.adapters is None else list(self.adapters)


class EmbedItem(_Item):
    adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=ADAPTER_REF_MAX,
        description="As for classify; null embeds with the bare shared backbone.",
    )
    adapters: list[Annotated[str, Field(min_length=1, max_length=ADAPTER_REF_MAX)] | None] | None = Field(
        default=None,
        min_length=1,
        description="Fan-out: embed this one input with several adapters (null: the bare backbone) "
        "instead of 'adapter'; one result per adapter in 'results'.",
    )

    @model_validator(mode="after")
    def _not_both(self):
        if self.adapter is not None and self.adapters is not None:
            raise ValueError("give 'adapter' or 'adapters', not both")
        return self

    @property
    def targets(self) -> list[str | None]:
        return [self.adapter] if self.adapters is None else list(self.adapters)


class ErrorBody(BaseModel):
    error: str = Field(description="Stable error code, e.g. 'not_found'.")
    message: str = Field(description="What went wrong and how to fix it.")


class ItemResult(BaseModel):
    """One answered item; names the exact adapter version and content digest that answered."""

    adapter: str | None = Field(default=None, description="Adapter name (null: bare backbone).")
    version: int | None = None
    digest: str | None = Field(
        default=None, description="With include=['digest']: content digest of the adapter bundle."
    )
    labels: list[str] | None = Field(default=None, description="classify: labels, most probable first.")
    scores: list[float] | None = Field(default=None, description="classify: softmax scores, same order.")
    embedding: list[float] | None = Field(default=None, description="embed: the vector.")
    logits: list[float] | None = Field(
        default=None,
        description="classify, with include=['logits']: raw head outputs, in the adapter's label order.",
    )
    results: list[ItemResult] | None = Field(
        default=None, description="Fan-out items: one result per adapter, in the order of 'adapters'."
    )
    error: ErrorBody | None = Field(default=None, description="Set when this item failed.")
    _status: int = PrivateAttr(default=200)
    _tokens: int = PrivateAttr(default=0)  # tokens the backbone read, for usage accounting
    _headers: dict[str, str] = PrivateAttr(default_factory=dict)  # e.g. Retry-After on a 429


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
