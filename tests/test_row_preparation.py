"""One rule for how a row is prepared per bundle (adapters_store/preparation.py), and the engine's
tokenisation of a batch whose rows have different lengths."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapters_store.preparation import RowPreparation


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (SimpleNamespace(max_seq_len=32, metadata={}), 32),
        (SimpleNamespace(max_seq_len=None, metadata={"train_config": {"max_seq_len": 48}}), 48),  # older
        (SimpleNamespace(max_seq_len=None, metadata={"train_config": {"max_seq_len": "48"}}), None),
        (SimpleNamespace(max_seq_len=None, metadata={"train_config": {"max_seq_len": True}}), None),
        (SimpleNamespace(max_seq_len=None, metadata={"train_config": {"max_seq_len": 10**6}}), None),
        (SimpleNamespace(max_seq_len=None, metadata={}), None),  # a pushed PEFT folder
    ],
)
def test_recorded_length(manifest, expected):
    assert RowPreparation.of(manifest).max_seq_len == expected


def test_text_length_is_capped_by_the_server_limit():
    assert RowPreparation(32).text_length(256) == 32
    assert RowPreparation(512).text_length(256) == 256
    assert RowPreparation(None).text_length(256) == 256


def test_manifest_digest_is_unchanged_when_no_length_is_recorded(tiny_bert_dir):
    """Bundles stored before ``max_seq_len`` existed keep their digest (the engine's cache key)."""
    import hashlib
    import json

    from adapters_store import describe_base
    from tests.helpers.bundles import head_bundle

    m = head_bundle(describe_base("tiny", tiny_bert_dir)).manifest
    assert m.max_seq_len is None
    body = m.model_dump(mode="json", exclude={"version", "created_at", "max_seq_len"})
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m.digest == expected
    assert m.model_copy(update={"max_seq_len": 16}).digest != m.digest  # the length answers rows too


def test_rows_of_different_lengths_share_one_padded_batch(tiny_bert_dir):
    from transformers import AutoTokenizer

    from serving.engine.backbone import encode_texts

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    backbone = SimpleNamespace(
        preprocessor=tok,
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128, model_type="bert")),
    )
    texts = [
        "a fairly long text about refunds invoices and charges on my card",
        "short one",
        "another long text here",
    ]
    enc = encode_texts(backbone, texts, [6, 64, 10])
    for i, (text, n) in enumerate(zip(texts, [6, 64, 10], strict=True)):
        alone = tok([text], truncation=True, max_length=n, return_tensors="pt")
        width = alone["input_ids"].shape[1]
        assert torch.equal(enc["input_ids"][i, :width], alone["input_ids"][0])
        assert int(enc["attention_mask"][i].sum()) == width  # the rest is padding
    lengths = [
        len(tok([t], truncation=True, max_length=n)["input_ids"][0])
        for t, n in zip(texts, [6, 64, 10], strict=True)
    ]
    assert enc["input_ids"].shape[1] == max(lengths)
