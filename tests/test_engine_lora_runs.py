"""LoRA runs from per-adapter blocks: which segments share a bmm pair, and that every row still gets
exactly its own adapter's delta (tiny tensors, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from serving.engine.loader import _one_buffer
from serving.engine.lora_layers import LoraSegmentSpec, MultiTenantLinear, runs_of

D_IN, D_OUT, T = 6, 5, 3
Q, V, K = "layer.0.q", "layer.0.v", "layer.0.k"


def _adapter(seed: int, modules: dict[str, int], scaling: float = 2.0):
    """(lora views, blocks, shape) of an adapter with ``modules`` {path: rank}, packed as the loader does."""
    rng = np.random.default_rng(seed)
    pairs = {
        path: (
            rng.standard_normal((r, D_IN)).astype(np.float32),
            rng.standard_normal((D_OUT, r)).astype(np.float32),
            scaling,
        )
        for path, r in modules.items()
    }
    lora, blocks = _one_buffer(pairs)
    return lora, blocks, tuple(sorted(modules.items())), pairs


def _spec(start: int, end: int, adapter) -> LoraSegmentSpec:
    _, blocks, shape, _ = adapter
    return LoraSegmentSpec(start, end, shape, blocks)


def test_blocks_hold_each_module_side_by_side_and_views_match():
    lora, blocks, _, pairs = _adapter(0, {Q: 2, V: 2, K: 3})
    assert [(b.paths, tuple(b.a.shape), tuple(b.b.shape)) for b in blocks] == [
        ((Q, V), (2, 2, D_IN), (2, 2, D_OUT)),
        ((K,), (1, 3, D_IN), (1, 3, D_OUT)),
    ]
    for block in blocks:
        for m, path in enumerate(block.paths):
            a, b, scaling = pairs[path]
            a_t, b_t = lora[path]
            assert torch.equal(block.a[m], torch.from_numpy(a)) and torch.equal(a_t, block.a[m].t())
            assert torch.equal(block.b[m], torch.from_numpy(b.T * np.float32(scaling)))
            assert b_t.data_ptr() == block.b[m].data_ptr()  # views, not copies
    assert list(lora) == [Q, V, K]  # the spec's order is kept for the per-module views


def test_equal_shapes_and_rows_form_one_run_others_break_it():
    s = [_adapter(i, {Q: 2, V: 2}) for i in range(4)]
    q_only = _adapter(9, {Q: 2})
    segments = [
        _spec(0, 2, s[0]),
        _spec(2, 4, s[1]),
        _spec(4, 6, s[2]),  # rows 0-6: one run of 3
        _spec(6, 8, q_only),  # another shape: alone
        _spec(8, 9, s[3]),  # same shape, 1 row: alone
        _spec(10, 12, s[0]),  # a gap before it (row 9 is a base row): not joined to the previous
        _spec(12, 14, s[1]),
    ]
    runs = runs_of(segments)
    assert [(r.start, r.end, r.count) for r in runs[Q]] == [(0, 6, 3), (6, 8, 1), (8, 9, 1), (10, 14, 2)]
    assert [(r.start, r.end, r.count) for r in runs[V]] == [(0, 6, 3), (8, 9, 1), (10, 14, 2)]
    first = runs[V][0]
    for i, adapter in enumerate(s[:3]):  # segment i of the run reads adapter i's weights
        a_t, b_t = adapter[0][V]
        assert torch.equal(first.a_t[i], a_t) and torch.equal(first.b_t[i], b_t)
    assert runs_of(segments, skip={V}).keys() == {Q}


@pytest.mark.parametrize("rows_cut", [None, 5], ids=["whole-batch", "prefix"])
def test_every_row_gets_its_own_delta(rows_cut):
    """The wrapper's output equals base + x A^T B^T s per segment; rows outside segments get none."""
    adapters = [_adapter(i, {Q: 2, V: 2}) for i in range(3)] + [_adapter(7, {Q: 4})]
    segments = [_spec(1, 3, adapters[0]), _spec(3, 5, adapters[1]), _spec(5, 7, adapters[2])]
    segments.append(_spec(7, 8, adapters[3]))
    base = nn.Linear(D_IN, D_OUT)
    wrapper = MultiTenantLinear(base)
    x = torch.randn(8, T, D_IN)
    rows = 8 if rows_cut is None else rows_cut
    with torch.inference_mode():
        want = base(x[:rows]).clone()
        for seg, adapter in zip(segments, adapters, strict=True):
            a, b, scaling = adapter[3][Q]
            end = min(seg.end, rows)
            if seg.start < end:
                want[seg.start : end] += (
                    x[seg.start : end] @ torch.from_numpy(a).t() @ (torch.from_numpy(b).t() * scaling)
                )
        wrapper.set_context(lora=runs_of(segments)[Q])
        got = wrapper(x[:rows])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], base(x[0]))  # a base row: exactly no delta
