"""Engine settings: one validated object, a bound and a docstring per field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters_store.names import validate_name


class EngineSettings(BaseModel):
    """Runtime knobs of :class:`serving.engine.Engine`. Frozen: build a new one to change it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_bytes: int = Field(
        default=256 << 20,
        ge=0,
        le=1 << 40,
        description="Byte budget of the adapter cache (packed tensors of lora/ia3/head/partial adapters).",
    )
    pins: tuple[str, ...] = Field(
        default=(),
        max_length=10_000,
        description="'tenant' or 'tenant/name' entries whose cached adapters are never evicted.",
    )
    full_cache_size: int = Field(
        default=1,
        ge=0,
        le=64,
        description="How many dedicated full fine-tune model copies stay resident (the expensive option: "
        "each is a whole backbone). 0 loads one per batch and drops it afterwards.",
    )
    max_batch_rows: int = Field(default=64, ge=1, le=4096, description="Rows per backbone forward pass.")
    max_seq_len: int = Field(
        default=256, ge=8, le=8192, description="Tokens per text row; longer is truncated."
    )
    alias_ttl_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="How long an alias resolution (e.g. '@production') is trusted before asking the store again.",
    )
    threads: int = Field(
        default=2, ge=1, le=256, description="torch intra-op threads (torch.set_num_threads)."
    )
    runtime: Literal["torch", "onnx", "onnx-int8", "auto"] = Field(
        default="auto",
        description="Backbone runtime. 'auto' (the default, as the service's): 'onnx' when the base has a "
        "loadable fp32 export ('loraplex base register' stores it), else torch, with the reason in "
        "``Engine.runtime_note`` and the log. 'onnx'/'onnx-int8' run the shared pass on the base's validated "
        "ONNX export for head, bare-base and (with the adapter graph) LoRA and IA3 rows, and refuse to "
        "start without one; other kinds fall back to torch. 'torch': never onnxruntime.",
    )
    base_pooling: Literal["mean", "cls", "pooler"] = Field(
        default="mean", description="Pooling for rows with no adapter (bare base embeddings)."
    )
    base_normalize: bool = Field(
        default=True, description="L2-normalise bare base embeddings (sentence-transformers convention)."
    )

    @field_validator("pins")
    @classmethod
    def _pins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pin in v:
            parts = pin.split("/")
            if len(parts) > 2:
                raise ValueError(f"pin {pin!r} must be 'tenant' or 'tenant/name'")
            for part in parts:
                validate_name(part, "pin")
        return tuple(v)
