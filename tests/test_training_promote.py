"""A full fine-tune promoted to a base, then an adapter trained on the new base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_tensors

from adapters_store.errors import Conflict, ValidationError
from tests.training_support import store_with_base, toy_rows, write_csv
from training import TrainConfig, promote_full_to_base, train

torch.set_num_threads(2)


def test_promote_full_then_train_on_the_new_base(tmp_path, tiny_bert_dir):
    from transformers import AutoModel

    store = store_with_base(tmp_path, tiny_bert_dir)
    data = write_csv(tmp_path / "d.csv", toy_rows(15))
    common = {"store": store, "tenant": "acme", "train_file": data, "progress": False, "epochs": 2}
    full = train(TrainConfig(base="tiny", name="domain", strategy="full", lr=3e-3, **common))
    entry = promote_full_to_base(store, f"acme/domain@{full.version}", "tiny-acme", tmp_path / "new-base")
    assert store.get_base("tiny-acme").fingerprint == entry.fingerprint != store.get_base("tiny").fingerprint
    assert entry.metadata["promoted_from"] == f"acme/domain@{full.version}"
    trained = load_tensors(store.get(f"acme/domain@{full.version}").files["model.safetensors"])
    model = AutoModel.from_pretrained(tmp_path / "new-base")
    torch.testing.assert_close(
        model.state_dict()["encoder.layer.0.output.dense.weight"],
        trained["encoder.layer.0.output.dense.weight"],
    )
    head = train(TrainConfig(base="tiny-acme", name="on-new-base", lr=1e-2, **common))
    assert head.base.name == "tiny-acme" and head.metrics["accuracy"] > 0.5

    with pytest.raises(Conflict, match="not empty"):
        promote_full_to_base(store, f"acme/domain@{full.version}", "tiny-acme-2", tmp_path / "new-base")
    with pytest.raises(ValidationError, match="only 'full' can become a base"):
        promote_full_to_base(store, f"acme/on-new-base@{head.version}", "nope", tmp_path / "nope")
