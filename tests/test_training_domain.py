"""Domain adaptation: the pieces (gradient reversal, MMD, pseudo-labels) and DANN / MMD / self-training
runs with head and lora on a constructed shift."""

from __future__ import annotations

import random

import pytest
import torch

from tests.training_support import TOY_VOCAB, store_with_base, toy_rows, write_csv
from training import TrainConfig, train
from training.config import TrainConfig as Cfg
from training.domain import DannLoss, MmdLoss, grad_reverse, mmd2, select_pseudo_labels
from training.heads import Head
from training.loop import fit

torch.set_num_threads(2)
SLANG = ["lol", "omg", "pls", "thx", "ugh", "bro", "haha", "yo", "asap", "rn"]


def test_grad_reverse_flips_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.equal(grad_reverse(x, 0.5), x)
    torch.testing.assert_close(x.grad, torch.full((4, 3), -1.0))


def test_mmd_is_small_for_one_distribution_and_large_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    assert mmd2(a, b) < 0.2 * mmd2(a, b + 2.0)


def test_pseudo_labels_above_threshold():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]])
    idx, labels = select_pseudo_labels(probs, 0.9)
    assert idx.tolist() == [0, 2] and labels.tolist() == [0, 1]


class _FeatureLearner:
    """A head on fixed features: the loop's contract without a backbone."""

    def __init__(self, dim: int, hidden: int):
        torch.manual_seed(0)
        self.head = Head(dim, 2, hidden)

    def param_groups(self):
        return [{"params": list(self.head.parameters())}]

    def forward(self, x):
        rep = self.head.representation(x)
        return rep, self.head.out(rep)

    def on_epoch_start(self, epoch):
        pass

    def set_train(self, mode):
        self.head.train(mode)


def _shifted_blobs():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (200,), generator=g)
    centres = torch.tensor([[2.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    src = centres[y] + torch.randn(200, 4, generator=g)
    tgt = centres[y] + torch.randn(200, 4, generator=g) + torch.tensor([0.0, 4.0, -4.0, 3.0])
    return src, tgt, y


@pytest.mark.parametrize("method", ["dann", "mmd"])
def test_alignment_losses_shrink_the_domain_gap(method):
    """On blobs shifted between domains, DANN and MMD both pull the hidden representations together."""
    src, tgt, y = _shifted_blobs()
    data = {"x": src[:160], "y": y[:160], "val_x": src[160:], "val_y": y[160:], "target": tgt}
    gaps = {}
    for use in (False, True):
        ln = _FeatureLearner(4, 16)
        cfg = Cfg(
            store="unused",
            base="b",
            tenant="t",
            name="n",
            epochs=30,
            lr=1e-2,
            batch_size=32,
            progress=False,
            da_weight=1.0,
            domain_adaptation=method if use else "none",
        )
        domain = (DannLoss(16) if method == "dann" else MmdLoss()) if use else None
        result = fit(ln, data, ["a", "b"], cfg, domain)
        assert result.history[-1]["val"]["accuracy"] > 0.9
        with torch.no_grad():
            gaps[use] = mmd2(ln.head.representation(src), ln.head.representation(tgt)).item()
    assert gaps[True] < 0.7 * gaps[False], gaps


@pytest.fixture(scope="module")
def shift_env(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("da")
    rng = random.Random(5)
    target = [{"text": r["text"] + " " + " ".join(rng.choices(SLANG, k=4))} for r in toy_rows(15, seed=9)]
    return {
        "store": store_with_base(root, tiny_bert_dir),
        "csv": write_csv(root / "src.csv", toy_rows(30)),
        "target": write_csv(root / "tgt.csv", target, columns=("text",)),
    }


@pytest.mark.parametrize("strategy", ["head", pytest.param("lora", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["dann", "mmd", "self-training"])
def test_domain_adaptation_trains_and_registers(shift_env, strategy, method):
    extra = {"lr": 1e-2, "epochs": 8} if strategy == "head" else {"lr": 5e-2, "epochs": 6}
    cfg = TrainConfig(
        store=shift_env["store"],
        base="tiny",
        tenant="acme",
        name=f"da-{strategy}-{method}",
        strategy=strategy,
        train_file=shift_env["csv"],
        target_file=shift_env["target"],
        domain_adaptation=method,
        self_training_rounds=1,
        pseudo_label_threshold=0.5,
        progress=False,
        **extra,
    )
    m = train(cfg)
    losses = [h["train_loss"] for h in m.metrics["history"]]
    assert losses[-1] < losses[0]
    assert m.metrics["accuracy"] >= (0.85 if strategy == "head" else 0.6)
    assert m.metadata["train_config"]["domain_adaptation"] == method
    if method == "self-training":
        assert m.metrics["target_examples"] == 45 and m.metrics["pseudo_labelled_per_round"][0] > 0
    if strategy == "head" and method != "self-training":
        assert m.head.hidden == 32  # a trainable representation for the alignment loss


def test_domain_adaptation_needs_target_data(shift_env):
    from training.errors import DatasetError

    cfg = TrainConfig(
        store=shift_env["store"],
        base="tiny",
        tenant="acme",
        name="no-target",
        train_file=shift_env["csv"],
        domain_adaptation="mmd",
        progress=False,
    )
    with pytest.raises(DatasetError, match="needs unlabelled target data"):
        train(cfg)


def test_vocab_is_shared_by_the_shifted_target():
    assert not set(SLANG) & {w for ws in TOY_VOCAB.values() for w in ws}
