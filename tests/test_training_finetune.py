"""Discriminative learning rates and gradual unfreezing for partial / full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from tests.training_support import store_with_base, toy_rows, write_csv
from training import TrainConfig, train
from training.backbone import load_backbone
from training.errors import TrainConfigError
from training.heads import Head
from training.learners.finetune import FinetuneLearner

torch.set_num_threads(2)


def cfg(store="unused", **kw) -> TrainConfig:
    return TrainConfig(store=store, base="tiny", tenant="acme", name="ft", progress=False, **kw)


def learner(folder, **kw) -> FinetuneLearner:
    c = cfg(**kw)
    return FinetuneLearner(load_backbone(folder), lambda x: x, "pooler", Head(32, 3), c)


def test_layer_wise_lr_decay_groups(tiny_bert_dir):
    ln = learner(tiny_bert_dir, strategy="full", lr=1e-2, backbone_lr=1e-3, layer_lr_decay=0.5)
    groups = ln.param_groups()
    # head, [pooler + block 1], block 0, embeddings
    assert [g.get("lr") for g in groups] == pytest.approx([1e-2, 1e-3, 5e-4, 2.5e-4])
    names = [n for n, _ in ln.units[0]]
    assert any(n.startswith("pooler.") for n in names) and all("layer.0." not in n for n in names)
    assert any(n.startswith("embeddings.") for n, _ in ln.units[-1])


def test_partial_trains_only_top_k(tiny_bert_dir):
    ln = learner(tiny_bert_dir, strategy="partial", top_k=1)
    trainable = {n for n, p in ln.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in trainable)
    with pytest.raises(TrainConfigError, match="top_k=3 but the base has 2 blocks"):
        learner(tiny_bert_dir, strategy="partial", top_k=3)


def test_gradual_unfreezing_schedule(tiny_bert_dir):
    ln = learner(tiny_bert_dir, strategy="full", unfreeze_every=2)

    def unfrozen() -> int:
        return sum(any(p.requires_grad for _, p in unit) for unit in ln.units)

    counts = []
    for epoch in range(1, 10):
        ln.on_epoch_start(epoch)
        counts.append(unfrozen())
    assert counts == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_gradually_unfrozen_full_run_leaves_lower_weights_untouched(tmp_path, tiny_bert_dir):
    """3 epochs, one unit every epoch: the head, then the top block, then block 0; never the embeddings."""
    store = store_with_base(tmp_path, tiny_bert_dir)
    data = write_csv(tmp_path / "d.csv", toy_rows(20))
    m = train(
        cfg(
            store,
            strategy="full",
            train_file=data,
            epochs=3,
            unfreeze_every=1,
            lr=1e-2,
            layer_lr_decay=0.8,
            restore_best=False,
        )
    )
    trained = load_tensors(store.get(f"acme/ft@{m.version}").files["model.safetensors"])
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert torch.equal(
        trained["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"]
    )
    assert not torch.equal(
        trained["encoder.layer.1.output.dense.weight"], base["encoder.layer.1.output.dense.weight"]
    )
    assert not torch.equal(
        trained["encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"]
    )
    assert m.metadata["train_config"]["layer_lr_decay"] == 0.8


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(TrainConfigError, match="layer_lr_decay applies"):
        cfg(strategy="lora", layer_lr_decay=0.5)
    with pytest.raises(TrainConfigError, match="feature-extraction trains an embedding adapter"):
        cfg(strategy="head", task="feature-extraction")
    with pytest.raises(TrainConfigError, match="domain adaptation works with strategy head or lora"):
        cfg(strategy="full", domain_adaptation="dann")
