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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One real SeaweedFS S3 server for the whole session; ``seaweed.store_url()`` gives a fresh bucket URL."""
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


def _new_store(kind: str, tmp_path, request):
    from adapters_store import open_store

    if kind == "local":
        return open_store(tmp_path / "store")
    server = request.getfixturevalue("seaweed")
    store = open_store(server.store_url())
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_store(request, tmp_path):
    """The same tests against the local store and the S3 store on SeaweedFS."""
    return _new_store(request.param, tmp_path, request)


@pytest.fixture
def local_store(tmp_path):
    from adapters_store import open_store

    return open_store(tmp_path / "store")
