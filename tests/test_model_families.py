"""One base-model table (adapters_store.model_families) that training and serving both read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters_store import model_families as mf

torch.set_num_threads(1)


def _tiny(model_type: str):
    """A tiny random model of ``model_type`` and a dummy batch for it."""
    import transformers as tf

    pixels = {"pixel_values": torch.randn(2, 3, 32, 32)}
    if model_type == "convnext":
        cfg = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_channels=3)
    elif model_type == "regnet":
        cfg = tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)
    elif model_type == "beit":
        cfg = tf.BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            image_size=32, patch_size=8, use_mean_pooling=True)  # fmt: skip
    elif model_type == "resnet":
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    elif model_type == "vit":
        cfg = tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8)  # fmt: skip
    else:
        cfg = tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        ids = torch.randint(0, 100, (2, 5))
        return tf.AutoModel.from_config(cfg).eval(), {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
        }
    return tf.AutoModel.from_config(cfg).eval(), pixels


@pytest.mark.parametrize("model_type", ["bert", "vit", "resnet", "convnext", "regnet", "beit"])
def test_feature_size_and_default_pooling_fit_what_the_model_returns(model_type):
    """Training's feature_dim once raised for ConvNeXt, and BEiT/RegNet counted as text there."""
    from training.backbone import feature_dim, pool

    model, inputs = _tiny(model_type)
    fam = mf.family(model.config)
    assert fam.modality == ("text" if model_type == "bert" else "image")
    pooling = mf.default_pooling(model.config, "text-classification" if model_type == "bert" else "x", "lora")
    with torch.inference_mode():
        trained = pool(model, inputs, pooling)  # how training pools
        hidden, pooler = mf.run_backbone(model, inputs)  # how the engine pools (serving.engine.backbone.pool)
        served = mf.pool_features(hidden, inputs.get("attention_mask"), pooler, pooling)
    assert trained.shape == served.shape == (2, mf.feature_dim(model.config))
    assert torch.equal(trained, served)
    assert feature_dim(model, pooling) == mf.feature_dim(model.config)


def test_token_limit_reserves_robertas_two_positions():
    assert mf.token_limit({"model_type": "roberta", "max_position_embeddings": 514}) == 512
    assert mf.token_limit({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert mf.family({"model_type": "somenet", "num_channels": 3}).modality == "image"
    assert mf.family({"model_type": "somenet"}).modality == "text"


def test_training_and_serving_prepare_images_and_audio_identically(tiny_resnet_dir, tmp_path):
    """A base without a saved processor: both sides normalise the same way (ImageNet mean/std; audio
    zero-mean unit-variance), bit for bit."""
    from adapters_store import describe_base
    from serving.engine.backbone import encode_audio, encode_images, load_backbone
    from tests.helpers.models import make_tiny_wav2vec2
    from training.backbone import make_preprocess

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(3)]
    served = encode_images(load_backbone(describe_base("r", tiny_resnet_dir)), images)["pixel_values"]
    trained = make_preprocess(tiny_resnet_dir, "image", 32)(images)["pixel_values"]
    assert torch.equal(served, trained)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    old = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert torch.allclose(served, old, atol=1e-6)

    folder = make_tiny_wav2vec2(tmp_path / "w2v")
    (folder / "preprocessor_config.json").unlink()  # no extractor: the table's own normalisation
    waves = [rng.standard_normal(800).astype(np.float32) * 0.3 for _ in range(2)]
    served = encode_audio(load_backbone(describe_base("w", folder)), waves)["input_values"]
    trained = make_preprocess(folder, "audio", 32)(waves)["input_values"]
    assert torch.equal(served, trained)
    assert abs(float(served[0].mean())) < 1e-5 and abs(float(served[0].std()) - 1.0) < 1e-2
