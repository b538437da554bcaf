"""Fan-out: one input sent to many adapters in ONE engine call. Each answer equals that adapter asked
alone (1e-4); heads on frozen features and the bare base share one backbone pass row per input."""

from __future__ import annotations

import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.engine import forward as engine_forward
from serving.engine.plan import share_rows
from tests.test_engine_support import head_bundle, import_peft, partial_bundle, save_ia3, save_lora

TOL = 1e-4
TEXTS = ["refund my order now please, it arrived broken", "hello", "what time do you open tomorrow"]
LABELS = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("keys", "leaders", "pass_of"),
    [
        ([], [], []),
        ([None, None], [0, 1], [0, 1]),
        ([("t", "x"), ("t", "x"), ("t", "x")], [0], [0, 0, 0]),
        ([("t", "x"), None, ("t", "y"), ("t", "x"), None], [0, 1, 2, 4], [0, 1, 2, 0, 3]),
        ([None, ("t", "x"), ("t", "x")], [0, 1], [0, 1, 1]),
    ],
)
def test_share_rows(keys, leaders, pass_of):
    assert share_rows(keys) == (leaders, pass_of)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_bert_dir):
    """acme: 12 heads (mean/cls pooling, one with a hidden layer, two embedding heads), 3 LoRAs, an IA3
    and a partial fine-tune."""
    root = tmp_path_factory.mktemp("fanout")
    store = open_store(root / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    for i in range(12):
        labels = None if i >= 10 else LABELS
        bundle, _ = head_bundle(
            base,
            "acme",
            f"head{i}",
            seed=i,
            labels=labels,
            pooling=("mean", "cls")[i % 2],
            hidden=16 if i == 3 else None,
        )
        store.put(bundle)
    for i in range(3):
        d = save_lora(
            tiny_bert_dir,
            root / f"lora{i}",
            seed=50 + i,
            r=4,
            alpha=8,
            targets=["query", "value"],
            num_labels=3,
        )
        store.put(import_peft(d, "acme", f"lora{i}", base, labels=LABELS))
    d = save_ia3(tiny_bert_dir, root / "ia3", seed=60)
    store.put(import_peft(d, "acme", "ia3", base))
    store.put(partial_bundle(tiny_bert_dir, base, "acme", "partial", seed=70, first=1, labels=LABELS)[0])
    return Engine(store, base="tiny", settings=EngineSettings(threads=1))


HEADS = [f"head{i}" for i in range(12)]
OTHERS = ["lora0", "lora1", "lora2", "ia3", "partial"]
EMBEDDERS = {None, "head10", "head11", "ia3"}


def fanned(text: str, adapters: list[str | None]) -> list[InferenceItem]:
    """What the service makes of ``{"text": ..., "adapters": [...]}``: one row per adapter."""
    return [InferenceItem("acme", a, "embed" if a in EMBEDDERS else "classify", text=text) for a in adapters]


def close(a, b) -> bool:
    x = torch.tensor(a.logits if a.logits is not None else a.embedding)
    y = torch.tensor(b.logits if b.logits is not None else b.embedding)
    return x.shape == y.shape and torch.allclose(x, y, atol=TOL, rtol=0)


@pytest.fixture
def passes(monkeypatch):
    """Rows of every backbone pass the engine runs."""
    seen: list[int] = []
    real = engine_forward.run_model

    def counting(model, inputs):
        seen.append(int(next(iter(inputs.values())).shape[0]))
        return real(model, inputs)

    monkeypatch.setattr(engine_forward, "run_model", counting)
    return seen


def test_each_fanned_out_answer_equals_that_adapter_alone(engine):
    adapters = [None, *HEADS, *OTHERS]
    rows = [row for text in TEXTS for row in fanned(text, adapters)]
    together = engine.infer(rows)
    assert len(together) == len(rows) == len(TEXTS) * 18
    for row, answer in zip(rows, together, strict=True):
        alone = engine.infer([row])[0]
        assert not isinstance(answer, Exception), answer
        assert answer.adapter == alone.adapter and answer.digest == alone.digest
        assert close(answer, alone), (row.adapter, row.text)
        if row.task == "classify":
            assert answer.labels == alone.labels
    # the adapters really differ, so equality above is not trivial
    logits = {tuple(round(x, 3) for x in a.logits) for a in together[:18] if a.logits is not None}
    embeddings = {tuple(round(x, 3) for x in a.embedding) for a in together[:18] if a.embedding is not None}
    assert len(logits) == 10 + 3 + 1 and len(embeddings) == 4


def test_heads_and_the_bare_base_share_one_backbone_pass_per_input(engine, passes):
    answers = engine.infer(fanned(TEXTS[0], [None, *HEADS]))
    assert passes == [1]  # 13 answers, one backbone row
    assert all(not isinstance(a, Exception) for a in answers)
    passes.clear()
    engine.infer([row for text in TEXTS for row in fanned(text, HEADS)])
    assert passes == [len(TEXTS)]


def test_lora_rows_keep_their_own_pass_rows_next_to_the_shared_one(engine, passes):
    engine.infer(fanned(TEXTS[1], [*HEADS, "lora0", "lora1", "ia3"]))
    assert passes == [1 + 3]
    passes.clear()
    engine.infer(fanned(TEXTS[1], [*HEADS[:2], "lora0", "partial"]))  # a partial adds its own rows
    assert passes == [3]


def test_token_counts_come_back_per_row(engine):
    short, longer = engine.infer(fanned("hello", ["head0"]) + fanned(TEXTS[0], ["lora0"]))
    assert 1 < short.tokens < longer.tokens
