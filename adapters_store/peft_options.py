"""Every ``LoraConfig`` / ``IA3Config`` option: served exactly, or refused at push with a message.

:data:`PEFT_OPTIONS` is the one table (docs/peft_options.md renders it; a test checks that it names every
field of PEFT's config classes). :func:`parse_peft_config` reads ``adapter_config.json`` once and applies
it; an option PEFT adds later is refused when set, never silently ignored.
"""

from __future__ import annotations

import json
import math
import re
import re._constants as _re_const  # the parse tree of re itself: no second regex engine
import re._parser as _re_parser
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters_store.errors import UnsupportedAdapter, ValidationError

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftOption:
    """One ``LoraConfig`` / ``IA3Config`` field: how loraplex serves it, or which values it refuses."""

    name: str
    served: str
    refuse: Callable[[Any], bool] | None = None  # values refused at push (None: every value is served)
    message: str = ""


def _truthy(v: Any) -> bool:
    return bool(v)


_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _base_changing_init(v: Any) -> bool:
    return isinstance(v, str) and (v.startswith(_BASE_CHANGING_INITS) or v == "mica")


_META = "metadata; does not change the forward pass"
PEFT_OPTIONS: dict[str, tuple[PeftOption, ...]] = {
    "common": (
        PeftOption(
            "peft_type",
            "LORA -> kind lora, IA3 -> kind ia3",
            lambda v: str(v).upper() not in ("LORA", "IA3"),
            "peft_type {value!r} is not supported; use LoRA or IA3",
        ),
        PeftOption(
            "task_type",
            "picks the default task: SEQ_CLS -> text-classification, FEATURE_EXTRACTION or "
            "null -> feature-extraction; any other value needs an explicit task at push",
        ),
        PeftOption(
            "target_modules",
            "names (dotted suffix), fully-qualified paths, a regex (fullmatch) or 'all-linear'; "
            "every module in the weights must be targeted and be a Linear of the base",
        ),
        PeftOption("exclude_modules", "names or a regex, as PEFT matches them"),
        PeftOption(
            "modules_to_save",
            "classifier / score (the head) and pooler (BERT's pooler) are served",
            None,
            "modules_to_save {value!r} is not served: only a classifier (classifier / score) and "
            "the pooler can be saved modules; adapt other layers with LoRA or use kind 'partial'",
        ),
        PeftOption("fan_in_fan_out", "ignored for nn.Linear targets, as PEFT does (it resets it to False)"),
        PeftOption("inference_mode", _META),
        PeftOption("base_model_name_or_path", _META),
        PeftOption("revision", _META),
        PeftOption("auto_mapping", _META),
        PeftOption("peft_version", _META),
    ),
    "LORA": (
        PeftOption("layers_to_transform", "PEFT's layer-index rule"),
        PeftOption("layers_pattern", "PEFT's layer-index rule"),
        PeftOption("r", "served (ranks are read from the tensors and checked against r / rank_pattern)"),
        PeftOption("lora_alpha", "served: scaling alpha / r"),
        PeftOption("use_rslora", "served: scaling alpha / sqrt(r)"),
        PeftOption(
            "rank_pattern", "served; keys matched as PEFT does: re.match(rf'(.*\\.)?({key})$', module)"
        ),
        PeftOption("alpha_pattern", "served; keys matched as PEFT does"),
        PeftOption("lora_dropout", "served (dropout is off at inference)"),
        PeftOption(
            "bias",
            "'none' served",
            lambda v: v not in (None, "none"),
            "bias={value!r} is not supported (it changes the base's biases); train with bias='none'",
        ),
        PeftOption(
            "init_lora_weights",
            "True, False, 'gaussian', 'eva', 'orthogonal' served (initialisation only)",
            _base_changing_init,
            "init_lora_weights={value!r} changes the base weights or the layer; save it converted to a plain "
            "LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))",
        ),
        PeftOption("eva_config", "served (initialisation only)"),
        PeftOption("ensure_weight_tying", "served (ties only apply to saved embeddings, which are refused)"),
        PeftOption("megatron_core", "served when megatron_config is null (module name only)"),
        PeftOption(
            "megatron_config", "refused", _truthy, "megatron_config is not supported; save a plain LoRA"
        ),
        PeftOption(
            "loftq_config", "refused", _truthy, "loftq_config is not supported: LoftQ quantizes the base"
        ),
        PeftOption(
            "corda_config",
            "refused",
            _truthy,
            "corda_config is not supported: CorDA changes the base weights",
        ),
        PeftOption(
            "lora_ga_config",
            "refused",
            _truthy,
            "lora_ga_config is not supported: LoRA-GA changes the base weights",
        ),
        PeftOption("use_dora", "refused", _truthy, "use_dora is not supported; train a plain adapter"),
        PeftOption("lora_bias", "refused", _truthy, "lora_bias is not supported; train a plain adapter"),
        PeftOption(
            "layer_replication",
            "refused",
            _truthy,
            "layer_replication is not supported; train a plain adapter",
        ),
        PeftOption(
            "alora_invocation_tokens",
            "refused",
            _truthy,
            "alora_invocation_tokens is not supported; train a plain adapter",
        ),
        PeftOption(
            "target_parameters",
            "refused",
            _truthy,
            "target_parameters is not supported; train a plain adapter",
        ),
        PeftOption(
            "trainable_token_indices",
            "refused",
            _truthy,
            "trainable_token_indices is not supported; train a plain adapter",
        ),
        PeftOption("use_bdlora", "refused", _truthy, "use_bdlora is not supported; train a plain adapter"),
        PeftOption("use_qalora", "refused", _truthy, "use_qalora is not supported; train a plain adapter"),
        PeftOption("qalora_group_size", "served when use_qalora is off (unused then)"),
        PeftOption(
            "velora_config", "refused", _truthy, "velora_config is not supported; train a plain adapter"
        ),
        PeftOption(
            "monteclora_config",
            "refused",
            _truthy,
            "monteclora_config is not supported; train a plain adapter",
        ),
        PeftOption(
            "arrow_config", "refused", _truthy, "arrow_config is not supported; train a plain adapter"
        ),
        PeftOption("kasa_config", "refused", _truthy, "kasa_config is not supported; train a plain adapter"),
        PeftOption("runtime_config", "not saved by PEFT; ignored"),
    ),
    "IA3": (
        PeftOption(
            "feedforward_modules",
            "served: these scale the layer's input, the others its output "
            "(PEFT's rule: a name is a suffix of the module path, a string a regex fullmatch)",
        ),
        PeftOption("init_ia3_weights", "served (initialisation only)"),
    ),
}


def options_for(peft_type: str) -> dict[str, PeftOption]:
    return {o.name: o for o in (*PEFT_OPTIONS["common"], *PEFT_OPTIONS.get(peft_type, ()))}


def options_markdown() -> str:
    """The docs table (docs/peft_options.md holds exactly this; a test keeps them equal)."""
    lines = ["| config | option | served | refused |", "|---|---|---|---|"]
    for group, opts in PEFT_OPTIONS.items():
        for o in opts:
            refused = o.message.replace("{value!r}", "<value>") if o.refuse or o.message else ""
            served = "" if o.served == "refused" else o.served
            lines.append(f"| {group} | `{o.name}` | {served} | {refused} |".replace("  ", " "))
    return "\n".join(lines) + "\n"


# -- parsing ---------------------------------------------------------------------------------------
def parse_peft_config(data: bytes) -> dict[str, Any]:
    """``adapter_config.json`` bytes -> dict, with the fields loraplex reads type-checked."""
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValidationError(f"{PEFT_CONFIG_FILE} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValidationError(f"{PEFT_CONFIG_FILE} is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise ValidationError(f"{PEFT_CONFIG_FILE} must be a JSON object")
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> str:
    """Types of the fields loraplex reads (regexes compile as PEFT uses them), then :func:`check_options`."""
    _check_types(cfg)
    return check_options(cfg)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_types(cfg: dict[str, Any]) -> None:
    for key in ("target_modules", "exclude_modules", "feedforward_modules", "layers_pattern"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str) and not _str_list(v):
            raise ValidationError(f"{PEFT_CONFIG_FILE}: {key!r} must be a string or a list of strings")
    if cfg.get("modules_to_save") is not None and not _str_list(cfg["modules_to_save"]):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'modules_to_save' must be a list of strings")
    for m in cfg.get("modules_to_save") or []:
        _regex(m, "modules_to_save", rf"(^|.*\.){m}($|\..*)")
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        if isinstance(cfg.get(key), str):
            _regex(cfg[key], key)
    patterns = cfg.get("layers_pattern")
    for p in [patterns] if isinstance(patterns, str) else patterns or []:
        _regex(p, "layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        _int(layers) or (isinstance(layers, list) and all(_int(x) for x in layers))
    ):
        raise ValidationError(f"{PEFT_CONFIG_FILE}: 'layers_to_transform' must be an int or a list of ints")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(_positive(v) for v in pattern.values()):
            raise ValidationError(f"{PEFT_CONFIG_FILE}: {key!r} must map module patterns to positive numbers")
        for k in pattern:
            _regex(k, key, rf"(.*\.)?({k})$")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


MAX_PATTERN_CHARS = 512


def _regex(pattern: str, where: str, used_as: str | None = None) -> None:
    """The pattern must compile in the form PEFT's matching builds around it (checked before any use)
    and must not be able to backtrack catastrophically: ``re`` has no timeout, and these patterns run
    against every module path of the base at push and at load."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValidationError(
            f"{PEFT_CONFIG_FILE}: {where} pattern is {len(pattern)} characters; at most {MAX_PATTERN_CHARS}"
        )
    try:
        re.compile(used_as or pattern)
        tree = _re_parser.parse(pattern)
    except re.error as e:
        raise ValidationError(f"{PEFT_CONFIG_FILE}: {where} {pattern!r} is not a valid regex ({e})") from None
    if _nested_repeat(tree, inside=False):
        raise ValidationError(
            f"{PEFT_CONFIG_FILE}: {where} {pattern!r} is refused: a repeated group that itself repeats or "
            "alternates (e.g. '(a+)+', '(a|ab)*') can backtrack exponentially; write it without a repeat "
            "or alternation inside a repeat"
        )


def _nested_repeat(tree: Any, inside: bool) -> bool:
    """True when an unbounded repeat contains a variable-length repeat or an alternation (star height
    above one), the shape behind catastrophic backtracking. Possessive repeats never backtrack."""
    for op, av in tree:
        if op in (_re_const.MAX_REPEAT, _re_const.MIN_REPEAT):
            unbounded = av[1] == _re_const.MAXREPEAT
            if (inside and av[0] != av[1]) or _nested_repeat(av[2], inside or unbounded):
                return True
        elif op is _re_const.BRANCH:
            if inside or any(_nested_repeat(branch, inside) for branch in av[1]):
                return True
        elif op is _re_const.SUBPATTERN:
            if _nested_repeat(av[3], inside):
                return True
        elif op in (_re_const.ASSERT, _re_const.ASSERT_NOT):
            if _nested_repeat(av[1], inside):
                return True
        elif op is _re_const.GROUPREF_EXISTS:
            if any(b is not None and _nested_repeat(b, inside) for b in av[1:]):
                return True
        elif op is _re_const.ATOMIC_GROUP and _nested_repeat(av, inside):
            return True
    return False


def check_options(cfg: Mapping[str, Any]) -> str:
    """Refuse every option value loraplex does not serve exactly; returns the PEFT type (LORA / IA3)."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    table = options_for(peft_type)
    kind = table["peft_type"]
    if kind.refuse(cfg.get("peft_type")):  # first: another type's options are all unknown here
        raise UnsupportedAdapter(f"{PEFT_CONFIG_FILE}: " + kind.message.format(value=cfg.get("peft_type")))
    for name, value in cfg.items():
        opt = table.get(name)
        if opt is None:
            if value not in (None, False, [], {}, "", 0):
                raise UnsupportedAdapter(
                    f"{PEFT_CONFIG_FILE}: option {name}={value!r} is not one loraplex knows; it is refused "
                    "rather than ignored"
                )
            continue
        if opt.refuse is not None and opt.refuse(value):
            raise UnsupportedAdapter(f"{PEFT_CONFIG_FILE}: " + opt.message.format(value=value))
    return peft_type
