"""Validation of a bundle at the store boundary: sizes, safetensors headers, finiteness, and for
LoRA/IA3 the tensor keys and shapes against the adapter's own config and the named base model.

Nothing here unpickles: safetensors headers are parsed as JSON with bounds checked before any tensor
is materialised.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters_store import peft_spec
from adapters_store.base_models import BaseModelEntry
from adapters_store.bundle import (
    HEAD_WEIGHTS_FILE,
    MODEL_WEIGHTS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    Bundle,
)
from adapters_store.errors import (
    IncompatibleBase,
    IntegrityError,
    PayloadTooLarge,
    UnsupportedAdapter,
    ValidationError,
)
from adapters_store.peft_spec import FLOAT_DTYPES, AdapterSpec, parse_peft_config

__all__ = [
    "StoreLimits",
    "body_offset",
    "check_finite",
    "float_views",
    "parse_peft_config",
    "parse_safetensors",
    "peft_spec_of",
    "validate_bundle",
]

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": None,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class StoreLimits:
    """Bounds a store enforces on every put."""

    max_file_bytes: int = 512 << 20
    """Largest single file in a bundle (a full MiniLM fine-tune is ~90 MB)."""
    max_bundle_bytes: int = 1 << 30
    """Largest bundle, all files together."""
    max_files: int = 16
    """Most files in one bundle."""
    max_lora_rank: int = 256
    """Largest LoRA rank accepted."""
    max_header_bytes: int = 1 << 20
    """Largest safetensors JSON header (a LoRA for MiniLM has ~3 KB)."""


def parse_safetensors(data: bytes, name: str, limits: StoreLimits) -> dict[str, dict[str, Any]]:
    """Parse and bounds-check a safetensors header; return {tensor: {dtype, shape, data_offsets}}."""
    if len(data) < 8:
        raise ValidationError(f"{name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > limits.max_header_bytes or n > len(data) - 8:
        raise ValidationError(
            f"{name}: safetensors header length {n} is larger than allowed or than the file"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValidationError(f"{name}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:  # deeply nested arrays exhaust the parser's stack: still just bad input
        raise ValidationError(f"{name}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValidationError(f"{name}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
    spans = []
    for key, meta in header.items():
        _check_tensor_meta(name, key, meta, body)
        spans.append((*meta["data_offsets"], key))
    spans.sort()
    pos = 0
    for start, end, key in spans:
        if start != pos:
            raise ValidationError(
                f"{name}: tensor {key!r} overlaps another or leaves a gap (offset {start}, expected {pos})"
            )
        pos = end
    if pos != body:
        raise ValidationError(f"{name}: {body - pos} trailing bytes after the last tensor")
    return header


def _check_tensor_meta(name: str, key: str, meta: Any, body: int) -> None:
    if not isinstance(meta, dict) or meta.get("dtype") not in _ITEMSIZE:
        raise ValidationError(f"{name}: tensor {key!r} has a missing or unsupported dtype")
    shape, offs = meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
        raise ValidationError(f"{name}: tensor {key!r} has an invalid shape")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise ValidationError(f"{name}: tensor {key!r} has invalid data_offsets")
    start, end = offs
    if not 0 <= start <= end <= body:
        raise ValidationError(f"{name}: tensor {key!r} data_offsets {offs} fall outside the file")
    if end - start != math.prod(shape) * _ITEMSIZE[meta["dtype"]]:  # Python ints: exact, ~10x faster
        raise ValidationError(
            f"{name}: tensor {key!r} byte length does not match dtype {meta['dtype']} x {shape}"
        )


def check_finite(data: bytes, name: str, header: dict[str, dict[str, Any]]) -> None:
    """Every floating-point tensor of a parsed (bounds-checked) safetensors file holds finite values."""
    base = body_offset(data)
    dtypes = {meta["dtype"] for meta in header.values()}
    if len(dtypes) == 1 and (dt := dtypes.pop()) in ("F16", "F32", "F64"):
        # One dtype throughout (the usual file): the tensors tile the body (parse_safetensors checked
        # it), so one call checks them all (an adapter's 24 calls cost ~0.1 ms of a ~4 ms cold load).
        whole = np.frombuffer(data, _DTYPES[dt], (len(data) - base) // _ITEMSIZE[dt], base)
        if np.isfinite(whole).all():
            return
    for key, arr in float_views(data, header).items():
        if not np.isfinite(arr).all():
            raise ValidationError(f"{name}: tensor {key!r} holds NaN or Inf values")


def body_offset(data: bytes) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def float_views(data: bytes, header: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The floating-point tensors of a parsed (bounds-checked) safetensors file, each in its shape as a
    read-only numpy view of ``data`` at its offset; other dtypes are left out. BF16, which numpy lacks,
    is widened into a float32 copy (bf16 is the high half of a float32).

    Views, not slices: slicing bytes copies them while holding the GIL (~0.1 s for a full fine-tune),
    which stalls every other thread of a serving process during a cold load."""
    base = body_offset(data)
    views = {}
    for key, meta in header.items():
        dt = meta["dtype"]
        if dt not in FLOAT_DTYPES:
            continue
        start, end = meta["data_offsets"]
        count = (end - start) // _ITEMSIZE[dt]
        if dt == "BF16":
            arr = (np.frombuffer(data, np.uint16, count, base + start).astype(np.uint32) << 16).view(
                np.float32
            )
        else:
            arr = np.frombuffer(data, _DTYPES[dt], count, base + start)
        views[key] = arr.reshape(meta["shape"])
    return views


def validate_bundle(
    bundle: Bundle,
    base: BaseModelEntry,
    limits: StoreLimits,
    headers: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> AdapterSpec | None:
    """Everything a put must check before a single byte is stored; returns the PEFT spec of a lora/ia3
    bundle (the store writes it into the manifest). Raises a specific error. ``headers``, when given,
    receives each safetensors file's checked header, so a loader that reads the tensors next does not
    parse (and bounds-check) every header a second time on a cold load."""
    m = bundle.manifest
    if m.base.fingerprint != base.fingerprint:
        raise IncompatibleBase(
            f"bundle was trained on base {m.base.name!r} with fingerprint {m.base.fingerprint[:12]}..., but the "
            f"registered base {base.name!r} has fingerprint {base.fingerprint[:12]}...; retrain on the registered base"
        )
    if len(bundle.files) > limits.max_files:
        raise ValidationError(f"bundle has {len(bundle.files)} files; the limit is {limits.max_files}")
    total = 0
    for fname, data in bundle.files.items():
        total += len(data)
        if len(data) > limits.max_file_bytes:
            raise PayloadTooLarge(f"{fname} is {len(data)} bytes; the limit is {limits.max_file_bytes}")
    if total > limits.max_bundle_bytes:
        raise PayloadTooLarge(f"bundle is {total} bytes; the limit is {limits.max_bundle_bytes}")
    try:
        bundle.verify()
    except IntegrityError as e:
        # A bundle being put disagrees with its own manifest: bad input, not a damaged store.
        raise ValidationError(f"bundle does not match its manifest: {e.message}") from None
    headers = {} if headers is None else headers
    for fname, data in bundle.files.items():
        if fname.endswith(".safetensors"):
            headers[fname] = parse_safetensors(data, fname, limits)
            check_finite(data, fname, headers[fname])
    spec = None
    if m.kind in ("lora", "ia3"):
        spec = peft_spec_of(bundle, base, limits, headers[PEFT_WEIGHTS_FILE])
        if HEAD_WEIGHTS_FILE in headers and m.head is not None:
            check_head(headers[HEAD_WEIGHTS_FILE], m.head)
        elif m.task != "feature-extraction" and spec.head is None:
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE} has no classifier weight; a classification adapter needs one in "
                "modules_to_save (or use task feature-extraction)"
            )
    else:
        check_head(headers[HEAD_WEIGHTS_FILE], m.head)  # type: ignore[arg-type]
    if m.kind in ("partial", "full"):
        check_model_weights(m.kind, headers[MODEL_WEIGHTS_FILE], base, m.first_trained_layer)
    return spec


def peft_spec_of(
    bundle: Bundle, base: BaseModelEntry, limits: StoreLimits, header: dict[str, dict[str, Any]] | None = None
) -> AdapterSpec:
    """The bundle's adapter spec, computed from its files; a spec already in the manifest must agree."""
    m = bundle.manifest
    if header is None:
        header = parse_safetensors(bundle.files[PEFT_WEIGHTS_FILE], PEFT_WEIGHTS_FILE, limits)
    cfg = parse_peft_config(bundle.files[PEFT_CONFIG_FILE])
    expected = "LORA" if m.kind == "lora" else "IA3"
    if str(cfg.get("peft_type", "")).upper() != expected:
        raise UnsupportedAdapter(
            f"{PEFT_CONFIG_FILE} peft_type is {cfg.get('peft_type')!r}; a {m.kind!r} bundle needs {expected}"
        )
    spec = peft_spec.build(cfg, header, base, m.labels, limits.max_lora_rank)
    if m.peft is not None and m.peft != spec:
        raise ValidationError("the manifest's 'peft' spec does not match its adapter files")
    return spec


def check_head(header: dict[str, dict[str, Any]], spec) -> None:
    want = {"out.weight": [spec.num_outputs, spec.hidden or spec.in_features], "out.bias": [spec.num_outputs]}
    if spec.hidden:
        want |= {"hidden.weight": [spec.hidden, spec.in_features], "hidden.bias": [spec.hidden]}
    if set(header) != set(want):
        raise ValidationError(f"{HEAD_WEIGHTS_FILE} must hold exactly {sorted(want)}, found {sorted(header)}")
    for key, shape in want.items():
        if header[key]["shape"] != shape:
            raise ValidationError(
                f"{HEAD_WEIGHTS_FILE}: {key!r} has shape {header[key]['shape']}, expected {shape}"
            )


def check_model_weights(
    kind: str, header: dict[str, dict[str, Any]], base: BaseModelEntry, first: int | None
) -> None:
    """partial/full: every tensor must exist in the base with the same shape; full must cover the base."""
    for key, meta in header.items():
        shape = base.tensors.get(key)
        if shape is None:
            raise ValidationError(
                f"{MODEL_WEIGHTS_FILE}: tensor {key!r} is not a weight of base {base.name!r}"
            )
        if list(meta["shape"]) != list(shape):
            raise ValidationError(
                f"{MODEL_WEIGHTS_FILE}: {key!r} has shape {meta['shape']}, base has {shape}"
            )
        layer = _layer_index(key)
        if kind == "partial" and not (
            layer is not None and layer >= (first or 0) or key.startswith("pooler.")
        ):
            raise ValidationError(f"{MODEL_WEIGHTS_FILE}: {key!r} is below first_trained_layer={first}")
    if kind == "full":
        missing = sorted(set(base.tensors) - set(header))
        if missing:
            raise ValidationError(
                f"{MODEL_WEIGHTS_FILE}: a full fine-tune must hold every base weight; missing {missing[:5]}"
            )


def _layer_index(key: str) -> int | None:
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", key)
    return int(m.group(1)) if m else None
