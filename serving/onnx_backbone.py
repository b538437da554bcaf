"""The ONNX Runtime side of the backbone: load a validated export from the store and run it.

Only graphs that ``loraplex onnx export`` stored under the base are loaded: the file names are fixed
per variant, the export manifest must name this base and fingerprint, and the graph's sha256 and size
must match the manifest (the manifest is written last, so it is the commit point). A graph with
external data is refused; sessions are built from bytes, so no file path is ever opened.

>>> ort_bb = OrtBackbone.from_store(store, store.get_base("minilm"), variant="int8", threads=2)  # doctest: +SKIP
>>> feats = ort_bb.features(input_ids, attention_mask)  # doctest: +SKIP
>>> feats.pooled("mean").shape  # doctest: +SKIP
(32, 384)

The adapter variant (``variant="lora-fp32"``) also takes stacked LoRA rank chunks, IA3 vectors, a per-row
slot index and the (row, chunk) pairs of the call, so rows of different LoRA and IA3 tenants run in one
ORT call; its inputs are packed by
:mod:`serving.onnx_adapters` (:class:`LoraSlots`, :func:`stack_loras`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from adapters_store.base_models import BaseModelEntry
from adapters_store.errors import IntegrityError, UnsafeFormat, ValidationError
from adapters_store.onnx_artifacts import VARIANTS, OnnxExportManifest, Variant, graph_file, manifest_file
from serving.onnx_adapters import LoraSlots, LoraStack, LoraWeights, lora_spec, stack_loras

__all__ = [
    "BackboneFeatures",
    "LoraSlots",
    "LoraStack",
    "LoraWeights",
    "OrtBackbone",
    "OrtLoraBackbone",
    "OrtSettings",
    "stack_loras",
]

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


class OrtLoraBackbone(OrtBackbone):
    """The ``lora-fp32`` export: the backbone with gathered LoRA deltas on its target Linears."""

    def __init__(self, record: OnnxExportManifest, graph: bytes, settings: OrtSettings | None = None):
        lora_spec(record)  # refuses a record without LoRA inputs or in an older layout
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
        if np.shape(idx) != (batch,):
            raise ValidationError(f"adapter_index must be [batch] ints in 0..{stack.slots - 1}")
        return {**feed, **stack.inputs(idx)}
