"""Multi-tenant wrappers around the ONE backbone's modules, driven by a per-batch context.

Every ``nn.Linear`` of the backbone is wrapped once at start-up. Before a forward pass the engine sets
each wrapper's context from the batch plan (rows are already sorted into contiguous adapter segments):

* ``lora``: per run of segments that target this module, :class:`LoraRun` ``(start, end, count, A^T,
  B^T*scaling)``: one segment (``count`` 1, ``A^T [in, r]``) or ``count`` adjacent segments of equal
  rows and LoRA shape (``A^T [count, in, r]``, one bmm pair); the delta is added in place on a view of the
  output, so rows of other tenants get exactly zero.
* ``ia3_in`` / ``ia3_out``: per-row scale vectors ``[B, 1, in]`` / ``[B, 1, out]`` (ones for rows
  without IA3), PEFT semantics: feed-forward modules scale their input, the others their output.

A wrapper whose context is empty costs one extra Python call: the LoRA path is skipped entirely.
Context is only touched under the engine's forward lock, so one context per wrapper is enough.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LoraSegment = tuple[int, int, torch.Tensor, torch.Tensor]  # (start row, end row, A^T, B^T * scaling)
# Above this many LoRA segments in a layer, gather per-row A/B once per batch. Measured on a quiet box
# (benchmarks/bench_engine.py): per-segment matmuls on views beat the gathered bmm pair even at 64
# tenants in a batch of 64 ((b)/(a) 0.96 vs 0.78, (c)/(a) 0.92 vs 0.57), so the gather is a last resort.
SEGMENT_LIMIT = 64
# Adjacent segments of equal rows and LoRA shape (plan.py puts them together) are served by one bmm pair
# per module from this many segments on; each matmul on a shared 2-core box is a thread-pool round trip.
MIN_RUN = 2


class LoraRun(NamedTuple):
    """Rows ``[start, end)``: ``count`` segments of ``(end - start) // count`` rows each.

    count == 1: a_t [in, r], b_t [r, out] (B^T * scaling)
    count  > 1: a_t [count, in, r], b_t [count, r, out], segment i's weights at index i
    """

    start: int
    end: int
    count: int
    a_t: torch.Tensor
    b_t: torch.Tensor


class LoraBlock(NamedTuple):
    """One adapter's LoRA modules of one shape (in, out, rank), stored side by side (loader._one_buffer):
    module ``paths[j]`` has A ``a[j]`` ([r, in], row-major) and B^T * scaling ``b[j]`` ([r, out])."""

    paths: tuple[str, ...]
    a: torch.Tensor  # [n, r, in]
    b: torch.Tensor  # [n, r, out]


class LoraSegmentSpec(NamedTuple):
    """Rows ``[start, end)`` of one adapter: its LoRA shape (``(module, rank)`` pairs; adapters of equal
    shapes can share a bmm pair) and its :class:`LoraBlock` s, in the same order for equal shapes."""

    start: int
    end: int
    shape: Hashable
    blocks: tuple[LoraBlock, ...]


def runs_of(segments: Sequence[LoraSegmentSpec], skip: Container[str] = ()) -> dict[str, list[LoraRun]]:
    """Per module (except those in ``skip``), its runs in row order. Adjacent segments of equal rows
    and equal LoRA shape are one run when there are at least :data:`MIN_RUN` of them. A run stacks
    each of its adapters' blocks once per side ([count, modules, r, d]) and every module of the block
    reads its [count, r, d] slice: two ``stack`` calls per shape for a 16-tenant run, where stacking
    per module cost ~0.5 ms of Python per 16-tenant batch on MiniLM."""
    runs: dict[str, list[LoraRun]] = {}
    i = 0
    while i < len(segments):
        first = segments[i]
        rows, end, j = first.end - first.start, first.end, i + 1
        while j < len(segments):
            seg = segments[j]
            if seg.start != end or seg.end - seg.start != rows or seg.shape != first.shape:
                break
            end, j = seg.end, j + 1
        count = j - i
        for k, block in enumerate(first.blocks):
            paths = [(m, p) for m, p in enumerate(block.paths) if p not in skip]
            if not paths:
                continue
            if count < MIN_RUN:
                for m, path in paths:
                    runs.setdefault(path, []).append(LoraRun(first.start, end, 1, block.a[m].t(), block.b[m]))
                continue
            # Module m's [count, r, d] slice is a strided view (bmm takes any batch stride); A^T
            # [count, in, r] is its transposed view, as for one segment.
            a_all = torch.stack([segments[n].blocks[k].a for n in range(i, j)])
            b_all = torch.stack([segments[n].blocks[k].b for n in range(i, j)])
            for m, path in paths:
                runs.setdefault(path, []).append(
                    LoraRun(first.start, end, count, a_all[:, m].transpose(1, 2), b_all[:, m])
                )
        i = j
    return runs


def _row_refs(
    segments: Sequence[LoraSegment], batch: int, in_f: int, out_f: int, r_max: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-row references to A^T [in, r_max] and B^T [r_max, out]; zeros for rows without LoRA (zero
    delta). Smaller ranks are zero-padded, which adds nothing to the product."""
    zero_a, zero_b = torch.zeros(in_f, r_max), torch.zeros(r_max, out_f)
    a_rows, b_rows = [zero_a] * batch, [zero_b] * batch
    for start, end, a_t, b_t in segments:
        if a_t.shape[1] != r_max:
            a_t, b_t = F.pad(a_t, (0, r_max - a_t.shape[1])), F.pad(b_t, (0, 0, 0, r_max - b_t.shape[0]))
        a_rows[start:end] = [a_t] * (end - start)
        b_rows[start:end] = [b_t] * (end - start)
    return a_rows, b_rows


def gather_rows(
    per_module: dict[str, Sequence[LoraSegment]], shapes: dict[str, tuple[int, int]], batch: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, per-row A^T [B, in, r_max] and B^T [B, r_max, out] for one bmm pair per layer.

    Modules of one shape and rank (e.g. every query and value) share ONE ``stack`` per side, so a
    batch costs a couple of copy ops, not two per module: on a shared CPU every op is a thread-pool
    round trip.
    """
    groups: dict[tuple[int, int, int], list[str]] = {}
    for path, segs in per_module.items():
        r_max = max(a.shape[1] for _, _, a, _ in segs)
        groups.setdefault((*shapes[path], r_max), []).append(path)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (in_f, out_f, r_max), paths in groups.items():
        a_refs: list[torch.Tensor] = []
        b_refs: list[torch.Tensor] = []
        for path in paths:
            a_rows, b_rows = _row_refs(per_module[path], batch, in_f, out_f, r_max)
            a_refs += a_rows
            b_refs += b_rows
        a_all = torch.stack(a_refs).view(len(paths), batch, in_f, r_max)
        b_all = torch.stack(b_refs).view(len(paths), batch, r_max, out_f)
        for i, path in enumerate(paths):
            out[path] = (a_all[i], b_all[i])
    return out


class MultiTenantLinear(nn.Module):
    """``base(x)`` plus per-segment low-rank deltas and per-row IA3 scales."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora: Sequence[LoraRun] = ()
        self.lora_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, in, r], [B, r, out])
        self.ia3_in: torch.Tensor | None = None
        self.ia3_out: torch.Tensor | None = None

    def set_context(
        self,
        lora: Sequence[LoraRun] = (),
        lora_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
        ia3_in: torch.Tensor | None = None,
        ia3_out: torch.Tensor | None = None,
    ) -> None:
        """Either per-segment matmuls on views (few segments) or one gathered bmm pair (many segments:
        each tiny matmul costs a thread-pool round trip that dwarfs its FLOPs). Written to the instance
        dict directly: ``nn.Module.__setattr__``'s checks cost ~1 us per attribute, per wrapper, per
        batch, and none of these is a parameter, buffer or module."""
        self.__dict__.update(lora=lora, lora_rows=lora_rows, ia3_in=ia3_in, ia3_out=ia3_out)

    def clear_context(self) -> None:
        self.__dict__.update(lora=(), lora_rows=None, ia3_in=None, ia3_out=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]  # a partial-layer switch may run this on a prefix of the batch
        x_in = x if self.ia3_in is None else x * _per_row(self.ia3_in, rows, x.dim())
        out = self.base(x_in)
        if self.ia3_out is not None:
            out = out * _per_row(self.ia3_out, rows, out.dim())
        if self.lora:
            _add_lora(x, out, self.lora, rows)
        elif self.lora_rows is not None:
            a_rows, b_rows = self.lora_rows
            x3, out3 = x.reshape(rows, -1, self.in_features), out.view(rows, -1, self.out_features)
            out3.baddbmm_(torch.bmm(x3, a_rows[:rows]), b_rows[:rows])
        return out


def _per_row(scale: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """[B, 1, d] scale for [rows, T, d] activations, or [B, d] for [rows, d] (a pooler's input)."""
    scale = scale[:rows]
    return scale if dim == 3 else scale.reshape(rows, -1)


def _add_lora(x: torch.Tensor, out: torch.Tensor, runs: Sequence[LoraRun], rows: int) -> None:
    # Runs are contiguous row ranges, so x[s:e] and out[s:e] are views: no gather, no copy.
    # A run's x A^T is computed as (A x^T)^T on views (A row-major [count, r, in]): its batched GEMM
    # then runs 1.2-1.8x faster (d 384, r 8, 2 threads: 16 segments x 36 tokens 81 vs 144 us, 4 x 36
    # 33 vs 47 us). For one segment's 2-D mm neither form wins across ranks and lengths.
    out_f = out.shape[-1]
    in_f = x.shape[-1]
    for start, end, count, a_t, b_t in runs:
        if start >= rows:
            continue
        if count == 1:
            seg_out = out[start:end].view(-1, out_f)
            seg_out.addmm_(torch.mm(x[start:end].reshape(-1, in_f), a_t), b_t)
        elif end > rows:  # a prefix pass cuts this run: segment by segment, up to the prefix's end
            step = (end - start) // count
            for i, s in enumerate(range(start, rows, step)):
                e = min(s + step, rows)
                out[s:e].view(-1, out_f).addmm_(torch.mm(x[s:e].reshape(-1, in_f), a_t[i]), b_t[i])
        else:  # [count, rows per segment * T, d]: one bmm pair for every segment of the run
            seg_out = out[start:end].view(count, -1, out_f)
            xa = torch.bmm(a_t.transpose(1, 2), x[start:end].reshape(count, -1, in_f).transpose(1, 2))
            seg_out.baddbmm_(xa.transpose(1, 2), b_t)


class LayerSwitch(nn.Module):
    """An encoder block that runs the shared base block on the batch's leading rows and each partial
    tenant's own copy of the block on that tenant's rows only (rows are planned so this is a prefix
    plus trailing segments)."""

    def __init__(self, base: nn.Module, index: int):
        super().__init__()
        self.base = base
        self.index = index
        self.base_rows: int | None = None  # None: every row uses the base block
        self.own: Sequence[tuple[int, int, nn.Module]] = ()

    def set_context(self, base_rows: int | None, own: Sequence[tuple[int, int, nn.Module]]) -> None:
        self.base_rows, self.own = base_rows, own

    def clear_context(self) -> None:
        self.base_rows, self.own = None, ()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not self.own:
            return self.base(hidden_states, *args, **kwargs)
        batch = hidden_states.shape[0]
        out = torch.empty_like(hidden_states)
        if self.base_rows:
            out[: self.base_rows] = _first(
                self._run(self.base, hidden_states, 0, self.base_rows, batch, args, kwargs)
            )
        for start, end, block in self.own:
            out[start:end] = _first(self._run(block, hidden_states, start, end, batch, args, kwargs))
        return out

    @staticmethod
    def _run(block: nn.Module, hidden: torch.Tensor, start: int, end: int, batch: int, args, kwargs):
        # Slice every per-row tensor argument (attention masks) to the same rows.
        def cut(v):
            return v[start:end] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v

        return block(hidden[start:end], *[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def wrap_linears(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, MultiTenantLinear]:
    """Replace every ``nn.Linear`` under ``model`` by a :class:`MultiTenantLinear`; returns them by path."""
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name.startswith(s) for s in skip)
    ]
    wrapped: dict[str, MultiTenantLinear] = {}
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiTenantLinear(mod)
        setattr(parent, attr, wrapper)
        wrapped[name] = wrapper
    return wrapped


def wrap_layers(layers: nn.ModuleList) -> list[LayerSwitch]:
    """Replace each block of an encoder's ``ModuleList`` by a :class:`LayerSwitch`."""
    switches = [LayerSwitch(block, i) for i, block in enumerate(layers)]
    for i, sw in enumerate(switches):
        layers[i] = sw
    return switches
