"""The real all-MiniLM-L6-v2: a folder written by plain PEFT imports unchanged and round-trips byte-identical."""

from __future__ import annotations

import pytest

from adapters_store import describe_base
from tests.helpers.bundles import save_peft_lora


@pytest.mark.integration
@pytest.mark.parametrize("num_labels", [4, None], ids=["seq-cls", "feature-extraction"])
def test_peft_save_pretrained_on_minilm_round_trips(any_store, minilm_path, tmp_path, num_labels):
    base = any_store.register_base(describe_base("minilm", minilm_path))
    folder = save_peft_lora(minilm_path, tmp_path / "peft", r=8, num_labels=num_labels)
    from adapters_store.peft_import import import_peft_dir

    manifest = any_store.put(import_peft_dir(folder, "acme", "intent", base))
    got = any_store.get(f"acme/intent@{manifest.version}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert got.files[name] == (folder / name).read_bytes()
    assert got.manifest.task == ("text-classification" if num_labels else "feature-extraction")
    assert len(got.manifest.labels) == (num_labels or 0)
    # PEFT can load what the store hands back, straight from a folder written from the bundle
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSequenceClassification

    out = got.write_dir(tmp_path / "back")
    model_cls = AutoModelForSequenceClassification if num_labels else AutoModel
    kwargs = {"num_labels": num_labels} if num_labels else {}
    PeftModel.from_pretrained(model_cls.from_pretrained(minilm_path, **kwargs), out)
