"""The bundle contract between training and serving: file names, manifest schema, in-memory bundle.

A bundle is one folder: ``manifest.json`` plus weight files, safetensors only.

=========  ====================================================================================
kind       files (besides manifest.json)
=========  ====================================================================================
head       ``head.safetensors``: the tenant's head on pooled backbone features
lora, ia3  PEFT's own layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (a
           classification head rides in ``modules_to_save``, exactly as PEFT saves it)
partial    ``model.safetensors``: the tenant's copies of the top blocks (keys named as in the
           base, e.g. ``encoder.layer.5.output.dense.weight``) + ``head.safetensors``
full       ``model.safetensors``: every backbone weight + ``head.safetensors``
=========  ====================================================================================

Head file keys: ``out.weight`` [num_outputs, in], ``out.bias`` [num_outputs], and optionally a hidden
layer ``hidden.weight`` [hidden, in], ``hidden.bias`` [hidden] followed by ``manifest.head.activation``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters_store.errors import UnsafeFormat, ValidationError
from adapters_store.names import validate_name
from adapters_store.peft_spec import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, AdapterSpec
from adapters_store.preparation import MAX_TEXT_LENGTH, MIN_TEXT_LENGTH

# 2: lora/ia3 manifests carry the adapter spec (``peft``), computed at put; 1 (no spec) still loads.
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
MODEL_WEIGHTS_FILE = "model.safetensors"
TRAINING_CURVE_FILE = "training_curve.png"

# Extensions a bundle may hold. Weights are safetensors only; pickles are refused unopened.
ALLOWED_EXTENSIONS = frozenset({".safetensors", ".json", ".png", ".md", ".txt"})
PICKLE_EXTENSIONS = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
GRAPH_EXTENSIONS = frozenset({".onnx", ".onnx_data", ".data", ".onnx_adapter", ".pb"})
_FILE_NAME_MAX = 128

Kind = Literal["head", "lora", "ia3", "partial", "full"]
Task = Literal["feature-extraction", "text-classification", "image-classification", "audio-classification"]
Pooling = Literal["mean", "cls", "pooler"]
KINDS: tuple[str, ...] = ("head", "lora", "ia3", "partial", "full")
TASKS: tuple[str, ...] = (
    "feature-extraction",
    "text-classification",
    "image-classification",
    "audio-classification",
)
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "head": (HEAD_WEIGHTS_FILE,),
    "lora": (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE),
    "ia3": (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE),
    "partial": (MODEL_WEIGHTS_FILE, HEAD_WEIGHTS_FILE),
    "full": (MODEL_WEIGHTS_FILE, HEAD_WEIGHTS_FILE),
}
_HEX64 = r"^[0-9a-f]{64}$"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_file_name(name: str) -> str:
    """A bundle file name: one path component, a known safe extension. Pickles are refused unopened."""
    if not isinstance(name, str) or not name or len(name) > _FILE_NAME_MAX:
        raise ValidationError(f"bundle file name must be 1-{_FILE_NAME_MAX} characters")
    if name != os.path.basename(name) or "\\" in name or name.startswith(".") or "\x00" in name:
        raise ValidationError(
            f"bundle file name {name[:80]!r} must be a plain file name (no folders, no leading '.')"
        )
    ext = os.path.splitext(name)[1].lower()
    if ext in PICKLE_EXTENSIONS:
        raise UnsafeFormat(
            f"{name!r} is a pickle-format file, which loraplex never opens; save weights as safetensors "
            "(PEFT: save_pretrained(..., safe_serialization=True))"
        )
    if ext in GRAPH_EXTENSIONS:
        raise UnsafeFormat(
            f"{name!r}: ONNX graphs are built by loraplex from registered bases, never uploaded"
        )
    if ext not in ALLOWED_EXTENSIONS:
        raise ValidationError(
            f"{name!r}: unsupported file type; allowed: {', '.join(sorted(ALLOWED_EXTENSIONS))}"
        )
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    sha256: str = Field(pattern=_HEX64, description="hex sha256 of the file's bytes")
    size: int = Field(ge=0, description="size in bytes")


class BaseRef(_Frozen):
    name: str = Field(description="registered base model name")
    fingerprint: str = Field(pattern=_HEX64, description="digest of the base's config and weights")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "base name")


class HeadSpec(_Frozen):
    """Shape of the tenant head in ``head.safetensors`` (kinds head, partial, full)."""

    in_features: int = Field(gt=0, le=65536)
    num_outputs: int = Field(gt=0, le=65536)
    hidden: int | None = Field(default=None, gt=0, le=65536, description="optional hidden layer width")
    activation: Literal["relu", "tanh", "gelu"] = "relu"


class AdapterManifest(_Frozen):
    """``manifest.json``: what the bundle is, what it was trained on, and the digest of every file."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    tenant: str
    name: str
    version: int | None = Field(default=None, ge=1, description="assigned by the store at put")
    kind: Kind
    task: Task
    labels: list[str] = Field(default_factory=list, max_length=65536)
    base: BaseRef
    pooling: Pooling = Field(default="mean", description="how the sequence is reduced before the head")
    normalize: bool = Field(default=False, description="L2-normalise embeddings (feature-extraction)")
    head: HeadSpec | None = None
    first_trained_layer: int | None = Field(
        default=None, ge=0, description="partial: first tenant-owned block"
    )
    peft: AdapterSpec | None = Field(
        default=None, description="lora/ia3: the adapter spec the store computed at put (schema 2)"
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=MIN_TEXT_LENGTH,
        le=MAX_TEXT_LENGTH,
        description="text bundles: tokens kept per text in training; the engine serves rows the same way "
        "(adapters_store/preparation.py). None: the server's default",
    )
    files: dict[str, FileEntry]
    created_at: str = Field(default_factory=utc_now)
    metrics: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tenant", "name")
    @classmethod
    def _names(cls, v: str, info) -> str:
        return validate_name(v, "tenant" if info.field_name == "tenant" else "adapter name")

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            check_file_name(name)
        if MANIFEST_FILE in v:
            raise ValueError("the manifest does not list itself")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AdapterManifest:
        missing = [f for f in REQUIRED_FILES[self.kind] if f not in self.files]
        if missing:
            raise ValueError(f"a {self.kind!r} bundle needs {', '.join(missing)}")
        if self.peft is not None and self.kind not in ("lora", "ia3"):
            raise ValueError(f"a {self.kind!r} bundle has no PEFT spec")
        if self.kind in ("head", "partial", "full") and self.head is None:
            raise ValueError(f"a {self.kind!r} bundle needs a 'head' spec")
        if self.kind == "partial" and self.first_trained_layer is None:
            raise ValueError("a 'partial' bundle needs 'first_trained_layer'")
        if self.task != "feature-extraction" and not self.labels:
            raise ValueError(f"task {self.task!r} needs 'labels'")
        if self.head is not None and self.labels and self.head.num_outputs != len(self.labels):
            raise ValueError(
                f"head has {self.head.num_outputs} outputs but there are {len(self.labels)} labels"
            )
        return self

    @property
    def digest(self) -> str:
        """Content digest of the bundle (manifest minus version/time): the engine's cache key."""
        # why: a manifest that records no max_seq_len keeps the digest it had before the field existed
        skip = {"version", "created_at"} | ({"max_seq_len"} if self.max_seq_len is None else set())
        body = self.model_dump(mode="json", exclude=skip)
        return sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> AdapterManifest:
        try:
            return cls.model_validate_json(data)
        except Exception as e:  # pydantic's error lists every field; keep it but name the file
            raise ValidationError(f"{MANIFEST_FILE} is not a valid manifest: {_short(e)}") from None


def _short(e: Exception, limit: int = 600) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "..."


@dataclass(frozen=True)
class Bundle:
    """A manifest plus its files' bytes, held in memory (adapters are small; full fine-tunes ~100 MB)."""

    manifest: AdapterManifest
    # bytes; a large file read by ``read_bundle(..., mapped=True)`` is a read-only mmap (bytes-like)
    files: Mapping[str, bytes] = field(repr=False)
    # Set by verify(): a cold load reads, checks and validates one bundle, and hashes each byte once.
    _verified: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, files: Mapping[str, bytes], **manifest_fields: Any) -> Bundle:
        """Make a bundle from file bytes; sizes and digests are computed here.

        >>> Bundle.build({"head.safetensors": b"..."}, tenant="acme", name="intent", kind="head", ...)  # doctest: +SKIP
        """
        entries = {n: FileEntry(sha256=sha256_hex(b), size=len(b)) for n, b in files.items()}
        try:
            manifest = AdapterManifest(files=entries, **manifest_fields)
        except ValidationError:
            raise
        except Exception as e:
            raise ValidationError(f"invalid manifest: {_short(e)}") from None
        return cls(manifest, dict(files))

    def verify(self) -> None:
        """Every listed file present with its recorded size and sha256, and nothing unlisted."""
        from adapters_store.errors import IntegrityError

        if self._verified:
            return

        extra = set(self.files) - set(self.manifest.files)
        if extra:
            raise ValidationError(f"files not listed in the manifest: {', '.join(sorted(extra))}")
        for name, entry in self.manifest.files.items():
            data = self.files.get(name)
            if data is None:
                raise IntegrityError(f"{self.manifest.tenant}/{self.manifest.name}: file {name!r} is missing")
            if len(data) != entry.size or sha256_hex(data) != entry.sha256:
                raise IntegrityError(
                    f"{self.manifest.tenant}/{self.manifest.name}: file {name!r} does not match its sha256/size"
                )
        object.__setattr__(self, "_verified", True)

    def with_manifest(self, **changes: Any) -> Bundle:
        return Bundle(self.manifest.model_copy(update=changes), self.files)

    def write_dir(self, path: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and the files into a folder (created if needed)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (out / check_file_name(name)).write_bytes(data)
        (out / MANIFEST_FILE).write_bytes(self.manifest.to_json())
        return out

    @classmethod
    def read_dir(cls, path: str | os.PathLike, max_file_bytes: int | None = None) -> Bundle:
        """Read a bundle folder; the manifest decides which files belong to it."""
        root = Path(path)
        mpath = root / MANIFEST_FILE
        if not mpath.is_file():
            raise ValidationError(f"{root} has no {MANIFEST_FILE}")
        manifest = AdapterManifest.from_json(mpath.read_bytes())
        files: dict[str, bytes] = {}
        for name in manifest.files:
            p = root / name
            if p.is_symlink() or not p.is_file():
                raise ValidationError(f"{root}: {name!r} is missing or not a regular file")
            if max_file_bytes is not None and p.stat().st_size > max_file_bytes:
                from adapters_store.errors import PayloadTooLarge

                raise PayloadTooLarge(f"{name!r} is {p.stat().st_size} bytes; the limit is {max_file_bytes}")
            files[name] = p.read_bytes()
        bundle = cls(manifest, files)
        bundle.verify()
        return bundle
