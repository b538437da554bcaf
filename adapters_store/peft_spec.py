"""The ONE reading of a PEFT adapter: ``adapter_config.json`` + the safetensors header -> :class:`AdapterSpec`.

PEFT's own rules, applied once, here only:

* which modules an adapter touches: ``target_modules`` (names matched as a dotted suffix, a regex
  ``fullmatch``, the ``all-linear`` shorthand, fully-qualified paths), ``exclude_modules``,
  ``layers_to_transform`` / ``layers_pattern``; the weights file names the modules, the config must agree;
* per module: LoRA rank (from the tensors) and scaling (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA;
  ``rank_pattern`` / ``alpha_pattern`` keys matched as PEFT does, ``re.match(rf"(.*\\.)?({key})$", module)``);
  IA3 side (``feedforward_modules`` scale the input, the others the output);
* ``modules_to_save``: a classifier (``classifier`` / ``score``) and BERT's pooler are served; anything
  else is refused;
* every ``LoraConfig`` / ``IA3Config`` option is either served exactly or refused
  (:mod:`adapters_store.peft_options`, rendered in docs/peft_options.md).

The spec is computed at put, stored in the manifest (schema 2) and read by the store's validation, the
engine's loader, the ONNX slot packer and training. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.errors import IncompatibleBase, UnsupportedAdapter, ValidationError
from adapters_store.peft_options import (
    PEFT_CONFIG_FILE,
    PEFT_OPTIONS,
    PEFT_WEIGHTS_FILE,
    check_config,
    parse_peft_config,
)

__all__ = ["AdapterSpec", "ModuleSpec", "SavedModule", "build", "parse_peft_config", "resolve"]

if TYPE_CHECKING:  # base_models imports bundle, which imports this module
    from adapters_store.base_models import BaseModelEntry

PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
HEAD_MODULES = ("classifier", "score")
POOLER_MODULE = "pooler.dense"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l$")
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors dtypes a weight may have
MAX_LORA_RANK = 256


class _SpecModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModuleSpec(_SpecModel):
    """How one Linear of the base is adapted."""

    key: str = Field(
        description="the module's path as PEFT named it (e.g. 'bert.encoder.layer.0.attention.self.query')"
    )
    side: Literal["lora", "ia3_in", "ia3_out"]
    rank: int = Field(default=0, ge=0, description="LoRA rank (0 for IA3)")
    scaling: float = Field(default=1.0, description="LoRA: alpha / r, or alpha / sqrt(r) with rsLoRA")
    weights: tuple[str, ...] = Field(description="tensor names: (lora_A, lora_B) or (ia3_l,)")


class SavedModule(_SpecModel):
    """A ``modules_to_save`` module the engine serves: its weight and bias tensor names."""

    weight: str
    bias: str | None = None
    out_features: int


class AdapterSpec(_SpecModel):
    """Everything the engine, the ONNX packer and the store need from a PEFT adapter, computed once."""

    peft_type: Literal["LORA", "IA3"]
    modules: dict[str, ModuleSpec] = Field(
        description="base module path (e.g. 'encoder.layer.0.attention.self.query') -> how it is adapted"
    )
    head: SavedModule | None = Field(
        default=None, description="a modules_to_save classifier (classifier / score)"
    )
    pooler: SavedModule | None = Field(
        default=None, description="a modules_to_save pooler (pooler.dense, then tanh)"
    )

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


# -- PEFT's matching rules -------------------------------------------------------------------------
def pattern_value(patterns: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the module path or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def is_saved(key: str, modules_to_save: list[str] | None) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save or [])


def is_targeted(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` on the module path PEFT saw (``key``)."""
    excluded = cfg.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return False
        elif key in excluded or any(key.endswith(f".{e}") for e in excluded):
            return False
    if is_saved(key, cfg.get("modules_to_save")):
        return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets.lower() == ALL_LINEAR or re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _in_layers(cfg, key)


def _in_layers(cfg: Mapping[str, Any], key: str) -> bool:
    indexes = cfg.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = cfg.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def is_feedforward(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's IA3 rule: a string is a regex fullmatch; a list entry a plain suffix (no dot needed)."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


# -- the spec --------------------------------------------------------------------------------------
def module_key(tensor: str) -> str:
    """A saved tensor name -> the path PEFT saw (``base_model.model.`` dropped)."""
    return tensor[len(PEFT_PREFIX) :] if tensor.startswith(PEFT_PREFIX) else tensor


def base_path(key: str, model_type: str | None) -> str:
    """PEFT's module path -> the base's (the task model's ``bert.`` prefix dropped)."""
    prefix = f"{model_type}." if model_type else ""
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def resolve(
    cfg: Mapping[str, Any],
    shapes: Mapping[str, tuple[str, list[int]]],
    model_type: str | None,
    max_rank: int = MAX_LORA_RANK,
) -> AdapterSpec:
    """Config + {tensor: (dtype, shape)} -> spec, by PEFT's rules alone (the base is checked by :func:`build`)."""
    peft_type = check_config(dict(cfg))
    if peft_type == "LORA":
        _check_lora_numbers(cfg, max_rank)
    saved_keys = cfg.get("modules_to_save")
    lora: dict[str, dict[str, str]] = {}
    modules: dict[str, ModuleSpec] = {}
    saved: dict[str, dict[str, str]] = {}
    for tensor, (dtype, _shape) in shapes.items():
        if dtype not in FLOAT_DTYPES:
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: tensor {tensor!r} has dtype {dtype}; weights must be floats"
            )
        key = module_key(tensor)
        if is_saved(key, saved_keys):
            module, _, leaf = base_path(key, model_type).rpartition(".")
            saved.setdefault(module, {})[leaf] = tensor
            continue
        m = (_LORA_KEY if peft_type == "LORA" else _IA3_KEY).match(key)
        if not m:
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: unexpected tensor {tensor!r} for a {peft_type} adapter"
            )
        mkey = m["module"]
        if not is_targeted(cfg, mkey):
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: tensor {tensor!r} is for module {mkey!r}, which target_modules "
                f"{cfg.get('target_modules')!r} does not name (PEFT's rules)"
            )
        path = base_path(mkey, model_type)
        if peft_type == "LORA":
            lora.setdefault(path, {"key": mkey})[m["ab"]] = tensor
        else:
            side = "ia3_in" if is_feedforward(cfg, mkey) else "ia3_out"
            modules[path] = ModuleSpec(key=mkey, side=side, weights=(tensor,))
    for path, parts in sorted(lora.items()):
        if not {"A", "B"} <= set(parts):
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: module {path!r} needs both lora_A and lora_B weights"
            )
        modules[path] = _lora_module(cfg, parts, shapes, max_rank)
    if not modules:
        raise ValidationError(f"{PEFT_WEIGHTS_FILE} holds no {peft_type.lower()} weights")
    head, pooler = _saved_modules(saved, shapes)
    return AdapterSpec(peft_type=peft_type, modules=modules, head=head, pooler=pooler)


def _check_lora_numbers(cfg: Mapping[str, Any], max_rank: int) -> None:
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise ValidationError(f"LoRA rank {max(ranks)} is over the limit of {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'lora_alpha' must be a number, got {alpha!r}")


def _lora_module(
    cfg: Mapping[str, Any], parts: dict[str, str], shapes: Mapping[str, tuple[str, list[int]]], max_rank: int
) -> ModuleSpec:
    key = parts["key"]
    a, b = shapes[parts["A"]][1], shapes[parts["B"]][1]
    r = int(pattern_value(cfg.get("rank_pattern"), key, cfg.get("r")))
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
        raise ValidationError(
            f"{PEFT_WEIGHTS_FILE}: {key} lora_A {a} / lora_B {b} do not have rank {r} "
            "(r / rank_pattern in the config, shape mismatch)"
        )
    if r > max_rank:
        raise ValidationError(f"LoRA rank {r} is over the limit of {max_rank}")
    alpha = float(pattern_value(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8)))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return ModuleSpec(key=key, side="lora", rank=r, scaling=scaling, weights=(parts["A"], parts["B"]))


def _saved_modules(
    saved: dict[str, dict[str, str]], shapes: Mapping[str, tuple[str, list[int]]]
) -> tuple[SavedModule | None, SavedModule | None]:
    head = pooler = None
    for module, tensors in saved.items():
        if set(tensors) - {"weight", "bias"} or "weight" not in tensors:
            raise UnsupportedAdapter(_SAVED_REFUSAL.format(value=module))
        w = shapes[tensors["weight"]][1]
        if len(w) != 2:
            raise UnsupportedAdapter(_SAVED_REFUSAL.format(value=module))
        entry = SavedModule(weight=tensors["weight"], bias=tensors.get("bias"), out_features=w[0])
        if module in HEAD_MODULES and head is None:
            head = entry
        elif module == POOLER_MODULE:
            pooler = entry
        else:
            raise UnsupportedAdapter(_SAVED_REFUSAL.format(value=module))
    return head, pooler


_SAVED_REFUSAL = next(o.message for o in PEFT_OPTIONS["common"] if o.name == "modules_to_save")


def build(
    cfg: Mapping[str, Any],
    header: Mapping[str, Mapping[str, Any]],
    base: BaseModelEntry,
    labels: list[str] | None = None,
    max_rank: int = MAX_LORA_RANK,
) -> AdapterSpec:
    """:func:`resolve`, then every module checked against the base: a Linear with matching shapes."""
    shapes = {k: (m["dtype"], list(m["shape"])) for k, m in header.items()}
    _check_listed_targets(cfg, base)
    spec = resolve(cfg, shapes, base.model_type, max_rank)
    weights = base.weight_shapes
    for path, mod in spec.modules.items():
        w = weights.get(f"{path}.weight")
        if w is None or len(w) != 2 or path.rsplit(".", 1)[-1].endswith("embeddings"):
            raise IncompatibleBase(
                f"{PEFT_WEIGHTS_FILE}: module {path!r} is not a Linear layer of base {base.name!r}"
            )
        out_f, in_f = w
        got = [shapes[t][1] for t in mod.weights]
        if mod.side == "lora":
            want = [[mod.rank, in_f], [out_f, mod.rank]]
        else:
            want = [[1, in_f]] if mod.side == "ia3_in" else [[out_f, 1]]
        if got != want:
            raise ValidationError(f"{PEFT_WEIGHTS_FILE}: {mod.weights} have shapes {got}, expected {want}")
    _check_saved_against_base(spec, base, shapes, labels)
    return spec


def _check_saved_against_base(
    spec: AdapterSpec, base: BaseModelEntry, shapes, labels: list[str] | None
) -> None:
    hidden = base.hidden_size
    if spec.head is not None:
        w = shapes[spec.head.weight][1]
        if hidden and w[1] != hidden:
            raise ValidationError(
                f"{spec.head.weight!r} takes {w[1]} features but base {base.name!r} has hidden size {hidden}"
            )
        if labels and w[0] != len(labels):
            raise ValidationError(
                f"{spec.head.weight!r} has {w[0]} outputs but the manifest lists {len(labels)} labels"
            )
        if spec.head.bias is None:
            raise ValidationError(f"{PEFT_WEIGHTS_FILE} has a classifier weight but no classifier bias")
    for saved in (spec.head, spec.pooler):
        if saved is not None and saved.bias is not None and shapes[saved.bias][1] != [saved.out_features]:
            raise ValidationError(
                f"{PEFT_WEIGHTS_FILE}: {saved.bias!r} has shape {shapes[saved.bias][1]}, expected {[saved.out_features]}"
            )
    if spec.pooler is not None:
        want = base.weight_shapes.get(f"{POOLER_MODULE}.weight")
        if want is None or shapes[spec.pooler.weight][1] != list(want) or spec.pooler.bias is None:
            raise UnsupportedAdapter(
                _SAVED_REFUSAL.format(value="pooler") + f" (base {base.name!r} has no such pooler)"
            )


def _check_listed_targets(cfg: Mapping[str, Any], base: BaseModelEntry) -> None:
    """Every listed target must name a Linear of the base (a typo would silently train nothing)."""
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        return
    prefix = f"{base.model_type}."
    linears = [
        n.removesuffix(".weight")
        for n, s in base.weight_shapes.items()
        if n.endswith(".weight") and len(s) == 2
    ]
    names = set(linears) | {prefix + n for n in linears}
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise IncompatibleBase(
            f"{PEFT_CONFIG_FILE}: target_modules {unknown} is not a Linear layer of base {base.name!r}"
        )
