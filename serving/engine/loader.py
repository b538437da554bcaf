"""Mechanism: a verified :class:`Bundle` -> :class:`LoadedAdapter`, tensors packed for the layer wrappers.

Everything is checked against the live backbone before an adapter can reach a forward pass: the base
fingerprint, the store's own bundle validation (digests, safetensors headers, finiteness, shapes), and
then every key must name a real module of this backbone with matching shapes. Only safetensors are
read; nothing is unpickled.
"""

from __future__ import annotations

import mmap
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adapters_store.bundle import (
    HEAD_WEIGHTS_FILE,
    MODEL_WEIGHTS_FILE,
    PEFT_WEIGHTS_FILE,
    AdapterManifest,
    Bundle,
)
from adapters_store.errors import IncompatibleBase, UnsupportedAdapter, ValidationError
from adapters_store.peft_spec import FLOAT_DTYPES, AdapterSpec, SavedModule
from adapters_store.preparation import RowPreparation
from adapters_store.validation import StoreLimits, float_views, validate_bundle
from serving.engine.backbone import Backbone, build_full_model
from serving.engine.heads import HeadParams, head_from_classifier, head_from_file
from serving.engine.lora_layers import LoraBlock

_LAYER_KEY = re.compile(r"^encoder\.layers?\.(?P<idx>\d+)\.(?P<rest>.+)$")  # layers: Wav2Vec2
_LIMITS = StoreLimits()
# The views are only read (then copied): the store's bytes are never written through them.
warnings.filterwarnings(
    "ignore", message="The given (buffer|NumPy array) is not writable", category=UserWarning
)


@dataclass
class LoadedAdapter:
    """One tenant adapter ready to serve. ``nbytes`` is what the cache budget charges for it."""

    manifest: AdapterManifest
    pooling: str
    normalize: bool
    head: HeadParams | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # path -> (A^T, B^T*s)
    lora_blocks: tuple[LoraBlock, ...] = ()  # the same weights, modules of one shape side by side
    lora_shape: tuple[tuple[str, int], ...] = ()  # (module, rank) pairs: equal shapes share a bmm pair
    ia3_in: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> [in] input scale
    ia3_out: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> [out] output scale
    blocks: dict[int, nn.Module] = field(default_factory=dict)  # partial: layer index -> own block
    pooler: nn.Module | None = None  # partial: own pooler, when shipped
    full_model: nn.Module | None = None  # full: dedicated model copy
    nbytes: int = 0
    digest: str = ""  # manifest.digest, computed once (it hashes the manifest's JSON)
    preparation: RowPreparation = field(default_factory=RowPreparation)  # how its rows are prepared

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def first_layer(self) -> int:
        return min(self.blocks) if self.blocks else 0


def load_adapter(bundle: Bundle, backbone: Backbone, digest: str | None = None) -> LoadedAdapter:
    """Validate ``bundle`` against ``backbone`` and pack its tensors. Raises a specific LoraplexError.
    ``digest``: the manifest's digest when the caller already has it (the engine resolved by it)."""
    m = bundle.manifest
    if m.base.fingerprint != backbone.entry.fingerprint:
        raise IncompatibleBase(
            f"{m.tenant}/{m.name} v{m.version} was trained on base {m.base.name!r} "
            f"({m.base.fingerprint[:12]}...), but this engine serves {backbone.entry.name!r} "
            f"({backbone.entry.fingerprint[:12]}...)"
        )
    headers: dict[str, dict] = {}  # each safetensors header, parsed and checked once by the validation
    spec = validate_bundle(bundle, backbone.entry, _LIMITS, headers)
    loaded = LoadedAdapter(
        manifest=m,
        pooling=m.pooling,
        normalize=m.normalize,
        digest=digest or m.digest,
        preparation=RowPreparation.of(m),
    )
    if spec is not None:
        _load_peft(bundle, headers, backbone, loaded, spec)
    else:
        loaded.head = head_from_file(
            _tensors(bundle, headers, HEAD_WEIGHTS_FILE), m.head.activation, backbone.feature_dim
        )
    if m.kind == "partial":
        _load_partial(bundle, headers, backbone, loaded)
    elif m.kind == "full":
        state = _strip(_tensors(bundle, headers, MODEL_WEIGHTS_FILE), backbone)
        loaded.full_model = build_full_model(backbone, state)
    if m.task != "feature-extraction" and loaded.head is None:
        raise ValidationError(
            f"{m.tenant}/{m.name}: task {m.task!r} needs a head (modules_to_save classifier)"
        )
    loaded.nbytes = _nbytes(loaded)
    return loaded


def _tensors(bundle: Bundle, headers: dict[str, dict], name: str) -> dict[str, torch.Tensor]:
    """The float tensors of one safetensors file, as float32, in memory of their own. Each is copied
    by torch from a view of the bundle's bytes: that copy releases the GIL, while
    ``safetensors.torch.load`` holds it for ~0.1 s over a full fine-tune's ~90 MB and stalls every
    other thread of the serving process, the warm tenants' batches included. (Serving straight from
    the views is no option: unaligned weights made a forward pass ~4x slower.)"""
    return {
        key: torch.from_numpy(arr).to(torch.float32, copy=True)
        for key, arr in _arrays(bundle, headers, name).items()
    }


def _arrays(bundle: Bundle, headers: dict[str, dict], name: str) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file as read-only numpy views of the bundle's bytes (bf16
    widened into a float32 copy), only to be copied from; refused unless every one is a float. An
    adapter's few dozen small tensors are packed with numpy: a 12 KB copy there took 0.5 us, in torch
    3.4 us (10.7 transposing), and a slice-and-view 0.7 vs 5.5 us; the LoRA cold load is mostly such
    calls."""
    header = headers[name]  # bounds-checked by validate_bundle: every span lies inside the file
    for key, meta in header.items():
        if meta["dtype"] not in FLOAT_DTYPES:
            raise ValidationError(
                f"{name}: tensor {key!r} has dtype {meta['dtype']}; weights must be floating point"
            )
    return float_views(bundle.files[name], header)


def _strip(tensors: dict[str, torch.Tensor], backbone: Backbone) -> dict[str, torch.Tensor]:
    p = backbone.prefix
    return {(k[len(p) :] if k.startswith(p) else k): t for k, t in tensors.items()}


def _load_peft(
    bundle: Bundle, headers: dict[str, dict], backbone: Backbone, loaded: LoadedAdapter, spec: AdapterSpec
) -> None:
    """Pack the tensors the spec names (adapters_store.peft_spec applied PEFT's rules once, at validation).
    Every weight is copied once, from its view of the bundle's bytes to where the forward reads it."""
    arrays = _arrays(bundle, headers, PEFT_WEIGHTS_FILE)
    lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for path, mod in spec.modules.items():
        if path not in backbone.linears:
            raise UnsupportedAdapter(f"{mod.key!r} is not a Linear layer of this backbone")
        if mod.side == "lora":
            a, b = (arrays[t] for t in mod.weights)
            lora[path] = (a, b, mod.scaling)
        else:
            target = loaded.ia3_in if mod.side == "ia3_in" else loaded.ia3_out
            target[path] = _own(arrays[mod.weights[0]]).flatten()
    loaded.lora, loaded.lora_blocks = _one_buffer(lora)
    loaded.lora_shape = tuple(sorted((path, a.shape[0]) for path, (a, _, _) in lora.items()))
    if HEAD_WEIGHTS_FILE in bundle.files:
        head = loaded.manifest.head
        activation = head.activation if head else "relu"
        loaded.head = head_from_file(
            _tensors(bundle, headers, HEAD_WEIGHTS_FILE), activation, backbone.feature_dim
        )
    elif spec.head is not None:
        loaded.head = head_from_classifier(_saved(arrays, spec.head), backbone.feature_dim)
    if spec.pooler is not None:  # a modules_to_save pooler: BERT's dense + tanh on the first token
        dense = nn.Linear(backbone.feature_dim, backbone.feature_dim)
        _load_strict(dense, _saved(arrays, spec.pooler), "pooler.dense")
        loaded.pooler = nn.Sequential(dense, nn.Tanh()).eval()


def _saved(arrays: dict[str, np.ndarray], module: SavedModule) -> dict[str, torch.Tensor]:
    """A modules_to_save module's weight and bias, copied out of the bundle's bytes."""
    out = {"weight": _own(arrays[module.weight])}
    if module.bias is not None:
        out["bias"] = _own(arrays[module.bias])
    return out


def _own(arr: np.ndarray) -> torch.Tensor:
    """A float32 torch copy of a view of the bundle's bytes."""
    return torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))


def _one_buffer(
    pairs: dict[str, tuple[np.ndarray, np.ndarray, float]],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[LoraBlock, ...]]:
    """Copy every LoRA (A [r, in], B [out, r], scaling) into ONE allocation as float32 and return views
    (A^T, B^T * scaling) into it, per module and per block of modules of one shape. One block per
    adapter is freed whole on eviction, instead of dozens of small ones fragmenting the heap. Scaling is
    folded into B here, once, so a forward pass does two matmuls and nothing else; each weight is
    copied once, from the bundle's bytes to here.

    Modules of one shape (in, out, rank) lie side by side, A's [n, r, in] then B's [n, r, out]: a run
    of tenants stacks each side of a block with one copy (lora_layers.runs_of).

    A^T [in, r] is the transposed view of a row-major A [r, in]: a matmul against it (a GEMM whose N
    is the rank) ran 1.7x faster than against a row-major [in, r] (x [640, 384] @ A^T, r 8, 2 threads:
    192 vs 316 us; issue 18). B^T [r, out] is row-major."""
    total = sum(a.size + b.size for a, b, _ in pairs.values())
    buf = _own_mapping(total)
    groups: dict[tuple[int, int, int], list[str]] = {}
    for module in sorted(pairs):
        a, b, _ = pairs[module]
        groups.setdefault((a.shape[1], b.shape[0], a.shape[0]), []).append(module)
    out, blocks, offset = {}, [], 0
    flat = buf.numpy()
    for (in_f, out_f, r), modules in sorted(groups.items()):
        n = len(modules)
        a_blk = flat[offset : offset + n * r * in_f].reshape(n, r, in_f)
        offset += n * r * in_f
        b_blk = flat[offset : offset + n * r * out_f].reshape(n, r, out_f)
        offset += n * r * out_f
        for m, module in enumerate(modules):  # numpy views: a torch slice cost ~3x a from_numpy here
            a, b, scaling = pairs[module]
            a_own, b_t = a_blk[m], b_blk[m]
            a_own[...] = a
            b_t[...] = b.T
            if scaling != 1:
                b_t *= np.float32(scaling)  # float32 arithmetic, as torch's b * scaling did
            out[module] = (torch.from_numpy(a_own).t(), torch.from_numpy(b_t))
        blocks.append(LoraBlock(tuple(modules), torch.from_numpy(a_blk), torch.from_numpy(b_blk)))
    return {module: out[module] for module in pairs}, tuple(blocks)


def _own_mapping(numel: int) -> torch.Tensor:
    """float32 storage of its own anonymous mapping (freed whole with the last view of it).

    Resident adapters stay out of the malloc heap, so evicting one leaves no hole between long-lived
    tensors and its pages go back to the OS, while the heap keeps freed activations for the next pass
    (engine.keep_activation_memory)."""
    if numel == 0:
        return torch.empty(0)
    try:
        return torch.frombuffer(mmap.mmap(-1, numel * 4), dtype=torch.float32)
    except OSError:  # e.g. vm.max_map_count reached (~65k mappings): the heap still serves
        return torch.empty(numel)


def _load_partial(
    bundle: Bundle, headers: dict[str, dict], backbone: Backbone, loaded: LoadedAdapter
) -> None:
    if backbone.layer_factory is None:
        raise UnsupportedAdapter(
            f"base {backbone.entry.name!r} has no encoder blocks to serve a partial fine-tune"
        )
    first = loaded.manifest.first_trained_layer or 0
    if not 0 <= first < backbone.num_layers:
        raise ValidationError(
            f"first_trained_layer={first} is outside the base's {backbone.num_layers} layers"
        )
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    pooler: dict[str, torch.Tensor] = {}
    for key, t in _strip(_tensors(bundle, headers, MODEL_WEIGHTS_FILE), backbone).items():
        # Bundles hold checkpoint names; blocks are built under their in-memory names (ViT differs).
        if key.startswith("pooler.dense."):
            pooler[key.removeprefix("pooler.dense.")] = t
        elif (m := _LAYER_KEY.match(key)) and int(m["idx"]) >= first:
            block_prefix = f"{backbone.layer_prefix}{m['idx']}."
            name = backbone.to_memory(key)
            if not name.startswith(block_prefix):
                raise ValidationError(f"{MODEL_WEIGHTS_FILE}: {key!r} does not belong to block {m['idx']}")
            per_layer.setdefault(int(m["idx"]), {})[name.removeprefix(block_prefix)] = t
        else:
            raise ValidationError(f"{MODEL_WEIGHTS_FILE}: {key!r} is not a block at or above layer {first}")
    for idx in range(first, backbone.num_layers):
        loaded.blocks[idx] = _block(backbone, idx, per_layer.get(idx, {}))
    if pooler:
        dense = nn.Linear(backbone.feature_dim, backbone.feature_dim)
        _load_strict(dense, pooler, "pooler.dense")
        loaded.pooler = nn.Sequential(dense, nn.Tanh()).eval()


def _block(backbone: Backbone, idx: int, state: dict[str, torch.Tensor]) -> nn.Module:
    block = backbone.layer_factory(idx)  # type: ignore[misc]
    _load_strict(block, state, f"encoder.layer.{idx}")
    return block


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    want = module.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValidationError(
            f"{MODEL_WEIGHTS_FILE}: {where} is incomplete or has extras: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for k, t in state.items():
        if t.shape != want[k].shape:
            raise ValidationError(f"{MODEL_WEIGHTS_FILE}: {where}.{k} has shape {list(t.shape)}")
    module.load_state_dict(state, strict=True)
    module.requires_grad_(False)


def _nbytes(loaded: LoadedAdapter) -> int:
    tensors: list[torch.Tensor] = [t for pair in loaded.lora.values() for t in pair]
    tensors += list(loaded.ia3_in.values()) + list(loaded.ia3_out.values())
    for mod in (*loaded.blocks.values(), loaded.pooler, loaded.full_model):
        if mod is not None:
            tensors += list(mod.parameters())
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total + (loaded.head.nbytes if loaded.head else 0)
