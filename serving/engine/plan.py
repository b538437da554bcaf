"""Batch planning as pure functions: which row uses which adapter slot, and which rows share a segment.

A mixed batch is reordered so that rows of one adapter are contiguous (a *segment*); the layer
wrappers then run one pair of matmuls per segment on a view of the activations, with no gather or
copy. Slots of one *group* (LoRA adapters of the same modules and ranks) with the same row count are
put next to each other, so such a run of segments is one contiguous block that a layer views as
``[segments, rows * T, in]`` and serves with ONE bmm pair instead of a matmul pair per segment.
Slots marked *late* (partial fine-tunes, which replace the top blocks) are put last, so every other
row forms one contiguous prefix ``[0, shared_rows)`` that the base blocks run on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

BASE_SLOT = -1  # rows with no adapter


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, end)`` of the planned batch all use adapter ``slot``."""

    slot: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MixedBatchPlan:
    """How one forward pass lays out its rows.

    order:       planned position -> original row index (len = batch rows)
    segments:    contiguous runs of one slot, in planned order, covering every row exactly once
    shared_rows: rows ``[0, shared_rows)`` use no late slot
    """

    order: tuple[int, ...]
    segments: tuple[Segment, ...]
    shared_rows: int

    def slot_of_position(self) -> list[int]:
        out: list[int] = []
        for seg in self.segments:
            out.extend([seg.slot] * seg.rows)
        return out


def plan_batch(
    slots: Sequence[int], late: Mapping[int, int] | None = None, groups: Mapping[int, Hashable] | None = None
) -> MixedBatchPlan:
    """Group rows by slot (stable within a slot), late slots last in increasing ``late[slot]`` rank.

    ``late`` maps a late slot to its rank (>= 1); the engine ranks partial adapters so that those whose
    own blocks start higher up come first, which keeps the rows on base blocks a prefix at every layer.
    ``groups`` maps a slot to a group key: slots without one come first (by slot), then each group's
    slots (groups in order of their lowest slot) by row count, then slot, so equal-sized segments of
    one group are adjacent. Late slots ignore ``groups``.

    >>> plan_batch([2, -1, 2, 0]).order
    (1, 3, 0, 2)
    >>> plan_batch([0, 1, 1, 2, 3], groups={0: "r8", 1: "r8", 3: "r8"}).order
    (3, 0, 4, 1, 2)
    """
    rank = dict(late or {})
    group = {s: g for s, g in (groups or {}).items() if s not in rank}
    counts = Counter(slots)
    index: dict[Hashable, int] = {}
    for s in sorted(group):
        index.setdefault(group[s], len(index) + 1)

    def key(i: int) -> tuple[int, int, int, int]:
        s = slots[i]
        if s in group:
            return (0, index[group[s]], counts[s], s)
        return (rank.get(s, 0), 0, 0, s)

    order = tuple(sorted(range(len(slots)), key=key))
    segments = _segments([slots[i] for i in order])
    shared = sum(s.rows for s in segments if s.slot not in rank)
    return MixedBatchPlan(order=order, segments=tuple(segments), shared_rows=shared)


def _segments(ordered_slots: Sequence[int]) -> list[Segment]:
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(ordered_slots) + 1):
        if i == len(ordered_slots) or ordered_slots[i] != ordered_slots[start]:
            segments.append(Segment(ordered_slots[start], start, i))
            start = i
    return segments


def chunk_rows(rows: Sequence[int], max_rows: int) -> list[list[int]]:
    """Split row indices into forward passes of at most ``max_rows``.

    >>> chunk_rows([5, 6, 7], 2)
    [[5, 6], [7]]
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    return [list(rows[i : i + max_rows]) for i in range(0, len(rows), max_rows)]


def group_rows(keys: Sequence[Hashable | None]) -> dict[Hashable, list[int]]:
    """Row indices per key, keys and rows in first-seen order; ``None`` keys (failed rows) are dropped.

    >>> group_rows(["a", None, "b", "a"])
    {'a': [0, 3], 'b': [2]}
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return groups


def assign_slots(keys: Sequence[Hashable | None]) -> tuple[list[int], list[Hashable]]:
    """Map each row's adapter key to a dense slot index; ``None`` (bare base) -> :data:`BASE_SLOT`.

    >>> assign_slots(["x", None, "y", "x"])
    ([0, -1, 1, 0], ['x', 'y'])
    """
    index: dict[Hashable, int] = {}
    slots = [BASE_SLOT if k is None else index.setdefault(k, len(index)) for k in keys]
    return slots, list(index)


def share_rows(keys: Sequence[Hashable | None]) -> tuple[list[int], list[int]]:
    """Fan-out planning: rows with the same non-``None`` key need the same backbone pass (same input,
    adapters that leave the backbone untouched: heads on frozen features, the bare base), so they share
    ONE pass row. ``None`` rows always get a pass row of their own.

    Returns ``(leaders, pass_of)``: ``leaders[p]`` is the first row that pass row ``p`` stands for
    (len = pass rows); ``pass_of[i]`` is the pass row of row ``i`` (len = rows).

    >>> share_rows([("t", "hi"), None, ("t", "hi"), ("t", "yo")])
    ([0, 1, 3], [0, 1, 0, 2])
    """
    leaders: list[int] = []
    first: dict[Hashable, int] = {}
    pass_of: list[int] = []
    for i, key in enumerate(keys):
        if key is None or key not in first:
            if key is not None:
                first[key] = len(leaders)
            pass_of.append(len(leaders))
            leaders.append(i)
        else:
            pass_of.append(first[key])
    return leaders, pass_of
