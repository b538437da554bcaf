"""Result building for one adapter's rows (forward.answer_rows): ranking, scores and embeddings are
computed for all rows at once; each row must read exactly what a per-row computation gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adapters_store.errors import ValidationError
from adapters_store.preparation import RowPreparation
from serving.engine import EngineSettings, InferenceItem
from serving.engine.forward import PreparedRow, answer_rows

LABELS = ["neg", "neu", "pos", "other"]


def _adapter(head, task="text-classification", normalize=False, labels=LABELS):
    manifest = SimpleNamespace(tenant="acme", name="intent", labels=labels, task=task, normalize=normalize)
    return SimpleNamespace(manifest=manifest, head=head, preparation=RowPreparation())


def _rows(adapter, tasks):
    return [
        PreparedRow(InferenceItem("acme", "intent", t, text=f"row {i}"), adapter, 3, "d1g3st")
        for i, t in enumerate(tasks)
    ]


def test_rows_of_one_segment_each_get_their_own_ranking_scores_and_embedding():
    torch.manual_seed(0)
    feats = torch.randn(5, 8)
    logits = torch.randn(5, len(LABELS))
    logits[2] = torch.tensor([1.0, 3.0, 1.0, 3.0])  # ties: the manifest's label order decides
    adapter = _adapter(lambda x: logits)
    tasks = ["classify", "embed", "classify", "classify", "embed"]
    out = answer_rows(_rows(adapter, tasks), adapter, feats, [7, 8, 9, 10, 11], EngineSettings())
    for i, (task, res) in enumerate(zip(tasks, out, strict=True)):
        assert (res.adapter, res.version, res.digest, res.tokens) == ("acme/intent", 3, "d1g3st", 7 + i)
        if task == "embed":
            assert res.embedding == feats[i].tolist() and res.labels is None
            continue
        probs = torch.softmax(logits[i], dim=-1).tolist()
        ranked = sorted(range(len(LABELS)), key=lambda j: (-probs[j], j))
        assert res.labels == [LABELS[j] for j in ranked]
        assert res.scores == [probs[j] for j in ranked]
        assert res.logits == logits[i].tolist() and res.embedding is None
    assert out[2].labels == ["neu", "other", "neg", "pos"]


def test_bare_base_rows_and_normalised_embedders():
    feats = torch.randn(3, 6)
    rows = [PreparedRow(InferenceItem("t", None, "embed", text="x"), None, None, None)] * 3
    out = answer_rows(rows, None, feats, [None] * 3, EngineSettings(base_normalize=True))
    assert [r.embedding for r in out] == F.normalize(feats, dim=-1).tolist()
    assert all(r.adapter is None and r.tokens is None for r in out)
    emb = _adapter(lambda x: 2 * x, task="feature-extraction", normalize=True, labels=None)
    out = answer_rows(_rows(emb, ["embed", "embed"]), emb, feats[:2], [1, 2], EngineSettings())
    assert [r.embedding for r in out] == F.normalize(2 * feats[:2], dim=-1).tolist()


def test_a_head_that_does_not_match_the_labels_is_refused():
    adapter = _adapter(lambda x: torch.zeros(2, 3))
    with pytest.raises(ValidationError, match="3 outputs for 4 labels"):
        answer_rows(
            _rows(adapter, ["classify", "embed"]), adapter, torch.zeros(2, 4), [1, 1], EngineSettings()
        )


def test_result_building_runs_on_one_thread_and_restores_the_setting():
    from serving.engine.forward import single_threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), single_threaded():
            assert torch.get_num_threads() == 1
            raise RuntimeError("a failing head")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
