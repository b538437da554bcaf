"""The adapter graph's inputs (``lora-fp32`` export): LoRA and IA3 weights packed per slot.

One adapter becomes :class:`LoraWeights` (by the one reading of PEFT's rules, the adapter spec);
:func:`stack_loras` packs a few for one call; :class:`LoraSlots` keeps them resident across calls,
one slot per content digest, as serving does. Slot ``i`` holds adapter ``i``'s LoRA deltas (zeros
where it has none) and IA3 vectors (ones where it has none); rows pick their slot by index. The
layout is the graph's, described by ``adapters_store.onnx_artifacts.LoraGraphRecord``.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adapters_store import peft_spec
from adapters_store.errors import UnsupportedAdapter, ValidationError
from adapters_store.onnx_artifacts import LoraGraphRecord, OnnxExportManifest
from adapters_store.peft_spec import AdapterSpec

_PATH = re.compile(r"^(?:.+\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<module>.+)$")


def _f32(t: Any) -> np.ndarray:
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class LoraWeights:
    """One adapter as the graph wants it: per (layer, module) LoRA A^T [in, r] and (scale * B)^T [r, out],
    and IA3 vectors scaling a module's input ([in], PEFT's feed-forward side) or output ([out])."""

    deltas: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    ia3_in: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    ia3_out: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[1] for a, _ in self.deltas.values()), default=1)

    @property
    def nbytes(self) -> int:
        vectors = [*self.ia3_in.values(), *self.ia3_out.values()]
        return sum(a.nbytes + b.nbytes for a, b in self.deltas.values()) + sum(v.nbytes for v in vectors)

    @classmethod
    def from_peft(cls, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> LoraWeights:
        """PEFT ``adapter_config.json`` (parsed) + ``adapter_model.safetensors`` tensors -> LoraWeights, by the
        one reading of PEFT's rules (:func:`adapters_store.peft_spec.resolve`)."""
        shapes = {k: ("F32", list(np.shape(v))) for k, v in tensors.items()}
        return cls.from_spec(peft_spec.resolve(config, shapes, model_type=None), tensors)

    @classmethod
    def from_spec(cls, spec: AdapterSpec, tensors: Mapping[str, Any]) -> LoraWeights:
        """The modules an :class:`AdapterSpec` names (LoRA scaling folded into B, IA3 on the side the
        spec records): the graph's layout."""
        lora, ia3 = {}, {"ia3_in": {}, "ia3_out": {}}
        for path, mod in spec.modules.items():
            if mod.side == "lora":
                a, b = (_f32(tensors[t]) for t in mod.weights)
                lora[path] = (a.T, (b * mod.scaling).T)
            else:
                ia3[mod.side][path] = _f32(tensors[mod.weights[0]]).reshape(-1)
        return cls.from_paths(lora, **ia3)

    @classmethod
    def from_paths(
        cls,
        lora: Mapping[str, tuple[Any, Any]],
        ia3_in: Mapping[str, Any] | None = None,
        ia3_out: Mapping[str, Any] | None = None,
    ) -> LoraWeights:
        """From ``{"encoder.layer.3.attention.self.query": (A^T [in, r], (scale * B)^T [r, out])}`` and
        ``{"encoder.layer.3.output.dense": vector}`` maps: the layout the torch engine already keeps per
        loaded adapter (``LoadedAdapter.lora`` / ``ia3_in`` / ``ia3_out``; torch tensors or numpy)."""
        deltas = {_layer_module(p, "LoRA"): (_f32(at), _f32(bt)) for p, (at, bt) in lora.items()}
        vin = {_layer_module(p, "IA3"): _f32(v).reshape(-1) for p, v in (ia3_in or {}).items()}
        vout = {_layer_module(p, "IA3"): _f32(v).reshape(-1) for p, v in (ia3_out or {}).items()}
        return cls(deltas, vin, vout)

    @classmethod
    def from_bundle(cls, bundle: Any) -> LoraWeights:
        """A ``lora`` bundle from the store: the manifest's spec (schema 2), or the files' (schema 1)."""
        from safetensors.numpy import load

        from adapters_store.bundle import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

        if bundle.manifest.kind not in ("lora", "ia3"):
            raise UnsupportedAdapter(
                f"the ONNX graph serves 'lora' and 'ia3' bundles, not {bundle.manifest.kind!r}"
            )
        tensors = load(bytes(bundle.files[PEFT_WEIGHTS_FILE]))
        if bundle.manifest.peft is not None:
            return cls.from_spec(bundle.manifest.peft, tensors)
        return cls.from_peft(peft_spec.parse_peft_config(bundle.files[PEFT_CONFIG_FILE]), tensors)


def _layer_module(path: str, kind: str) -> tuple[int, str]:
    m = _PATH.match(path)
    if m is None:  # e.g. an adapter on the pooler or the embeddings: never silently dropped
        raise UnsupportedAdapter(f"{kind} on {path!r} is outside the encoder layers the ONNX graph adapts")
    return int(m["layer"]), m["module"]


@dataclass(frozen=True)
class LoraStack:
    """Graph inputs for one mixed batch: slot ``i`` holds adapter ``i``; the last slot is the identity
    (zero LoRA deltas, IA3 vectors of ones)."""

    arrays: dict[str, np.ndarray]  # a/b/ia3 input names -> [N + 1, in, R] / [N + 1, R, out] / [N + 1, dim]
    no_adapter_slot: int  # index of the identity slot, for rows without an adapter
    rank: int  # R: the largest rank in the batch; smaller ranks are zero-padded (exact)


def _check_fits(spec: LoraGraphRecord, ad: LoraWeights) -> None:
    """A module or side the graph lacks is refused (no silent drop), and so is a shape the base lacks."""
    for kind, have, modules in (
        ("LoRA", ad.deltas, spec.targets),
        ("IA3 input-side", ad.ia3_in, spec.ia3_in),
        ("IA3 output-side", ad.ia3_out, spec.ia3_out),
    ):
        extra = sorted({m for (_, m) in have} - set(modules))
        if extra or any(layer >= spec.num_layers for (layer, _) in have):
            raise UnsupportedAdapter(
                f"{kind} modules {extra or 'beyond the last layer'} are not in this base's ONNX adapter "
                f"graph ({kind} modules {modules}); re-export with those targets or use runtime 'torch'"
            )
    for (layer, t), (at, bt) in ad.deltas.items():
        if at.shape[0] != spec.in_features[t] or bt.shape[1] != spec.out_features[t]:
            raise ValidationError(
                f"LoRA layer {layer} {t}: A^T {list(at.shape)} / B^T {list(bt.shape)} do not fit "
                f"[{spec.in_features[t]}, r] / [r, {spec.out_features[t]}] of this base"
            )
    for (layer, t), vec in [*ad.ia3_in.items(), *ad.ia3_out.items()]:
        if vec.shape != (_ia3_dim(spec, t),):
            raise ValidationError(
                f"IA3 layer {layer} {t}: vector of {vec.size} values does not fit this base's {_ia3_dim(spec, t)}"
            )


def _ia3_dim(spec: LoraGraphRecord, module: str) -> int:
    return spec.in_features[module] if module in spec.ia3_in else spec.out_features[module]


def _ia3_vector(ad: LoraWeights, key: tuple[int, str]) -> np.ndarray | None:
    return ad.ia3_in.get(key, ad.ia3_out.get(key))


def _new_ia3(spec: LoraGraphRecord, n: int) -> dict[str, np.ndarray]:
    """IA3 inputs of ``n`` slots, all ones (the identity) until an adapter is written."""
    return {
        lora_input(spec.ia3_input, layer, t): np.ones((n, _ia3_dim(spec, t)), np.float32)
        for layer in range(spec.num_layers)
        for t in [*spec.ia3_in, *spec.ia3_out]
    }


def stack_loras(record: OnnxExportManifest, adapters: Sequence[LoraWeights]) -> LoraStack:
    """Pack adapters for the LoRA graph, slot ``i`` = adapter ``i`` (one-off; serving keeps
    :class:`LoraSlots`)."""
    spec = lora_spec(record)
    targets, layers = spec.targets, spec.num_layers
    for ad in adapters:
        _check_fits(spec, ad)
    rank = max([ad.rank for ad in adapters] + [1])
    n = len(adapters) + 1
    arrays = {}
    for layer in range(layers):
        for t in targets:
            a = np.zeros((n, spec.in_features[t], rank), np.float32)
            b = np.zeros((n, rank, spec.out_features[t]), np.float32)
            for i, ad in enumerate(adapters):
                if (layer, t) in ad.deltas:
                    at, bt = ad.deltas[(layer, t)]
                    a[i, :, : at.shape[1]], b[i, : bt.shape[0]] = at, bt
            arrays[lora_input(spec.a_input, layer, t)] = a
            arrays[lora_input(spec.b_input, layer, t)] = b
    arrays.update(_new_ia3(spec, n))
    for i, ad in enumerate(adapters):
        _write_ia3(spec, arrays, i, ad)
    return LoraStack(arrays, no_adapter_slot=len(adapters), rank=rank)


def _write_ia3(spec: LoraGraphRecord, arrays: dict[str, np.ndarray], slot: int, ad: LoraWeights) -> None:
    for layer in range(spec.num_layers):
        for t in [*spec.ia3_in, *spec.ia3_out]:
            vec = _ia3_vector(ad, (layer, t))
            arrays[lora_input(spec.ia3_input, layer, t)][slot] = 1.0 if vec is None else vec


class LoraSlots:
    """The adapter graph's inputs kept across calls, one slot per resident LoRA or IA3 adapter (as vLLM
    keeps LoRA slots): a batch only packs the adapters that are not resident yet. Packing 16 adapters on
    every call cost 6% of a short batch. Slots are reused least-recently-used first; slot ``capacity``
    stays the identity (zero deltas, unit IA3 vectors) for rows without one. Ranks are zero-padded to
    the largest seen (exact)."""

    def __init__(self, record: OnnxExportManifest, capacity: int = 64):
        if not 1 <= capacity <= 4096:
            raise ValidationError(f"LoRA slot capacity must be 1..4096, got {capacity}")
        self.spec = lora_spec(record)
        self.capacity = capacity
        self.rank = 0
        self.arrays: dict[str, np.ndarray] = _new_ia3(self.spec, capacity + 1)
        self.writes = 0  # adapters packed into a slot so far (the rest of the uses were resident)
        self._slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._lock = threading.Lock()

    def assign(self, keys: Sequence[str], load: Callable[[str], LoraWeights]) -> tuple[LoraStack, list[int]]:
        """Slots for ``keys`` (distinct, e.g. content digests), packing ``load(key)`` for the missing
        ones; returns the stack to feed and each key's slot. The stack is only valid until the next
        call (slots are rewritten in place), so callers run the graph before assigning again."""
        if len(set(keys)) != len(keys):
            raise ValidationError("LoRA slot keys must be distinct")
        if len(keys) > self.capacity:
            raise UnsupportedAdapter(
                f"{len(keys)} LoRA adapters in one batch; the ONNX slots hold {self.capacity}"
            )
        with self._lock:
            wanted = set(keys)
            out = []
            for key in keys:
                slot = self._slots.get(key)
                if slot is None:
                    weights = load(key)
                    _check_fits(self.spec, weights)
                    slot = self._free_slot(wanted)
                    self._write(slot, weights)
                    self._slots[key] = slot
                self._slots.move_to_end(key)
                out.append(slot)
            return LoraStack(self.arrays, no_adapter_slot=self.capacity, rank=self.rank), out

    def _free_slot(self, keep: set[str]) -> int:
        if len(self._slots) < self.capacity:
            return len(self._slots)
        victim = next(k for k in self._slots if k not in keep)  # exists: len(keep) <= capacity
        return self._slots.pop(victim)

    def _write(self, slot: int, weights: LoraWeights) -> None:
        if weights.rank > self.rank:
            self._grow(weights.rank)
        for layer in range(self.spec.num_layers):
            for t in self.spec.targets:
                a = self.arrays[lora_input(self.spec.a_input, layer, t)]
                b = self.arrays[lora_input(self.spec.b_input, layer, t)]
                a[slot], b[slot] = 0.0, 0.0
                if (layer, t) in weights.deltas:
                    at, bt = weights.deltas[(layer, t)]
                    a[slot, :, : at.shape[1]], b[slot, : bt.shape[0]] = at, bt
        _write_ia3(self.spec, self.arrays, slot, weights)
        self.writes += 1

    def _grow(self, rank: int) -> None:
        n, old = self.capacity + 1, self.rank
        for layer in range(self.spec.num_layers):
            for t in self.spec.targets:
                a_name, b_name = (
                    lora_input(self.spec.a_input, layer, t),
                    lora_input(self.spec.b_input, layer, t),
                )
                a = np.zeros((n, self.spec.in_features[t], rank), np.float32)
                b = np.zeros((n, rank, self.spec.out_features[t]), np.float32)
                if old:
                    a[:, :, :old], b[:, :old] = self.arrays[a_name], self.arrays[b_name]
                self.arrays[a_name], self.arrays[b_name] = a, b
        self.rank = rank


def lora_input(pattern: str, layer: int, target: str) -> str:
    return pattern.format(layer=layer, target=target.replace(".", "_"))


def lora_spec(record: OnnxExportManifest) -> LoraGraphRecord:
    if record.lora is None:
        raise ValidationError(f"the {record.variant!r} export of {record.base!r} has no LoRA inputs")
    return record.lora
