"""Image LoRA: transformers 5 renames ViT modules at load (``layers.0.attention.q_proj``), and PEFT saves
those names. The base entry records them, so the store accepts the bundle and the engine serves it exactly
as PEFT computes it."""

from __future__ import annotations

import numpy as np
import torch

from adapters_store import describe_base, open_store
from adapters_store.peft_import import import_peft_dir


def test_vit_lora_is_accepted_and_served_like_peft(tiny_vit_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from serving.engine import Engine, EngineSettings, InferenceItem

    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("vit", tiny_vit_dir))
    assert "layers.0.attention.q_proj.weight" in base.module_tensors
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=3)
    peft = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "peft")
    bundle = import_peft_dir(
        tmp_path / "peft",
        "acme",
        "vit-lora",
        base,
        task="image-classification",
        labels=["a", "b", "c"],
        pooling="cls",
    )
    assert store.put(bundle).version == 1

    image = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    result = Engine(store, base="vit", settings=EngineSettings()).infer(
        [InferenceItem("acme", "vit-lora@1", "classify", image=image)]
    )[0]
    pixels = AutoImageProcessor.from_pretrained(tiny_vit_dir)(images=[image], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        reference = peft.eval()(pixel_values=pixels).logits[0].numpy()
    assert np.abs(reference - np.array(result.logits)).max() < 1e-4
    assert np.abs(reference).max() > 1e-3  # the check compares real numbers, not zeros
