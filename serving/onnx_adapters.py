"""The adapter graph's inputs (``lora-fp32`` export): LoRA rank chunks and IA3 vectors packed per slot.

One adapter becomes :class:`LoraWeights` (by the one reading of PEFT's rules, the adapter spec);
:func:`stack_loras` packs a few for one call; :class:`LoraSlots` keeps them resident across calls,
one slot per content digest, as serving does. Adapter slot ``i`` holds adapter ``i``'s IA3 vectors
(ones where it has none) and owns ``ceil(rank / CHUNK_RANK)`` chunk slots of the LoRA stacks (none
without LoRA); rows pick their adapter slot by index and :meth:`LoraStack.inputs` lists the (row, chunk)
pairs the graph multiplies. The layout is the graph's (``rank-chunks``), described by
``adapters_store.onnx_artifacts.LoraGraphRecord``.
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
from adapters_store.onnx_artifacts import LORA_DELTA_ADD, LORA_LAYOUT, LoraGraphRecord, OnnxExportManifest
from adapters_store.peft_spec import AdapterSpec

# LoRA ranks are stored in chunks of this rank: a row pays for its adapter's rank rounded up to it,
# not for the largest rank resident. 8 is PEFT's default r; smaller chunks made more, smaller GEMMs.
CHUNK_RANK = 8
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
    def chunk_count(self) -> int:
        """LoRA chunks of :data:`CHUNK_RANK` this adapter needs (0: IA3 only)."""
        return -(-self.rank // CHUNK_RANK) if self.deltas else 0

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
    """Graph inputs for one mixed batch: adapter slot ``i`` owns chunk slots ``chunks[i]`` of the LoRA
    stacks and row ``i`` of the IA3 stacks; slot ``no_adapter_slot`` is the identity (no chunks, IA3
    vectors of ones)."""

    spec: LoraGraphRecord
    arrays: dict[str, np.ndarray]  # a/b/ia3 input names -> [C, in, R] / [C, R, out] / [N + 1, dim]
    chunks: tuple[tuple[int, ...], ...]  # adapter slot -> its chunk slots; len N + 1
    no_adapter_slot: int  # index of the identity slot, for rows without an adapter
    rank: int  # R: the chunk rank; an adapter's rank is zero-padded to a multiple of it (exact)

    @property
    def slots(self) -> int:
        return len(self.chunks)

    def inputs(self, adapter_index: np.ndarray) -> dict[str, np.ndarray]:
        """Every extra graph input for rows using adapter slots ``adapter_index`` ([batch] ints)."""
        idx = np.asarray(adapter_index, dtype=np.int64)
        if idx.ndim != 1 or idx.min(initial=0) < 0 or idx.max(initial=0) >= self.slots:
            raise ValidationError(f"adapter_index must be [batch] ints in 0..{self.slots - 1}")
        owned = [self.chunks[s] for s in idx.tolist()]
        rows = np.repeat(np.arange(len(owned), dtype=np.int64), [len(c) for c in owned])
        chunks = np.fromiter((c for cs in owned for c in cs), dtype=np.int64, count=len(rows))
        spec = self.spec
        index = {spec.index_input: idx} if spec.takes_index else {}
        return {**index, spec.rows_input: rows, spec.chunks_input: chunks, **self.arrays}


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
    for ad in adapters:
        _check_fits(spec, ad)
    counts = [ad.chunk_count for ad in adapters]
    starts = np.cumsum([0, *counts]).tolist()
    chunks = [tuple(range(starts[i], starts[i + 1])) for i in range(len(adapters))] + [()]
    arrays = {**_new_chunks(spec, max(1, starts[-1])), **_new_ia3(spec, len(adapters) + 1)}
    for i, ad in enumerate(adapters):
        _write_chunks(spec, arrays, chunks[i], ad)
        _write_ia3(spec, arrays, i, ad)
    return LoraStack(spec, arrays, tuple(chunks), no_adapter_slot=len(adapters), rank=CHUNK_RANK)


def _new_chunks(spec: LoraGraphRecord, n: int) -> dict[str, np.ndarray]:
    """LoRA stacks of ``n`` zero chunks."""
    arrays = {}
    for layer in range(spec.num_layers):
        for t in spec.targets:
            arrays[lora_input(spec.a_input, layer, t)] = np.zeros(
                (n, spec.in_features[t], CHUNK_RANK), np.float32
            )
            arrays[lora_input(spec.b_input, layer, t)] = np.zeros(
                (n, CHUNK_RANK, spec.out_features[t]), np.float32
            )
    return arrays


def _write_chunks(
    spec: LoraGraphRecord, arrays: dict[str, np.ndarray], chunks: Sequence[int], ad: LoraWeights
) -> None:
    """Adapter ``ad``'s LoRA into chunk slots ``chunks`` (rank columns ``j*R .. (j+1)*R`` in the j-th)."""
    r = CHUNK_RANK
    for layer in range(spec.num_layers):
        for t in spec.targets:
            a = arrays[lora_input(spec.a_input, layer, t)]
            b = arrays[lora_input(spec.b_input, layer, t)]
            at, bt = ad.deltas.get((layer, t), (None, None))
            for j, c in enumerate(chunks):
                a[c], b[c] = 0.0, 0.0
                if at is not None:
                    part_a, part_b = at[:, j * r : (j + 1) * r], bt[j * r : (j + 1) * r]
                    a[c, :, : part_a.shape[1]], b[c, : part_b.shape[0]] = part_a, part_b


def _write_ia3(spec: LoraGraphRecord, arrays: dict[str, np.ndarray], slot: int, ad: LoraWeights) -> None:
    for layer in range(spec.num_layers):
        for t in [*spec.ia3_in, *spec.ia3_out]:
            vec = _ia3_vector(ad, (layer, t))
            arrays[lora_input(spec.ia3_input, layer, t)][slot] = 1.0 if vec is None else vec


class LoraSlots:
    """The adapter graph's inputs kept across calls, one adapter slot per resident LoRA or IA3 adapter
    (as vLLM keeps LoRA slots): a batch only packs the adapters that are not resident yet. Packing 16
    adapters on every call cost 6% of a short batch. Slots are reused least-recently-used first; slot
    ``capacity`` stays the identity for rows without one. Each LoRA takes ``chunk_count`` chunk slots of
    the LoRA stacks, which grow (doubling) when the resident adapters need more; an evicted adapter's
    chunks are reused."""

    def __init__(self, record: OnnxExportManifest, capacity: int = 64):
        if not 1 <= capacity <= 4096:
            raise ValidationError(f"LoRA slot capacity must be 1..4096, got {capacity}")
        self.spec = lora_spec(record)
        self.capacity = capacity
        self.rank = CHUNK_RANK
        self.arrays: dict[str, np.ndarray] = {
            **_new_chunks(self.spec, capacity),
            **_new_ia3(self.spec, capacity + 1),
        }
        self.writes = 0  # adapters packed into a slot so far (the rest of the uses were resident)
        self._slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._chunks: list[tuple[int, ...]] = [()] * (capacity + 1)  # adapter slot -> its chunk slots
        self._free_chunks = list(range(capacity))
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
            stack = LoraStack(self.spec, self.arrays, tuple(self._chunks), self.capacity, CHUNK_RANK)
            return stack, out

    def _free_slot(self, keep: set[str]) -> int:
        if len(self._slots) < self.capacity:
            return len(self._slots)
        victim = next(k for k in self._slots if k not in keep)  # exists: len(keep) <= capacity
        slot = self._slots.pop(victim)
        self._free_chunks += self._chunks[slot]
        self._chunks[slot] = ()
        return slot

    def _write(self, slot: int, weights: LoraWeights) -> None:
        need = weights.chunk_count
        if need > len(self._free_chunks):
            self._grow(need - len(self._free_chunks))
        chunks, self._free_chunks = tuple(self._free_chunks[:need]), self._free_chunks[need:]
        self._chunks[slot] = chunks
        _write_chunks(self.spec, self.arrays, chunks, weights)
        _write_ia3(self.spec, self.arrays, slot, weights)
        self.writes += 1

    def _grow(self, more: int) -> None:
        """At least ``more`` new chunk slots; the stacks at least double, so growth is rare."""
        old = self.arrays[lora_input(self.spec.a_input, 0, self.spec.targets[0])].shape[0]
        n = old + max(more, old)
        for name, fresh in _new_chunks(self.spec, n).items():
            fresh[:old] = self.arrays[name]
            self.arrays[name] = fresh
        self._free_chunks += list(range(old, n))


def lora_input(pattern: str, layer: int, target: str) -> str:
    return pattern.format(layer=layer, target=target.replace(".", "_"))


def lora_spec(record: OnnxExportManifest) -> LoraGraphRecord:
    """The record's LoRA inputs, in the layout this module packs (an older layout is refused)."""
    if record.lora is None:
        raise ValidationError(f"the {record.variant!r} export of {record.base!r} has no LoRA inputs")
    if record.lora.layout != LORA_LAYOUT:
        raise UnsupportedAdapter(
            f"base {record.base!r}: the stored adapter graph has the older {record.lora.layout!r} "
            "input layout; `loraplex onnx export` (or base register) rebuilds it"
        )
    if record.lora.delta_add != LORA_DELTA_ADD:
        raise UnsupportedAdapter(
            f"base {record.base!r}: the stored adapter graph adds LoRA deltas with ScatterND, which "
            "onnxruntime computes wrongly on several threads; `loraplex onnx export` (or base register) "
            "rebuilds it"
        )
    return record.lora
