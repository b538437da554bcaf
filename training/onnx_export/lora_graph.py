"""The adapter variant (``lora-fp32``): the backbone graph with stacked LoRA rank chunks and IA3 vectors
as inputs, and which rows use which.

Each targeted Linear computes ``base(x * s_in[row]) * s_out[row] + sum over the row's chunks c of
(x @ A^T[c]) @ (s * B)^T[c]`` (the factors a module does not take are left out of the graph), so one
ORT call serves rows of many LoRA and IA3 tenants, and rows with no adapter (no chunks, IA3 identity
slot). A LoRA of rank r is stored as ceil(r / R) chunks of rank R (serving's choice; the graph takes any
R), so a row pays for its own rank, not the largest one resident, and rows without LoRA pay nothing:
only the listed (row, chunk) pairs are gathered and multiplied, and a 0/1 [batch, chunks] matrix adds
each chunk's delta back to its row (not a ``ScatterND`` add: onnxruntime's races on duplicate rows,
a LoRA of several chunks, when it runs on more than one thread). Inputs, per layer ``l`` and module
``t`` (dots become underscores)::

    adapter_index        int64   [batch]            IA3 slot of each row
    lora_rows            int64   [chunks]           batch row of each LoRA chunk used by this call
    lora_chunks          int64   [chunks]           its chunk slot in the stacks below
    lora_a.{l}.{t}       float32 [chunk_slots, in, R]  A^T of each chunk
    lora_b.{l}.{t}       float32 [chunk_slots, R, out] (scale * B)^T of each chunk
    ia3.{l}.{t}          float32 [slots, dim]       IA3 vector: dim = in for feed-forward modules
                                                    (input side), out for the others (output side)

Measured on MiniLM (64-tenant mix, batch 32): the adapter ops cost about half of what per-row slots
padded to the largest rank did (docs/onnx.md). Graphs stored with that older layout (``slot-per-row``
in the record) are rebuilt by the next export; serving runs their LoRA and IA3 rows on torch meanwhile.
Which module takes IA3 on which side is PEFT's rule (``adapters_store.peft_spec.is_feedforward``) over
training's default IA3 targets, so the IA3 tenants training makes are served by the graph.
Serving packs these with ``serving.onnx_adapters.LoraSlots`` / ``stack_loras``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from adapters_store import peft_spec
from adapters_store.onnx_artifacts import LORA_DELTA_ADD, LORA_LAYOUT, LoraGraphRecord
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
ROWS_INPUT = "lora_rows"
CHUNKS_INPUT = "lora_chunks"
A_INPUT = "lora_a.{layer}.{target}"
B_INPUT = "lora_b.{layer}.{target}"
IA3_INPUT = "ia3.{layer}.{target}"
DEFAULT_TARGETS = ("query", "value")


class GatheredAdapterLinear(nn.Module):
    """A Linear plus per-row IA3 scales and per-chunk LoRA deltas, read from the stacks and indices that
    :class:`LoraTextFeatures` sets for one call (a stack is None when this module does not take it)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.a: torch.Tensor | None = None  # [chunk_slots, in, R]
        self.b: torch.Tensor | None = None  # [chunk_slots, R, out]
        self.ia3_in: torch.Tensor | None = None  # [slots, in]
        self.ia3_out: torch.Tensor | None = None  # [slots, out]
        self.call: CallIndex | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        call = self.call
        # As the torch engine's MultiTenantLinear (and PEFT): IA3 scales the base path only.
        x_in = x if self.ia3_in is None else x * self.ia3_in.index_select(0, call.index).unsqueeze(1)
        out = self.base(x_in)
        if self.ia3_out is not None:
            out = out * self.ia3_out.index_select(0, call.index).unsqueeze(1)
        if self.a is not None:
            a = self.a.index_select(0, call.chunks)  # [chunks, in, R]
            b = self.b.index_select(0, call.chunks)  # [chunks, R, out]
            delta = torch.bmm(torch.bmm(x.index_select(0, call.rows), a), b)  # [chunks, seq, out]
            batch, seq, dim = out.shape
            # [batch, chunks] @ [chunks, seq * out]: each row gets the sum of its chunks' deltas
            out = out + (call.combine @ delta.flatten(1)).reshape(batch, seq, dim)
        return out

    def clear(self) -> None:
        self.a = self.b = self.ia3_in = self.ia3_out = self.call = None


class CallIndex(NamedTuple):
    """Which rows use which slots in one call (shared by every adapted module)."""

    index: torch.Tensor  # [batch] IA3 slot per row
    rows: torch.Tensor  # [chunks] batch row per LoRA chunk
    chunks: torch.Tensor  # [chunks] chunk slot per LoRA chunk
    combine: torch.Tensor  # [batch, chunks] float 0/1: chunk c belongs to row r


class LoraTextFeatures(nn.Module):
    """(input_ids, attention_mask, adapter_index, lora_rows, lora_chunks, *stacks) -> pooled features;
    ``input_names`` lists the stacks in the order ``forward`` takes them."""

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

    def run_named(self, input_ids, attention_mask, inputs: Mapping[str, Any]):
        """``forward`` with the index and stack inputs given by name (``LoraStack.inputs``), in any order."""
        t = {name: torch.as_tensor(v) for name, v in inputs.items()}
        stacks = [t[name] for name in self.input_names]
        return self(input_ids, attention_mask, t[INDEX_INPUT], t[ROWS_INPUT], t[CHUNKS_INPUT], *stacks)

    def forward(self, input_ids, attention_mask, adapter_index, lora_rows, lora_chunks, *stacks):
        batch = torch.arange(input_ids.shape[0]).unsqueeze(1)
        combine = (batch == lora_rows.unsqueeze(0)).to(torch.float32)  # [batch, chunks]
        call = CallIndex(adapter_index, lora_rows, lora_chunks, combine)
        for (_, module, attr), stack in zip(self._feeds, stacks, strict=True):
            setattr(module, attr, stack)
        for _, _, module in self.slots:
            module.call = call
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
        layout=LORA_LAYOUT,
        delta_add=LORA_DELTA_ADD,
        index_input=INDEX_INPUT,
        rows_input=ROWS_INPUT,
        chunks_input=CHUNKS_INPUT,
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
    """``feed`` plus random stacks and indices: rows with 0-2 LoRA chunks (a chunk used by two rows
    too), and each row's IA3 slot, so validation sees rows without LoRA and rows summing chunks;
    seeds 3, 7, ... use no chunk at all (a call with IA3 and bare rows only)."""
    rng = np.random.default_rng(seed)
    batch = next(iter(feed.values())).shape[0]
    index = rng.integers(0, slots, size=batch).astype(np.int64)
    per_row = [rng.integers(0, slots, size=0 if seed % 4 == 3 else (r + 1) % 3) for r in range(batch)]
    rows = np.array([r for r, cs in enumerate(per_row) for _ in cs], np.int64)
    chunks = np.array([c for cs in per_row for c in cs], np.int64)
    return {
        **feed,
        INDEX_INPUT: index,
        ROWS_INPUT: rows,
        CHUNKS_INPUT: chunks,
        **random_stacks(module, slots, rank, seed),
    }


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
    only when it takes exactly these LoRA and IA3 modules in the current input layout and adds deltas
    the current way (graphs stored before IA3 or rank chunks, and the racy scatter-add graphs of
    2026-12-01, are rebuilt)."""
    settings = settings or ExportSettings()
    t0 = time.perf_counter()
    entry = store.get_base(base_name)
    existing = stored_manifest(store, entry, "lora-fp32")
    wanted = canonical_targets(entry, targets)
    ia3_in, ia3_out = default_ia3(entry) if ia3 is None else ia3_sides(entry, *ia3)
    if existing is not None and not settings.force and existing.lora is not None:
        stored = existing.lora
        current = (wanted, ia3_in, ia3_out, LORA_LAYOUT, LORA_DELTA_ADD)
        if (stored.targets, stored.ia3_in, stored.ia3_out, stored.layout, stored.delta_add) == current:
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
    run_onnx = ort_runner(graph, settings.threads)
    if not record.takes_index:
        run_onnx = partial(_without_index, run_onnx)
    figures = measure(torch_runner(module), run_onnx, probes, outputs)
    check_fp32(figures, spec.tolerance.atol, spec.tolerance.min_cosine, f"{base_name} LoRA export")
    manifest = describe(
        entry, spec, "lora-fp32", graph, outputs, figures, int(model.config.hidden_size), lora=record
    )
    put_graph(store, manifest, graph)
    return ExportReport(manifest=manifest, reused=False, seconds=time.perf_counter() - t0)


def _without_index(run: Any, feed: Feed) -> Any:
    return run({k: v for k, v in feed.items() if k != INDEX_INPUT})


def _trace(module: LoraTextFeatures, spec: ArchitectureSpec, sample: Feed, outputs: list[str]) -> bytes:
    extra = {k: torch.from_numpy(v) for k, v in sample.items() if k not in spec.input_names}
    axes = {INDEX_INPUT: {0: "batch"}, ROWS_INPUT: {0: "chunks"}, CHUNKS_INPUT: {0: "chunks"}}
    axes.update({k: {0: "chunk_slots", 2: "rank"} for k in extra if k.startswith("lora_a.")})
    axes.update({k: {0: "chunk_slots", 1: "rank"} for k in extra if k.startswith("lora_b.")})
    axes.update({k: {0: "slots"} for k in extra if k.startswith("ia3.")})
    return export_graph(module, spec, sample, outputs, extra_inputs=extra, extra_axes=axes)
