"""The adapter variant (``lora-fp32``): the backbone graph with stacked per-slot LoRA weights and IA3
vectors and a per-row slot index as inputs.

Each targeted Linear computes ``base(x * s_in[idx]) * s_out[idx] + (x @ A^T[idx]) @ (s * B)^T[idx]`` per
row (the factors a module does not take are left out of the graph), so one ORT call serves rows of many
LoRA and IA3 tenants, and rows with no adapter via an identity slot (zero deltas, unit vectors).
Inputs, per layer ``l`` and module ``t`` (dots in ``t`` become underscores)::

    adapter_index        int64   [batch]            slot of each row
    lora_a.{l}.{t}       float32 [slots, in, rank]  A^T of each slot (ranks zero-padded to the max)
    lora_b.{l}.{t}       float32 [slots, rank, out] (scale * B)^T of each slot
    ia3.{l}.{t}          float32 [slots, dim]       IA3 vector: dim = in for feed-forward modules
                                                    (input side), out for the others (output side)

Which module takes IA3 on which side is PEFT's rule (``adapters_store.peft_spec.is_feedforward``) over
training's default IA3 targets, so the IA3 tenants training makes are served by the graph.
Serving packs these with ``serving.onnx_backbone.LoraSlots`` / ``stack_loras``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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
IA3_INPUT = "ia3.{layer}.{target}"
DEFAULT_TARGETS = ("query", "value")


class GatheredAdapterLinear(nn.Module):
    """A Linear plus per-row IA3 scales and a per-row LoRA delta, read from the stacks that
    :class:`LoraTextFeatures` sets for one call (each is None when this module does not take it)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.a: torch.Tensor | None = None  # [slots, in, rank]
        self.b: torch.Tensor | None = None  # [slots, rank, out]
        self.ia3_in: torch.Tensor | None = None  # [slots, in]
        self.ia3_out: torch.Tensor | None = None  # [slots, out]
        self.index: torch.Tensor | None = None  # [batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        # As the torch engine's MultiTenantLinear (and PEFT): IA3 scales the base path only.
        x_in = x if self.ia3_in is None else x * self.ia3_in.index_select(0, self.index).unsqueeze(1)
        out = self.base(x_in)
        if self.ia3_out is not None:
            out = out * self.ia3_out.index_select(0, self.index).unsqueeze(1)
        if self.a is not None:
            a = self.a.index_select(0, self.index)  # [batch, in, rank]
            b = self.b.index_select(0, self.index)  # [batch, rank, out]
            out = out + torch.bmm(torch.bmm(x, a), b)
        return out

    def clear(self) -> None:
        self.a = self.b = self.ia3_in = self.ia3_out = self.index = None


class LoraTextFeatures(nn.Module):
    """(input_ids, attention_mask, adapter_index, *stacks) -> pooled features; ``input_names`` lists the
    stacks in the order ``forward`` takes them."""

    def __init__(
        self,
        model: nn.Module,
        targets: list[str],
        ia3_in: list[str] | tuple[str, ...] = (),
        ia3_out: list[str] | tuple[str, ...] = (),
    ):
        super().__init__()
        if set(ia3_in) & set(ia3_out):
            raise OnnxExportError(f"modules {sorted(set(ia3_in) & set(ia3_out))} take IA3 on one side only")
        self.features = TextFeatures(model)
        self.targets, self.ia3_in, self.ia3_out = list(targets), list(ia3_in), list(ia3_out)
        self.slots: list[tuple[int, str, GatheredAdapterLinear]] = []
        self._feeds: list[tuple[str, GatheredAdapterLinear, str]] = []  # input name, module, attribute
        modules = list(dict.fromkeys([*self.targets, *self.ia3_in, *self.ia3_out]))
        for layer_idx, layer in enumerate(model.encoder.layer):
            for target in modules:
                parent_path, _, leaf = target.rpartition(".")
                parent = layer.get_submodule(parent_path)
                wrapped = GatheredAdapterLinear(getattr(parent, leaf))
                setattr(parent, leaf, wrapped)
                self.slots.append((layer_idx, target, wrapped))
                name = target.replace(".", "_")
                if target in self.targets:
                    self._feeds.append((A_INPUT.format(layer=layer_idx, target=name), wrapped, "a"))
                    self._feeds.append((B_INPUT.format(layer=layer_idx, target=name), wrapped, "b"))
                if target in self.ia3_in or target in self.ia3_out:
                    side = "ia3_in" if target in self.ia3_in else "ia3_out"
                    self._feeds.append((IA3_INPUT.format(layer=layer_idx, target=name), wrapped, side))

    @classmethod
    def for_record(cls, model: nn.Module, record: LoraGraphRecord) -> LoraTextFeatures:
        """The torch twin of a stored graph (same LoRA and IA3 modules), e.g. to check it."""
        return cls(model, record.targets, record.ia3_in, record.ia3_out)

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self._feeds]

    def run_named(self, input_ids, attention_mask, adapter_index, arrays: Mapping[str, Any]):
        """``forward`` with the stacks given by input name (a ``LoraStack.arrays``), in any order."""
        stacks = [torch.as_tensor(arrays[name]) for name in self.input_names]
        return self(input_ids, attention_mask, adapter_index, *stacks)

    def forward(self, input_ids, attention_mask, adapter_index, *stacks):
        for (_, module, attr), stack in zip(self._feeds, stacks, strict=True):
            setattr(module, attr, stack)
            module.index = adapter_index
        try:
            return self.features(input_ids, attention_mask)
        finally:
            for _, _, module in self.slots:
                module.clear()


def canonical_targets(entry: Any, targets: tuple[str, ...] | list[str], kind: str = "LoRA") -> list[str]:
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
            raise OnnxExportError(f"unknown {kind} target {t!r}; choose from {', '.join(sorted(linears))}")
        out += [p for p in hits if p not in out]
    if not out:
        raise OnnxExportError("the LoRA graph needs at least one target")
    return out


def ia3_sides(
    entry: Any, targets: tuple[str, ...] | list[str], feedforward: tuple[str, ...] | list[str] | str
) -> tuple[list[str], list[str]]:
    """IA3 target names -> (input-side paths, output-side paths) inside one encoder layer, by PEFT's rules
    (:func:`canonical_targets` for the names, ``peft_spec.is_feedforward`` for the side)."""
    if not targets:
        return [], []
    cfg = {"feedforward_modules": list(feedforward) if not isinstance(feedforward, str) else feedforward}
    paths = canonical_targets(entry, targets, kind="IA3")
    ia3_in = [p for p in paths if peft_spec.is_feedforward(cfg, f"encoder.layer.0.{p}")]
    return ia3_in, [p for p in paths if p not in ia3_in]


def default_ia3(entry: Any) -> tuple[list[str], list[str]]:
    """The graph's IA3 modules: training's default IA3 targets for this architecture (none if unknown)."""
    from training.targets import IA3_TARGETS

    targets, feedforward = IA3_TARGETS.get(entry.model_type, ([], []))
    return ia3_sides(entry, targets, feedforward)


def lora_record(module: LoraTextFeatures) -> LoraGraphRecord:
    first = {t: m.base for layer, t, m in module.slots if layer == 0}
    has_ia3 = bool(module.ia3_in or module.ia3_out)
    return LoraGraphRecord(
        targets=list(module.targets),
        num_layers=1 + max(layer for layer, _, _ in module.slots),
        index_input=INDEX_INPUT,
        a_input=A_INPUT,
        b_input=B_INPUT,
        in_features={t: lin.in_features for t, lin in first.items()},
        out_features={t: lin.out_features for t, lin in first.items()},
        ia3_input=IA3_INPUT if has_ia3 else None,
        ia3_in=list(module.ia3_in),
        ia3_out=list(module.ia3_out),
    )


def random_stacks(module: LoraTextFeatures, slots: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded stacks in the graph's input order: non-zero LoRA deltas and IA3 vectors away from 1, so
    validation sees every factor change the output."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for layer, target, lin in module.slots:
        name = target.replace(".", "_")
        shapes[A_INPUT.format(layer=layer, target=name)] = (slots, lin.base.in_features, rank)
        shapes[B_INPUT.format(layer=layer, target=name)] = (slots, rank, lin.base.out_features)
        dim = lin.base.in_features if target in module.ia3_in else lin.base.out_features
        shapes[IA3_INPUT.format(layer=layer, target=name)] = (slots, dim)
    arrays = {}
    for name in module.input_names:
        noise = rng.standard_normal(shapes[name])
        arrays[name] = (1.0 + 0.3 * noise if name.startswith("ia3.") else 0.1 * noise).astype(np.float32)
    return arrays


def with_lora(feed: Feed, module: LoraTextFeatures, slots: int, rank: int, seed: int) -> Feed:
    batch = next(iter(feed.values())).shape[0]
    index = np.random.default_rng(seed).integers(0, slots, size=batch).astype(np.int64)
    return {**feed, INDEX_INPUT: index, **random_stacks(module, slots, rank, seed)}


def export_lora_base(
    store: Any,
    base_name: str,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    settings: ExportSettings | None = None,
    ia3: tuple[list[str] | tuple[str, ...], list[str] | tuple[str, ...] | str] | None = None,
) -> ExportReport:
    """Export, validate (random multi-slot stacks, several shapes) and store the ``lora-fp32`` graph.

    ``ia3`` = (IA3 target names, feed-forward names) as in PEFT's ``IA3Config``; default: training's
    IA3 defaults for the architecture. ``([], [])`` builds a LoRA-only graph. A stored graph is reused
    only when it takes exactly these LoRA and IA3 modules (graphs stored before IA3 are rebuilt)."""
    settings = settings or ExportSettings()
    t0 = time.perf_counter()
    entry = store.get_base(base_name)
    existing = stored_manifest(store, entry, "lora-fp32")
    wanted = canonical_targets(entry, targets)
    ia3_in, ia3_out = default_ia3(entry) if ia3 is None else ia3_sides(entry, *ia3)
    if existing is not None and not settings.force and existing.lora is not None:
        stored = existing.lora
        if (stored.targets, stored.ia3_in, stored.ia3_out) == (wanted, ia3_in, ia3_out):
            return ExportReport(manifest=existing, reused=True, seconds=time.perf_counter() - t0)
    torch.set_num_threads(settings.threads)
    spec = spec_for(entry.model_type)
    if spec.modality != "text":
        raise UnsupportedArchitecture(
            f"the ONNX LoRA graph is built for text encoders, not {entry.model_type!r}"
        )
    model = load_base_model(entry)
    # Traced like the plain fp32 graph (eager attention): the SDPA trace adds a NaN guard (IsNaN +
    # Where on every softmax) and a mask Where per layer, ~1% of a mixed call's CPU on MiniLM.
    model.set_attn_implementation("eager")
    module = LoraTextFeatures(model, wanted, ia3_in, ia3_out).eval()
    record = lora_record(module)
    outputs = spec.output_names(has_pooler=pooler_of(model) is not None)
    probes = [
        with_lora(f, module, slots=1 + i % 5, rank=2 + i % 7, seed=i)
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
    axes.update({k: {0: "slots"} for k in extra if k.startswith("ia3.")})
    return export_graph(module, spec, sample, outputs, extra_inputs=extra, extra_axes=axes)
