"""Full fine-tunes (dedicated model LRU) and the image classification path (tiny ViT and ResNet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from adapters_store import Bundle, describe_base, open_store
from adapters_store.bundle import HEAD_WEIGHTS_FILE, MODEL_WEIGHTS_FILE
from adapters_store.errors import ValidationError
from serving.engine import Engine, EngineSettings, InferenceItem, InferenceResult
from tests.test_engine_support import apply_head, mean_pool, random_head

torch.set_num_threads(1)
TOL = 1e-4
LABELS = ["a", "b", "c"]


def _full_bundle(base_dir, base, tenant, seed):
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(base_dir)
    weights = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items() if k in base.tensors}
    head = random_head(seed, base.hidden_size, len(LABELS))
    bundle = Bundle.build(
        {MODEL_WEIGHTS_FILE: save_safetensors(weights), HEAD_WEIGHTS_FILE: save_safetensors(head)},
        tenant=tenant,
        name="ft",
        kind="full",
        task="text-classification",
        labels=LABELS,
        base=base.ref,
        head={"in_features": base.hidden_size, "num_outputs": len(LABELS)},
    )
    return bundle, weights, head


def test_full_fine_tunes_use_a_dedicated_lru_and_match_their_own_model(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer, BertModel

    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    refs = {}
    for i in range(2):
        bundle, weights, head = _full_bundle(tiny_bert_dir, base, f"f{i}", i)
        store.put(bundle)
        refs[f"f{i}"] = (weights, head)
    engine = Engine(store, base="tiny", settings=EngineSettings(full_cache_size=1, threads=1))
    texts = ["good morning to you", "this is terrible", "ok"]
    items = [InferenceItem(f"f{i % 2}", "ft", "classify", text=t) for i, t in enumerate(texts)]
    items.append(InferenceItem("anyone", None, "embed", text="plain base row"))
    results = engine.infer(items)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for item, res in zip(items[:3], results[:3], strict=True):
        weights, head = refs[item.tenant]
        model = BertModel.from_pretrained(tiny_bert_dir).eval()
        model.load_state_dict(weights, strict=False)
        enc = tok([item.text], return_tensors="pt")
        with torch.inference_mode():
            want = apply_head(head, mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))[0]
        assert (torch.tensor(res.logits) - want).abs().max().item() < TOL
    assert isinstance(results[3], InferenceResult) and results[3].embedding is not None
    full = engine.cache_stats()["full"]
    assert full["loads"] == 2 and full["entries"] == 1 and full["evictions"] == 1
    assert engine.cache_stats()["entries"] == 0  # full copies never sit in the adapter cache


@pytest.fixture(scope="module")
def vit_world(tmp_path_factory, tiny_vit_dir):
    # Heads on the shared ViT backbone; ViT LoRA is tests/test_store_vit.py, ViT partial/full are
    # tests/test_training_roundtrip.py.
    root = tmp_path_factory.mktemp("vit")
    store = open_store(root / "store")
    base = store.register_base(describe_base("vit", tiny_vit_dir))
    head = random_head(7, 32, len(LABELS))
    store.put(
        Bundle.build(
            {HEAD_WEIGHTS_FILE: save_safetensors(head)},
            tenant="zoo",
            name="animals",
            kind="head",
            task="image-classification",
            labels=LABELS,
            base=base.ref,
            pooling="cls",
            head={"in_features": 32, "num_outputs": len(LABELS)},
        )
    )
    return store, head


def _images(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_vit_head_and_lora_rows_match_references(vit_world, tiny_vit_dir):
    from transformers import AutoImageProcessor, ViTModel

    store, head = vit_world
    engine = Engine(store, base="vit", settings=EngineSettings(threads=1))
    imgs = _images(4)
    items = [
        InferenceItem("zoo", "animals", "classify", image=imgs[0]),
        InferenceItem("u", None, "embed", image=imgs[1]),
        InferenceItem("zoo", "animals", "classify", image=imgs[2]),
        InferenceItem("u", None, "embed", image=imgs[3]),
    ]
    res = engine.infer(items)
    proc = AutoImageProcessor.from_pretrained(tiny_vit_dir)
    base_model = ViTModel.from_pretrained(tiny_vit_dir).eval()
    with torch.inference_mode():
        for k in (0, 2):
            px = proc(images=[imgs[k]], return_tensors="pt")["pixel_values"]
            want = apply_head(head, base_model(pixel_values=px).last_hidden_state[:, 0])[0]
            assert (torch.tensor(res[k].logits) - want).abs().max().item() < TOL
        px = proc(images=[imgs[1]], return_tensors="pt")["pixel_values"]
        want = torch.nn.functional.normalize(
            base_model(pixel_values=px).last_hidden_state.mean(dim=1), dim=-1
        )[0]
        assert (torch.tensor(res[1].embedding) - want).abs().max().item() < TOL
    assert res[3].embedding is not None
    [bad] = engine.infer([InferenceItem("zoo", "animals", "classify", text="not an image")])
    assert isinstance(bad, ValidationError)


def test_resnet_head_rows_grouped_by_image_size(tmp_path, tiny_resnet_dir):
    from transformers import ResNetModel

    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("resnet", tiny_resnet_dir))
    head = random_head(9, 16, len(LABELS))
    store.put(
        Bundle.build(
            {HEAD_WEIGHTS_FILE: save_safetensors(head)},
            tenant="zoo",
            name="r",
            kind="head",
            task="image-classification",
            labels=LABELS,
            base=base.ref,
            pooling="pooler",
            head={"in_features": 16, "num_outputs": len(LABELS)},
        )
    )
    engine = Engine(store, base="resnet", settings=EngineSettings(threads=1))
    imgs = _images(2, size=16) + _images(1, seed=1, size=24)
    res = engine.infer([InferenceItem("zoo", "r", "classify", image=im) for im in imgs])
    model = ResNetModel.from_pretrained(tiny_resnet_dir).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        for im, r in zip(imgs, res, strict=True):
            px = (torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 - mean) / std
            want = apply_head(head, model(pixel_values=px).pooler_output.flatten(1))[0]
            assert (torch.tensor(r.logits) - want).abs().max().item() < TOL
