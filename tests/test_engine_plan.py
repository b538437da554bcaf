"""Batch planning is pure: tested from tables."""

from __future__ import annotations

import pytest

from serving.engine.plan import BASE_SLOT, Segment, assign_slots, chunk_rows, group_rows, plan_batch


@pytest.mark.parametrize(
    ("slots", "rank", "order", "segments", "shared"),
    [
        ([], {}, (), (), 0),
        ([0], {}, (0,), (Segment(0, 0, 1),), 1),
        ([1, 0, 1, 0], {}, (1, 3, 0, 2), (Segment(0, 0, 2), Segment(1, 2, 4)), 4),
        ([2, -1, 2, 0], {}, (1, 3, 0, 2), (Segment(-1, 0, 1), Segment(0, 1, 2), Segment(2, 2, 4)), 4),
        # slot 0 is a partial (late) adapter: it goes last and leaves a shared prefix of 2 rows
        ([0, 1, 0, -1], {0: 1}, (3, 1, 0, 2), (Segment(-1, 0, 1), Segment(1, 1, 2), Segment(0, 2, 4)), 2),
        # two late slots: lower rank first (it starts higher up in the network)
        ([0, 1, 2], {0: 3, 1: 1}, (2, 1, 0), (Segment(2, 0, 1), Segment(1, 1, 2), Segment(0, 2, 3)), 1),
        ([5, 5, 5], {}, (0, 1, 2), (Segment(5, 0, 3),), 3),
    ],
)
def test_plan_batch(slots, rank, order, segments, shared):
    plan = plan_batch(slots, rank)
    assert plan.order == order
    assert plan.segments == segments
    assert plan.shared_rows == shared
    assert sorted(plan.order) == list(range(len(slots)))
    assert plan.slot_of_position() == [slots[i] for i in plan.order]


@pytest.mark.parametrize(
    ("slots", "rank", "groups", "order", "segments"),
    [
        # ungrouped slots first; then the group's slots by row count, so the 2-row ones are adjacent
        (
            [0, 1, 1, 2, 2, 3],
            {},
            {1: "r8", 2: "r8", 3: "r8"},
            (0, 5, 1, 2, 3, 4),
            [(0, 1), (3, 1), (1, 2), (2, 2)],
        ),
        # two groups, in order of their lowest slot; each group's 1-row slot does not split its 2-row run
        (
            [3, 0, 2, 1, 0, 3, 2, 4],
            {},
            {0: "A", 1: "B", 2: "A", 3: "B", 4: "A"},
            (7, 1, 4, 2, 6, 3, 0, 5),
            [(4, 1), (0, 2), (2, 2), (1, 1), (3, 2)],
        ),
        # a late (partial) slot stays last even when it is given a group; base rows stay first
        (
            [0, 1, -1, 2, 1, 0],
            {0: 1},
            {0: "A", 1: "A", 2: "A"},
            (2, 3, 1, 4, 0, 5),
            [(-1, 1), (2, 1), (1, 2), (0, 2)],
        ),
    ],
)
def test_plan_batch_puts_equal_segments_of_a_group_together(slots, rank, groups, order, segments):
    plan = plan_batch(slots, rank, groups)
    assert plan.order == order
    assert [(seg.slot, seg.rows) for seg in plan.segments] == segments
    assert plan.slot_of_position() == [slots[i] for i in plan.order]
    assert plan.shared_rows == sum(1 for s in slots if s not in rank)


@pytest.mark.parametrize(
    ("keys", "slots", "distinct"),
    [
        ([], [], []),
        ([None, None], [BASE_SLOT, BASE_SLOT], []),
        (["x", None, "y", "x"], [0, BASE_SLOT, 1, 0], ["x", "y"]),
        (["b", "a", "b"], [0, 1, 0], ["b", "a"]),
    ],
)
def test_assign_slots(keys, slots, distinct):
    assert assign_slots(keys) == (slots, distinct)


@pytest.mark.parametrize(
    ("rows", "n", "chunks"),
    [([], 3, []), ([1, 2, 3], 3, [[1, 2, 3]]), ([1, 2, 3, 4], 3, [[1, 2, 3], [4]]), ([7], 1, [[7]])],
)
def test_chunk_rows(rows, n, chunks):
    assert chunk_rows(rows, n) == chunks


def test_chunk_rows_refuses_zero():
    with pytest.raises(ValueError):
        chunk_rows([1], 0)


@pytest.mark.parametrize(
    ("keys", "groups"),
    [
        ([], {}),
        ([None], {}),
        (["a", None, "b", "a"], {"a": [0, 3], "b": [2]}),
        ([(1, 2), (1, 2)], {(1, 2): [0, 1]}),
    ],
)
def test_group_rows(keys, groups):
    assert group_rows(keys) == groups
