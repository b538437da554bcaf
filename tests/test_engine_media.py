"""Audio (Wav2Vec2) and CLIP image bases: heads trained by ``training`` are served exactly as trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from adapters_store.errors import ValidationError
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from tests.helpers.models import make_tiny_clip, make_tiny_wav2vec2
from training import TrainConfig, train_bundle
from training.media import arrays_data

torch.set_num_threads(1)


def tones(n: int, length: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    t = np.arange(length) / 16000
    rng = np.random.default_rng(seed)
    waves, labels = [], []
    for i in range(n):
        label, freq = (("low", 200.0), ("high", 3000.0))[i % 2]
        wave = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(length)
        waves.append(wave.astype(np.float32))
        labels.append(label)
    return waves, labels


@pytest.fixture(scope="module")
def audio_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    store = open_store(root / "store")
    store.register_base(describe_base("w2v", make_tiny_wav2vec2(root / "w2v")))
    outcome, manifest = train_head(store, "w2v", "tones", "audio-classification", *tones(16, 4000, seed=0))
    return store, outcome.learner, manifest


def train_head(store, base: str, name: str, task: str, inputs: list, labels: list[str]):
    """A head trained by ``training`` on in-memory inputs, stored: (outcome, manifest)."""
    cfg = TrainConfig(
        store=store,
        base=base,
        tenant="acme",
        name=name,
        task=task,
        lr=2e-2,
        epochs=4,
        batch_size=8,
        progress=False,
    )
    outcome = train_bundle(cfg, store, train_data=arrays_data(inputs, labels))
    return outcome, store.put(outcome.bundle)


def learner_logits(learner, waves) -> torch.Tensor:
    learner.set_train(False)
    with torch.no_grad():
        return torch.cat([learner.forward(learner.prepare([w]))[1] for w in waves])  # each alone


def test_audio_rows_of_several_lengths_match_training_row_by_row(audio_world):
    store, learner, manifest = audio_world
    short, _ = tones(3, 3200, seed=1)
    long_, _ = tones(3, 4800, seed=2)
    waves = [short[0], long_[0], short[1], long_[1], short[2], long_[2]]  # interleaved lengths
    engine = Engine(store, base="w2v", settings=EngineSettings(threads=1))
    assert engine.backbone.modality == "audio" and engine.backbone.sampling_rate == 16000
    items = [InferenceItem("acme", "tones", "classify", audio=w) for w in waves]
    items.append(InferenceItem("acme", None, "embed", audio=short[0]))  # the bare base embeds audio too
    results = engine.infer(items)
    assert all(isinstance(r, InferenceResult) for r in results), results
    served = torch.tensor([r.logits for r in results[:6]])
    torch.testing.assert_close(served, learner_logits(learner, waves), atol=2e-5, rtol=1e-4)
    assert {r.version for r in results[:6]} == {manifest.version}
    assert len(results[6].embedding) == 32


def test_wrong_inputs_for_an_audio_base_fail_alone(audio_world):
    store, _, _ = audio_world
    engine = Engine(store, base="w2v", settings=EngineSettings(threads=1))
    good, _ = tones(1, 4000, seed=3)
    bad = [
        InferenceItem("acme", "tones", "classify", text="not audio"),
        InferenceItem("acme", "tones", "classify", audio=good[0].astype(np.float64)),
        InferenceItem("acme", "tones", "classify", audio=np.zeros((2, 4000), np.float32)),
        InferenceItem("acme", "tones", "classify", audio=np.zeros(100, np.float32)),
        InferenceItem("acme", "tones", "classify", audio=np.full(4000, np.nan, np.float32)),
    ]
    results = engine.infer([*bad, InferenceItem("acme", "tones", "classify", audio=good[0])])
    assert all(isinstance(r, ValidationError) for r in results[:-1]), results
    assert isinstance(results[-1], InferenceResult)


def test_clip_image_head_is_served_on_the_projected_embedding(tmp_path):
    store = open_store(tmp_path / "store")
    store.register_base(describe_base("clip", make_tiny_clip(tmp_path / "clip")))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(16)]
    labels = ["bright" if im.mean() > 127 else "dark" for im in images]
    outcome, manifest = train_head(store, "clip", "light", "image-classification", images, labels)
    assert manifest.pooling == "pooler" and manifest.head.in_features == 24  # the projection width
    engine = Engine(store, base="clip", settings=EngineSettings(threads=1))
    assert engine.backbone.modality == "image"
    items = [InferenceItem("acme", "light", "classify", image=im) for im in images[:5]]
    items.append(InferenceItem("acme", None, "embed", image=images[0]))
    results = engine.infer(items)
    assert all(isinstance(r, InferenceResult) for r in results), results
    served = torch.tensor([r.logits for r in results[:5]])
    torch.testing.assert_close(served, learner_logits(outcome.learner, images[:5]), atol=2e-5, rtol=1e-4)
    [text_row] = engine.infer([InferenceItem("acme", "light", "classify", text="no text tower here")])
    assert isinstance(text_row, ValidationError)
