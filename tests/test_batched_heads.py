"""Per-row heads run as ONE batched computation (serving.engine.heads.apply_heads), equal to each head alone."""

from __future__ import annotations

import pytest
import torch

from serving.engine.heads import HeadParams, apply_heads

# (outputs, hidden width or None, activation, bias): one- and two-layer heads, every activation, no bias
TABLE = [
    (3, None, "relu", True),
    (5, 16, "tanh", True),
    (2, 8, "gelu", False),
    (384, None, "relu", False),
    (4, 6, "relu", True),
]


def _head(
    seed: int, outputs: int, hidden: int | None, activation: str, bias: bool, dim: int = 32
) -> HeadParams:
    g = torch.Generator().manual_seed(seed)
    width = hidden or dim
    return HeadParams(
        out_w=torch.randn(outputs, width, generator=g),
        out_b=torch.randn(outputs, generator=g) if bias else None,
        hidden_w=None if hidden is None else torch.randn(hidden, dim, generator=g),
        hidden_b=None if hidden is None or not bias else torch.randn(hidden, generator=g),
        activation=activation,
    )


@pytest.mark.parametrize("order", [list(range(len(TABLE))), list(reversed(range(len(TABLE)))), [1], [0, 3]])
def test_batched_heads_equal_each_head_alone(order):
    heads = [_head(i, *TABLE[i]) for i in order]
    feats = [torch.randn(1 + k % 3, 32) for k in range(len(heads))]
    got = apply_heads(heads, feats)
    for head, x, out in zip(heads, feats, got, strict=True):
        torch.testing.assert_close(out, head(x), atol=1e-5, rtol=1e-5)


def test_engine_answers_every_head_without_calling_one_head_at_a_time(monkeypatch, tmp_path, tiny_bert_dir):
    """The shared path never applies heads one adapter at a time (the batched op answers all of them)."""
    from adapters_store import describe_base, open_store
    from serving.engine import Engine, EngineSettings, InferenceItem
    from tests.test_engine_support import head_bundle

    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    for i in range(6):
        store.put(head_bundle(base, f"t{i}", "h", i, ["a", "b", "c"], hidden=8 if i % 2 else None)[0])
    items = [InferenceItem(f"t{i}", "h", "classify", text=f"text {i % 4}") for i in range(6)]
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    want = engine.infer(items)

    def one_at_a_time(self, x):
        raise AssertionError("a head was applied on its own")

    monkeypatch.setattr(HeadParams, "__call__", one_at_a_time)
    for w, g in zip(want, engine.infer(items), strict=True):
        assert g.labels == w.labels and g.logits == pytest.approx(w.logits, abs=1e-5)
