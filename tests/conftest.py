"""Shared fixtures. Models are tiny and random; the real MiniLM appears only where a test asks for it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.models import make_tiny_bert, make_tiny_resnet, make_tiny_vit, minilm_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def other_tiny_bert_dir(tmp_path_factory) -> Path:
    """Same architecture, different weights: a different base fingerprint."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-2") / "model", seed=1)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("tiny-vit") / "model")


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory) -> Path:
    return make_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet") / "model")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()
