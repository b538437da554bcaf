"""The LoRA variant: the backbone graph with stacked LoRA weights and a per-row slot index as inputs.

Each targeted Linear computes ``base(x) + (x @ A^T[idx]) @ (s * B)^T[idx]`` per row, so one ORT call
serves rows of many LoRA tenants (and rows with no adapter, via an all-zero slot). Inputs, per layer
``l`` and target ``t`` (dots in ``t`` become underscores)::

    adapter_index        int64   [batch]            slot of each row
    lora_a.{l}.{t}       float32 [slots, in, rank]  A^T of each slot (ranks zero-padded to the max)
    lora_b.{l}.{t}       float32 [slots, rank, out] (scale * B)^T of each slot

Serving packs these with ``serving.onnx_backbone.stack_loras``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_store import peft_spec
from adapters_store.onnx_artifacts import LoraGraphRecord
from training.onnx_export.errors import OnnxExportError, UnsupportedArchitecture
from training.onnx_export.export import (
    ExportReport,
    ExportSettings,
    describe,
    export_graph,
    load_base_model,
    ort_runner,
    put_graph,
    stored_manifest,
    torch_runner,
)
from training.onnx_export.probes import shape_probes
from training.onnx_export.specs import ArchitectureSpec, spec_for
from training.onnx_export.validate import Feed, check_fp32, measure
from training.onnx_export.wrappers import TextFeatures, pooler_of

INDEX_INPUT = "adapter_index"
A_INPUT = "lora_a.{layer}.{target}"
B_INPUT = "lora_b.{layer}.{target}"
DEFAULT_TARGETS = ("query", "value")


class GatheredLoraLinear(nn.Module):
    """A Linear plus a per-row LoRA delta read from the stacks set by :class:`LoraTextFeatures`."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.a: torch.Tensor | None = None  # [slots, in, rank]
        self.b: torch.Tensor | None = None  # [slots, rank, out]
        self.index: torch.Tensor | None = None  # [batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        a = self.a.index_select(0, self.index)  # [batch, in, rank]
        b = self.b.index_select(0, self.index)  # [batch, rank, out]
        return self.base(x) + torch.bmm(torch.bmm(x, a), b)


class LoraTextFeatures(nn.Module):
    """(input_ids, attention_mask, adapter_index, a_0, b_0, a_1, b_1, ...) -> pooled features."""

    def __init__(self, model: nn.Module, targets: list[str]):
        super().__init__()
        self.features = TextFeatures(model)
        self.slots: list[tuple[int, str, GatheredLoraLinear]] = []
        for layer_idx, layer in enumerate(model.encoder.layer):
            for target in targets:
                parent_path, _, leaf = target.rpartition(".")
                parent = layer.get_submodule(parent_path)
                wrapped = GatheredLoraLinear(getattr(parent, leaf))
                setattr(parent, leaf, wrapped)
                self.slots.append((layer_idx, target, wrapped))

    def forward(self, input_ids, attention_mask, adapter_index, *stacks):
        for k, (_, _, module) in enumerate(self.slots):
            module.a, module.b, module.index = stacks[2 * k], stacks[2 * k + 1], adapter_index
        try:
            return self.features(input_ids, attention_mask)
        finally:
            for _, _, module in self.slots:
                module.a = module.b = module.index = None


def canonical_targets(entry: Any, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Target names -> Linear paths inside one encoder layer, matched by PEFT's own rule (a name is a
    dotted suffix: ``output.dense`` takes both feed-forward and attention output), the base's layer 0."""
    prefix = "encoder.layer.0."
    linears = [
        n[len(prefix) : -len(".weight")]
        for n, shape in entry.tensors.items()
        if n.startswith(prefix) and n.endswith(".weight") and len(shape) == 2
    ]
    out: list[str] = []
    for t in targets:
        hits = [p for p in linears if peft_spec.is_targeted({"target_modules": [t]}, p)]
        if not hits:
            raise OnnxExportError(f"unknown LoRA target {t!r}; choose from {', '.join(sorted(linears))}")
        out += [p for p in hits if p not in out]
    if not out:
        raise OnnxExportError("the LoRA graph needs at least one target")
    return out


def lora_record(module: LoraTextFeatures) -> LoraGraphRecord:
    first = {t: m.base for layer, t, m in module.slots if layer == 0}
    return LoraGraphRecord(
        targets=list(first),
        num_layers=1 + max(layer for layer, _, _ in module.slots),
        index_input=INDEX_INPUT,
        a_input=A_INPUT,
        b_input=B_INPUT,
        in_features={t: lin.in_features for t, lin in first.items()},
        out_features={t: lin.out_features for t, lin in first.items()},
    )


def random_stacks(record: LoraGraphRecord, slots: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded non-zero stacks (so validation sees real deltas), in the graph's input order."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in range(record.num_layers):
        for t in record.targets:
            name = t.replace(".", "_")
            arrays[A_INPUT.format(layer=layer, target=name)] = (
                rng.standard_normal((slots, record.in_features[t], rank)) * 0.1
            ).astype(np.float32)
            arrays[B_INPUT.format(layer=layer, target=name)] = (
                rng.standard_normal((slots, rank, record.out_features[t])) * 0.1
            ).astype(np.float32)
    return arrays


def with_lora(feed: Feed, record: LoraGraphRecord, slots: int, rank: int, seed: int) -> Feed:
    batch = next(iter(feed.values())).shape[0]
    index = np.random.default_rng(seed).integers(0, slots, size=batch).astype(np.int64)
    return {**feed, INDEX_INPUT: index, **random_stacks(record, slots, rank, seed)}


def export_lora_base(
    store: Any,
    base_name: str,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    settings: ExportSettings | None = None,
) -> ExportReport:
    """Export, validate (random multi-slot stacks, several shapes) and store the ``lora-fp32`` graph."""
    settings = settings or ExportSettings()
    t0 = time.perf_counter()
    entry = store.get_base(base_name)
    existing = stored_manifest(store, entry, "lora-fp32")
    wanted = canonical_targets(entry, targets)
    if existing is not None and not settings.force and existing.lora and existing.lora.targets == wanted:
        return ExportReport(manifest=existing, reused=True, seconds=time.perf_counter() - t0)
    torch.set_num_threads(settings.threads)
    spec = spec_for(entry.model_type)
    if spec.modality != "text":
        raise UnsupportedArchitecture(
            f"the ONNX LoRA graph is built for text encoders, not {entry.model_type!r}"
        )
    model = load_base_model(entry)
    module = LoraTextFeatures(model, wanted).eval()
    record = lora_record(module)
    outputs = spec.output_names(has_pooler=pooler_of(model) is not None)
    probes = [
        with_lora(f, record, slots=1 + i % 5, rank=2 + i % 7, seed=i)
        for i, f in enumerate(shape_probes(spec, model.config))
    ]
    graph = _trace(module, spec, probes[0], outputs)
    figures = measure(torch_runner(module), ort_runner(graph, settings.threads), probes, outputs)
    check_fp32(figures, spec.tolerance.atol, spec.tolerance.min_cosine, f"{base_name} LoRA export")
    manifest = describe(
        entry, spec, "lora-fp32", graph, outputs, figures, int(model.config.hidden_size), lora=record
    )
    put_graph(store, manifest, graph)
    return ExportReport(manifest=manifest, reused=False, seconds=time.perf_counter() - t0)


def _trace(module: LoraTextFeatures, spec: ArchitectureSpec, sample: Feed, outputs: list[str]) -> bytes:
    extra = {k: torch.from_numpy(v) for k, v in sample.items() if k not in spec.input_names}
    axes = {INDEX_INPUT: {0: "batch"}}
    axes.update({k: {0: "slots", 2: "rank"} for k in extra if k.startswith("lora_a.")})
    axes.update({k: {0: "slots", 1: "rank"} for k in extra if k.startswith("lora_b.")})
    return export_graph(module, spec, sample, outputs, extra_inputs=extra, extra_axes=axes)
