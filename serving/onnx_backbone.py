"""The ONNX Runtime side of the backbone: load a validated export from the store and run it.

Only graphs that ``loraplex onnx export`` stored under the base are loaded: the file names are fixed
per variant, the export manifest must name this base and fingerprint, and the graph's sha256 and size
must match the manifest (the manifest is written last, so it is the commit point). A graph with
external data is refused; sessions are built from bytes, so no file path is ever opened.

>>> ort_bb = OrtBackbone.from_store(store, store.get_base("minilm"), variant="int8", threads=2)  # doctest: +SKIP
>>> feats = ort_bb.features(input_ids, attention_mask)  # doctest: +SKIP
>>> feats.pooled("mean").shape  # doctest: +SKIP
(32, 384)

The adapter variant (``variant="lora-fp32"``) also takes stacked LoRA weights, IA3 vectors and a per-row
slot index, so rows of different LoRA and IA3 tenants run in one ORT call; see :class:`LoraStack`,
:func:`stack_loras` and :class:`LoraSlots`.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from adapters_store import peft_spec
from adapters_store.base_models import BaseModelEntry
from adapters_store.errors import IntegrityError, UnsafeFormat, UnsupportedAdapter, ValidationError
from adapters_store.onnx_artifacts import (
    VARIANTS,
    LoraGraphRecord,
    OnnxExportManifest,
    Variant,
    graph_file,
    manifest_file,
)
from adapters_store.peft_spec import AdapterSpec

HIDDEN_OUTPUT = "last_hidden_state"


@dataclass(frozen=True)
class OrtSettings:
    """ORT session options for a small CPU box."""

    threads: int = 2
    """intra-op threads (1..64); match the cores given to this worker."""
    allow_spinning: bool = False
    """spin-waiting threads steal CPU from torch and other workers on 2 cores (PROBES §4, pitfall 4)."""
    optimization: Literal["basic", "extended", "all"] = "all"
    """ORT graph optimization level applied when the session is built."""

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 64:
            raise ValidationError(f"ORT threads must be 1..64, got {self.threads}")

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.log_severity_level = 3  # the LoRA graph's overridable inputs warn once each otherwise
        return opts


@dataclass(frozen=True)
class BackboneFeatures:
    """Pooled features of one batch: ``mean``/``cls``/``pooler`` are [batch, hidden] float32."""

    mean: np.ndarray
    cls: np.ndarray
    pooler: np.ndarray | None = None

    def pooled(self, pooling: str) -> np.ndarray:
        """Features for a manifest's ``pooling`` (mean | cls | pooler)."""
        if pooling == "pooler" and self.pooler is None:
            raise ValidationError("pooling 'pooler' needs a backbone with a pooler layer")
        if pooling not in ("mean", "cls", "pooler"):
            raise ValidationError(f"unknown pooling {pooling!r}; use mean, cls or pooler")
        return getattr(self, pooling)


def load_export(store: Any, entry: BaseModelEntry, variant: str) -> tuple[OnnxExportManifest, bytes]:
    """Read and check the base's export manifest and graph bytes; raise before anything is run."""
    if variant not in VARIANTS:
        raise ValidationError(f"unknown ONNX variant {variant!r}; known: {', '.join(VARIANTS)}")
    raw = store.get_artifact(entry.name, entry.fingerprint, manifest_file(variant))
    try:
        record = OnnxExportManifest.model_validate_json(raw)
    except Exception as e:
        raise IntegrityError(
            f"base {entry.name!r}: ONNX export manifest is invalid ({str(e)[:300]})"
        ) from None
    expected = (entry.name, entry.fingerprint, variant, graph_file(variant))
    if (record.base, record.fingerprint, record.variant, record.graph_file) != expected:
        raise IntegrityError(f"base {entry.name!r}: ONNX export manifest describes another base or variant")
    graph = store.get_artifact(entry.name, entry.fingerprint, graph_file(variant))
    if len(graph) != record.size or hashlib.sha256(graph).hexdigest() != record.sha256:
        raise IntegrityError(f"base {entry.name!r}: {graph_file(variant)} does not match its export manifest")
    check_graph(graph, record)
    return record, graph


def check_graph(graph: bytes, record: OnnxExportManifest) -> None:
    """Refuse external data and any graph whose inputs/outputs are not the ones the export declared."""
    model = onnx.load_from_string(graph)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise UnsafeFormat("ONNX graphs with external data are never loaded")
    outputs = [o.name for o in model.graph.output]
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    declared = {i.name for i in record.inputs}
    if outputs != record.outputs or HIDDEN_OUTPUT not in outputs or not declared <= inputs:
        raise IntegrityError(
            f"ONNX graph inputs/outputs {sorted(inputs)} -> {outputs} differ from its manifest"
        )


class OrtBackbone:
    """One ORT session over a base's validated export, created once and reused (``run`` is thread-safe)."""

    def __init__(self, record: OnnxExportManifest, graph: bytes, settings: OrtSettings | None = None):
        self.record = record
        self.settings = settings or OrtSettings()
        self.session = ort.InferenceSession(
            graph, self.settings.session_options(), providers=["CPUExecutionProvider"]
        )
        self._names = {
            pooling: out for pooling, out in record.pooling_outputs.items() if out in record.outputs
        }

    @classmethod
    def from_store(
        cls, store: Any, base_entry: BaseModelEntry, variant: Variant = "fp32", threads: int = 2
    ) -> OrtBackbone:
        record, graph = load_export(store, base_entry, variant)
        if variant == "lora-fp32" and cls is OrtBackbone:
            cls = OrtLoraBackbone
        return cls(record, graph, OrtSettings(threads=threads))

    @property
    def hidden_size(self) -> int:
        return self.record.hidden_size

    def run(
        self, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Raw outputs by name (all of them, or ``names``); outputs not asked for are not copied out."""
        names = list(names or self.record.outputs)
        return dict(zip(names, self.session.run(names, dict(feed)), strict=True))

    def hidden_and_pooler(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop-in for the engine's ``run_model(model, inputs)``: (last hidden state, pooler output or None).

        ``inputs`` is what the engine's tokenizer / image encoder returns (torch tensors or numpy);
        ``token_type_ids`` is ignored (BERT's default, all zeros, is baked into the graph).
        """
        out = self.run(self._feed(inputs), [HIDDEN_OUTPUT, *self._pooler_name()])
        pooler = out.get(self._names.get("pooler", ""))
        return torch.from_numpy(out[HIDDEN_OUTPUT]), None if pooler is None else torch.from_numpy(pooler)

    def _feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in inputs.items()}
        if self.record.modality == "image":
            return {"pixel_values": np.ascontiguousarray(arrays["pixel_values"], dtype=np.float32)}
        return text_feed(self.record, arrays["input_ids"], arrays["attention_mask"])

    def _pooler_name(self) -> list[str]:
        return [self._names["pooler"]] if "pooler" in self._names else []

    def features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> BackboneFeatures:
        """Text: int [batch, seq] ids and mask -> pooled features."""
        return self._features(text_feed(self.record, input_ids, attention_mask))

    def image_features(self, pixel_values: np.ndarray) -> BackboneFeatures:
        """Images: float32 [batch, channels, height, width], already normalised like the torch path."""
        if self.record.modality != "image":
            raise ValidationError(f"base {self.record.base!r} takes text, not images")
        return self._features({"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})

    def _features(self, feed: dict[str, np.ndarray]) -> BackboneFeatures:
        out = self.run(feed, [self._names["mean"], self._names["cls"], *self._pooler_name()])
        pooler = self._names.get("pooler")
        return BackboneFeatures(
            mean=out[self._names["mean"]], cls=out[self._names["cls"]], pooler=out[pooler] if pooler else None
        )


def text_feed(
    record: OnnxExportManifest, input_ids: np.ndarray, attention_mask: np.ndarray
) -> dict[str, np.ndarray]:
    if record.modality != "text":
        raise ValidationError(f"base {record.base!r} takes images, not text")
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValidationError(
            f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must be [batch, seq]"
        )
    return {
        "input_ids": ids.astype(np.int64, copy=False),
        "attention_mask": mask.astype(np.int64, copy=False),
    }


# --- LoRA in ONNX --------------------------------------------------------------------------------
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
    spec = _lora_spec(record)
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
        self.spec = _lora_spec(record)
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


def _lora_spec(record: OnnxExportManifest) -> LoraGraphRecord:
    if record.lora is None:
        raise ValidationError(f"the {record.variant!r} export of {record.base!r} has no LoRA inputs")
    return record.lora


class OrtLoraBackbone(OrtBackbone):
    """The ``lora-fp32`` export: the backbone with gathered LoRA deltas on its target Linears."""

    def __init__(self, record: OnnxExportManifest, graph: bytes, settings: OrtSettings | None = None):
        _lora_spec(record)
        super().__init__(record, graph, settings)

    def features(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        stack: LoraStack | None = None,
        adapter_index: np.ndarray | None = None,
    ) -> BackboneFeatures:
        """Rows use ``stack`` slot ``adapter_index[row]``; without a stack every row gets zero delta."""
        feed = text_feed(self.record, input_ids, attention_mask)
        return self._features(self._with_lora(feed, stack, adapter_index))

    def hidden_and_pooler(
        self,
        inputs: Mapping[str, Any],
        stack: LoraStack | None = None,
        adapter_index: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The engine's ``run_model`` for a mixed LoRA batch: rows use ``stack[adapter_index[row]]``."""
        feed = self._with_lora(self._feed(inputs), stack, adapter_index)
        out = self.run(feed, [HIDDEN_OUTPUT, *self._pooler_name()])
        pooler = out.get(self._names.get("pooler", ""))
        return torch.from_numpy(out[HIDDEN_OUTPUT]), None if pooler is None else torch.from_numpy(pooler)

    def _with_lora(
        self, feed: dict[str, np.ndarray], stack: LoraStack | None, adapter_index: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        stack = stack or stack_loras(self.record, [])
        batch = feed["input_ids"].shape[0]
        idx = np.full(batch, stack.no_adapter_slot) if adapter_index is None else adapter_index
        idx = np.asarray(idx, dtype=np.int64)
        n_slots = next(iter(stack.arrays.values())).shape[0]
        if idx.shape != (batch,) or idx.min(initial=0) < 0 or idx.max(initial=0) >= n_slots:
            raise ValidationError(f"adapter_index must be [batch] ints in 0..{n_slots - 1}")
        return {**feed, self.record.lora.index_input: idx, **stack.arrays}
