"""Round trip: train -> put -> serving engine loads -> its logits equal the trained model's own output.

All five strategies are served together in one mixed engine batch, so the test also covers the engine
picking each row's adapter. The text bundles are trained with a short ``max_seq_len`` and served texts
far longer than it: the engine must prepare each row the way its bundle was trained
(adapters_store/preparation.py). Images larger than the training ones and waveforms longer than the
training ones are served too.
"""

from __future__ import annotations

import pytest
import torch

from serving.engine import Engine, EngineSettings, InferenceItem
from tests.training_support import store_with_base, toy_rows, write_csv
from training import TrainConfig, train_bundle
from training.loop import predict_proba

torch.set_num_threads(2)

RUNS = {
    "head": {"lr": 1e-2, "epochs": 3, "head_hidden": 16, "head_activation": "gelu"},
    "lora": {"lr": 5e-2, "epochs": 2},
    "ia3": {"lr": 0.3, "epochs": 2},
    "partial": {"lr": 3e-3, "epochs": 2, "top_k": 1, "pooling": "pooler"},
    "full": {"lr": 3e-3, "epochs": 2, "pooling": "cls"},
}
TRAIN_LEN = 8  # tokens: far shorter than LONG texts and than the engine's default limit (256)
LONG = [
    "refund my invoice please the charge on my card was wrong twice and the receipt shows a price "
    "that I never agreed to so I want my money back",
    "password reset locked again after the login page said my username and account were fine",
    "the courier said the parcel would arrive on tuesday but tracking still shows the truck at the depot",
]
TEXTS = ["refund my invoice please", "password reset locked", "where is my parcel courier", "hello", *LONG]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("roundtrip")
    store = store_with_base(root, tiny_bert_dir)
    data = write_csv(root / "toy.csv", toy_rows(15))
    out = {}
    for strategy, opts in RUNS.items():
        cfg = TrainConfig(
            store=store,
            base="tiny",
            tenant="acme",
            name=f"rt-{strategy}",
            strategy=strategy,
            train_file=data,
            progress=False,
            max_seq_len=TRAIN_LEN,
            **opts,
        )
        outcome = train_bundle(cfg, store)
        manifest = store.put(outcome.bundle)
        assert manifest.max_seq_len == TRAIN_LEN
        out[strategy] = (manifest, outcome.learner)
    return store, out


def own_logits(learner, texts) -> torch.Tensor:
    learner.set_train(False)
    with torch.no_grad():
        return learner.forward(learner.prepare(texts))[1]


def test_engine_serves_every_strategy_like_training_did(trained):
    """Texts longer than the training length included: served as truncated in training (issue 16)."""
    store, out = trained
    engine = Engine(store, base="tiny", settings=EngineSettings())
    items = [
        InferenceItem("acme", f"rt-{s}@{m.version}", "classify", text=t)
        for s, (m, _) in out.items()
        for t in TEXTS
    ]
    results = engine.infer(items)
    for i, (strategy, (manifest, learner)) in enumerate(out.items()):
        rows = results[i * len(TEXTS) : (i + 1) * len(TEXTS)]
        assert all(not isinstance(r, Exception) for r in rows), (strategy, rows)
        served = torch.tensor([r.logits for r in rows])
        torch.testing.assert_close(
            served, own_logits(learner, TEXTS), atol=2e-5, rtol=1e-4, msg=lambda m, s=strategy: f"{s}: {m}"
        )
        assert {r.version for r in rows} == {manifest.version}
        probs = predict_proba(learner, learner.prepare(TEXTS), 8)
        assert [r.labels[0] for r in rows] == [manifest.labels[j] for j in probs.argmax(-1).tolist()]


# transformers 5 names ViT blocks 'layers.N' (q_proj, mlp.fc1...) in memory while bundles hold the
# checkpoint names (encoder.layer.N.attention.attention.query...): partial and full must be renamed.
@pytest.mark.parametrize("strategy", ["head", "lora", "ia3", "partial", "full"])
def test_engine_serves_a_vit_image_adapter_like_training_did(tmp_path, tiny_vit_dir, strategy):
    import numpy as np

    from adapters_store import describe_base, open_store
    from training.media import arrays_data

    store = open_store(tmp_path / "store")
    store.register_base(describe_base("vit", tiny_vit_dir))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 16, 16, 3)).astype(np.uint8)
    labels = ["a" if img[:8].mean() > img[8:].mean() else "b" for img in images]
    cfg = TrainConfig(
        store=store,
        base="vit",
        tenant="acme",
        name="img",
        strategy=strategy,
        top_k=1,
        task="image-classification",
        epochs=2,
        lr={"lora": 5e-2, "ia3": 0.3}.get(strategy, 1e-2),
        progress=False,
    )
    outcome = train_bundle(cfg, store, train_data=arrays_data(images, labels))
    manifest = store.put(outcome.bundle)
    assert manifest.max_seq_len is None  # images have no per-bundle length
    engine = Engine(store, base="vit", settings=EngineSettings())
    larger = list(rng.integers(0, 255, (3, 40, 40, 3)).astype(np.uint8))  # resized by the processor
    shown = [*images[:4], *larger]
    results = engine.infer(
        [InferenceItem("acme", f"img@{manifest.version}", "classify", image=im) for im in shown]
    )
    assert all(not isinstance(r, Exception) for r in results), results
    served = torch.tensor([r.logits for r in results])
    torch.testing.assert_close(served, own_logits(outcome.learner, shown), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["head", "partial", "full"])  # lora/ia3 do not train on audio
def test_engine_serves_an_audio_adapter_like_training_did_on_longer_waves(tmp_path, strategy):
    import numpy as np

    from adapters_store import describe_base, open_store
    from tests.helpers.models import make_tiny_wav2vec2
    from training.media import arrays_data

    store = open_store(tmp_path / "store")
    store.register_base(describe_base("w2v", make_tiny_wav2vec2(tmp_path / "w2v")))
    rng = np.random.default_rng(0)

    def tone(freq: float, length: int) -> np.ndarray:
        t = np.arange(length) / 16000
        return (np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(length)).astype(
            np.float32
        )

    waves = [tone((200.0, 3000.0)[i % 2], 3200) for i in range(12)]
    labels = [("low", "high")[i % 2] for i in range(12)]
    cfg = TrainConfig(
        store=store,
        base="w2v",
        tenant="acme",
        name="tones",
        strategy=strategy,
        top_k=1,
        task="audio-classification",
        epochs=2,
        lr=1e-2,
        batch_size=6,
        progress=False,
    )
    outcome = train_bundle(cfg, store, train_data=arrays_data(waves, labels))
    manifest = store.put(outcome.bundle)
    longer = [tone(200.0, 9600), tone(3000.0, 12000)]  # 3-4x the training length
    shown = [waves[0], *longer]
    results = Engine(store, base="w2v", settings=EngineSettings()).infer(
        [InferenceItem("acme", f"tones@{manifest.version}", "classify", audio=w) for w in shown]
    )
    assert all(not isinstance(r, Exception) for r in results), results
    outcome.learner.set_train(False)
    with torch.no_grad():  # each wave alone: audio rows carry no padding mask
        own = torch.cat([outcome.learner.forward(outcome.learner.prepare([w]))[1] for w in shown])
    torch.testing.assert_close(torch.tensor([r.logits for r in results]), own, atol=2e-5, rtol=1e-4)


def test_embedding_adapter_is_served_as_embeddings(tmp_path, tiny_bert_dir):
    """task feature-extraction: a LoRA trained through an unsaved probe; the engine's 'embed' rows equal
    the trained model's pooled features."""
    store = store_with_base(tmp_path, tiny_bert_dir)
    cfg = TrainConfig(
        store=store,
        base="tiny",
        tenant="acme",
        name="emb",
        strategy="lora",
        task="feature-extraction",
        train_file=write_csv(tmp_path / "d.csv", toy_rows(15)),
        lr=5e-2,
        epochs=6,
        progress=False,
    )
    outcome = train_bundle(cfg, store)
    m = store.put(outcome.bundle)
    assert (m.kind, m.task, m.labels, m.pooling) == ("lora", "feature-extraction", [], "mean")
    assert m.metrics["probe_labels"] == ["billing", "login", "shipping"] and m.metrics["accuracy"] > 0.6
    results = Engine(store, base="tiny", settings=EngineSettings()).infer(
        [InferenceItem("acme", f"emb@{m.version}", "embed", text=t) for t in TEXTS]
    )
    assert all(not isinstance(r, Exception) for r in results), results
    outcome.learner.set_train(False)
    with torch.no_grad():
        own = outcome.learner.embed(TEXTS)
    torch.testing.assert_close(torch.tensor([r.embedding for r in results]), own, atol=2e-5, rtol=1e-4)
