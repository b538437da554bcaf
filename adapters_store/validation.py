"""Validation of a bundle at the store boundary: sizes, safetensors headers, finiteness, and for
LoRA/IA3 the tensor keys and shapes against the adapter's own config and the named base model.

Nothing here unpickles: safetensors headers are parsed as JSON with bounds checked before any tensor
is materialised.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    if end - start != int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[meta["dtype"]]:
        raise ValidationError(
            f"{name}: tensor {key!r} byte length does not match dtype {meta['dtype']} x {shape}"
        )


def check_finite(data: bytes, name: str, header: dict[str, dict[str, Any]]) -> None:
    base = 8 + struct.unpack("<Q", data[:8])[0]
    for key, meta in header.items():
        dt = meta["dtype"]
        if not dt.startswith(("F", "B")) or dt == "BOOL":
            continue
        start, end = meta["data_offsets"]
        raw = data[base + start : base + end]
        if dt == "BF16":  # widen bf16 to f32 by placing it in the high half
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, _DTYPES[dt])
        if not np.isfinite(arr).all():
            raise ValidationError(f"{name}: tensor {key!r} holds NaN or Inf values")


def validate_bundle(bundle: Bundle, base: BaseModelEntry, limits: StoreLimits) -> None:
    """Everything a put must check before a single byte is stored. Raises a specific error."""
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
    headers = {}
    for fname, data in bundle.files.items():
        if fname.endswith(".safetensors"):
            headers[fname] = parse_safetensors(data, fname, limits)
            check_finite(data, fname, headers[fname])
    if m.kind in ("lora", "ia3"):
        cfg = parse_peft_config(bundle.files[PEFT_CONFIG_FILE])
        check_peft_weights(m.kind, cfg, headers[PEFT_WEIGHTS_FILE], base, limits, m.labels)
        if HEAD_WEIGHTS_FILE in headers and m.head is not None:
            check_head(headers[HEAD_WEIGHTS_FILE], m.head)
        elif m.task != "feature-extraction":
            check_peft_classifier(headers[PEFT_WEIGHTS_FILE], base, m.labels)
    else:
        check_head(headers[HEAD_WEIGHTS_FILE], m.head)  # type: ignore[arg-type]
    if m.kind in ("partial", "full"):
        check_model_weights(m.kind, headers[MODEL_WEIGHTS_FILE], base, m.first_trained_layer)


def parse_peft_config(data: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValidationError(f"{PEFT_CONFIG_FILE} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValidationError(f"{PEFT_CONFIG_FILE} is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise ValidationError(f"{PEFT_CONFIG_FILE} must be a JSON object")
    check_peft_config_types(cfg)
    return cfg


# Options that change the forward pass in ways the engine does not reproduce: refused at the boundary.
UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora",
    "lora_bias",
    "layer_replication",
    "alora_invocation_tokens",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
)


def check_peft_config_types(cfg: dict[str, Any]) -> None:
    """The fields loraplex reads must have PEFT's types, so later code never trips on a stray int."""
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not _str_list(targets):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'target_modules' must be a string or a list of strings")
    saved = cfg.get("modules_to_save")
    if saved is not None and not _str_list(saved):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'modules_to_save' must be a list of strings")
    ff = cfg.get("feedforward_modules")
    if ff is not None and not isinstance(ff, str) and not _str_list(ff):
        raise ValidationError(
            f"{PEFT_CONFIG_FILE}: 'feedforward_modules' must be a string or a list of strings"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0
            for v in pattern.values()
        ):
            raise ValidationError(f"{PEFT_CONFIG_FILE}: {key!r} must map module patterns to positive numbers")
    for flag in UNSUPPORTED_PEFT_OPTIONS:
        if cfg.get(flag):
            raise UnsupportedAdapter(f"{PEFT_CONFIG_FILE}: {flag} is not supported; train a plain adapter")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l$")


def backbone_name(key: str, model_type: str) -> str:
    """PEFT key -> base tensor name: drop ``base_model.model.`` and the task model's ``bert.`` prefix."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    prefix = f"{model_type}."
    return key[len(prefix) :] if key.startswith(prefix) else key


def _module_targeted(module: str, targets: Any) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or [])


def check_peft_weights(
    kind: str,
    cfg: dict[str, Any],
    header: dict[str, dict[str, Any]],
    base: BaseModelEntry,
    limits: StoreLimits,
    labels: list[str],
) -> None:
    """LoRA/IA3 tensors must match their own config and the base's shapes; extra keys are refused."""
    expected_type = "LORA" if kind == "lora" else "IA3"
    if str(cfg.get("peft_type", "")).upper() != expected_type:
        raise UnsupportedAdapter(
            f"{PEFT_CONFIG_FILE} peft_type is {cfg.get('peft_type')!r}; a {kind!r} bundle needs {expected_type}"
        )
    saved = set(cfg.get("modules_to_save") or [])
    r = cfg.get("r") if kind == "lora" else None
    if kind == "lora":
        _check_lora_config(cfg, limits)
    _check_targets_exist(cfg.get("target_modules"), base)
    seen_modules: dict[str, set[str]] = {}
    for key, meta in header.items():
        if meta["dtype"] not in _FLOAT_DTYPES:
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: tensor {key!r} has dtype {meta['dtype']}; weights must be floats"
            )
        name = backbone_name(key, base.model_type)
        if _is_saved_module(name, saved):
            _check_saved_tensor(key, name, meta, base, labels)
            continue
        m = (_LORA_KEY if kind == "lora" else _IA3_KEY).match(name)
        if not m:
            raise ValidationError(f"{PEFT_WEIGHTS_FILE}: unexpected tensor {key!r} for a {kind} adapter")
        module = m.group("module")
        if not _module_targeted(module, cfg.get("target_modules")):
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: tensor {key!r} is for module {module!r}, which "
                f"target_modules {cfg.get('target_modules')!r} does not name"
            )
        base_shape = base.weight_shapes.get(f"{module}.weight")
        if base_shape is None or len(base_shape) != 2:
            raise IncompatibleBase(
                f"{PEFT_WEIGHTS_FILE}: module {module!r} is not a Linear layer of base {base.name!r}"
            )
        seen_modules.setdefault(module, set()).add(m.groupdict().get("ab") or "l")
        _check_adapter_shape(kind, key, meta["shape"], base_shape, _rank_for(cfg, module, r), m, cfg)
    if not seen_modules:
        raise ValidationError(f"{PEFT_WEIGHTS_FILE} holds no {kind} weights")
    half = sorted(mod for mod, parts in seen_modules.items() if kind == "lora" and parts != {"A", "B"})
    if half:
        raise ValidationError(f"{PEFT_WEIGHTS_FILE}: module {half[0]!r} needs both lora_A and lora_B weights")


_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _check_targets_exist(targets: Any, base: BaseModelEntry) -> None:
    """Every listed target must name a Linear layer of the base (a typo would silently train nothing)."""
    if not isinstance(targets, list):
        return  # a regex string: the per-tensor check below applies
    linears = [
        n.removesuffix(".weight")
        for n, shape in base.weight_shapes.items()
        if n.endswith(".weight") and len(shape) == 2
    ]
    unknown = [t for t in targets if not any(m == t or m.endswith("." + t) for m in linears)]
    if unknown:
        raise IncompatibleBase(
            f"{PEFT_CONFIG_FILE}: target_modules {unknown} is not a Linear layer of base {base.name!r}"
        )


def _check_lora_config(cfg: dict[str, Any], limits: StoreLimits) -> None:
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > limits.max_lora_rank:
        raise ValidationError(f"LoRA rank {max(ranks)} is over the limit of {limits.max_lora_rank}")
    for flag in ("use_dora", "use_rslora_bias"):
        if cfg.get(flag):
            raise UnsupportedAdapter(f"{PEFT_CONFIG_FILE}: {flag}=true is not supported; train a plain LoRA")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapter(
            f"{PEFT_CONFIG_FILE}: bias={cfg.get('bias')!r} is not supported; use bias='none'"
        )
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, int | float) or not np.isfinite(alpha):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'lora_alpha' must be a number, got {alpha!r}")


def _rank_for(cfg: dict[str, Any], module: str, default: int | None) -> int | None:
    for pattern, rank in (cfg.get("rank_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return rank
    return default


def _check_adapter_shape(kind, key, shape, base_shape, r, m, cfg) -> None:
    out_f, in_f = base_shape
    if kind == "lora":
        want = [r, in_f] if m.group("ab") == "A" else [out_f, r]
    else:
        ff = cfg.get("feedforward_modules") or []
        is_ff = _module_targeted(m.group("module"), ff)
        want = [1, in_f] if is_ff else [out_f, 1]
    if list(shape) != want:
        raise ValidationError(f"{PEFT_WEIGHTS_FILE}: tensor {key!r} has shape {list(shape)}, expected {want}")


def _is_saved_module(name: str, saved: set[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in saved)


def _check_saved_tensor(
    key: str, name: str, meta: dict[str, Any], base: BaseModelEntry, labels: list[str]
) -> None:
    """A modules_to_save tensor (the classification head): out dim must match the labels."""
    shape = meta["shape"]
    if name.endswith("weight") and len(shape) == 2:
        if base.hidden_size and shape[1] != base.hidden_size and name.startswith("classifier"):
            raise ValidationError(
                f"{key!r} takes {shape[1]} features but base {base.name!r} has hidden size {base.hidden_size}"
            )
        if labels and name.startswith(("classifier", "score")) and shape[0] != len(labels):
            raise ValidationError(
                f"{key!r} has {shape[0]} outputs but the manifest lists {len(labels)} labels"
            )
    elif name.endswith("bias") and labels and name.startswith(("classifier", "score")):
        if list(shape) != [len(labels)]:
            raise ValidationError(f"{key!r} has shape {list(shape)}; the manifest lists {len(labels)} labels")


def check_peft_classifier(header: dict[str, dict[str, Any]], base: BaseModelEntry, labels: list[str]) -> None:
    """A classification LoRA/IA3 without head.safetensors serves its modules_to_save classifier: it must be there."""
    names = {backbone_name(k, base.model_type): meta for k, meta in header.items()}
    weight = next((v for n, v in names.items() if n in ("classifier.weight", "score.weight")), None)
    if weight is None:
        raise ValidationError(
            f"{PEFT_WEIGHTS_FILE} has no classifier weight; a classification adapter needs one in "
            "modules_to_save (or use task feature-extraction)"
        )
    bias = next((v for n, v in names.items() if n in ("classifier.bias", "score.bias")), None)
    if bias is None:
        raise ValidationError(f"{PEFT_WEIGHTS_FILE} has a classifier weight but no classifier bias")
    if labels and weight["shape"][:1] != [len(labels)]:
        raise ValidationError(
            f"classifier weight has shape {weight['shape']}; the manifest lists {len(labels)} labels"
        )


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
