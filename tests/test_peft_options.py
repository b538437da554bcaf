"""Every LoraConfig / IA3Config option is served exactly or refused at push (docs/peft_options.md).

Served rows: a real PEFT ``save_pretrained`` folder on the tiny BERT is pushed to a store and every row of
one mixed engine batch equals PEFT's own forward of that adapter within 1e-4. Refused rows: the push
raises the table's message and nothing is stored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adapters_store import describe_base, open_store
from adapters_store.bundle import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from adapters_store.errors import UnsupportedAdapter, ValidationError
from adapters_store.peft_import import bundle_from_peft_files, import_peft_dir
from adapters_store.peft_options import PEFT_OPTIONS, options_for, options_markdown
from adapters_store.peft_spec import pattern_value
from serving.engine import Engine, EngineSettings, InferenceItem

torch.set_num_threads(1)
TOL = 1e-4
TEXTS = ["the cat sat on the mat", "refund my order now please, it arrived broken", "hello"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "peft_options.md"

# name -> (LoraConfig / IA3Config kwargs, classification?) -- each one a served option or rule of PEFT's
SERVED = {
    "rank-pattern-regex": (
        {"r": 2, "target_modules": ["query", "key", "value"], "rank_pattern": {"query|value": 4}},
        False,
    ),
    "alpha-pattern-regex": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "alpha_pattern": {"query|value": 32}},
        False,
    ),
    "alpha-pattern-full-path": (
        {
            "r": 4,
            "target_modules": ["query", "value"],
            "alpha_pattern": {"encoder.layer.1.attention.self.value": 40},
        },
        False,
    ),
    "rslora": ({"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["query", "value"]}, False),
    "all-linear-seq-cls": ({"r": 2, "target_modules": "all-linear"}, True),
    "fully-qualified": (
        {
            "r": 4,
            "target_modules": [
                "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.1.output.dense",
            ],
        },
        True,
    ),
    "regex-targets": ({"r": 4, "target_modules": r".*layer\.1\.attention\.self\.(query|key)"}, False),
    "layers-to-transform": (
        {"r": 4, "target_modules": ["query", "value"], "layers_to_transform": [1], "layers_pattern": "layer"},
        False,
    ),
    "layers-to-transform-int": ({"r": 4, "target_modules": ["dense"], "layers_to_transform": 0}, False),
    "exclude-modules": ({"r": 4, "target_modules": ["dense"], "exclude_modules": ["output.dense"]}, False),
    "modules-to-save-pooler": (
        {"r": 4, "target_modules": ["query"], "modules_to_save": ["classifier", "pooler"]},
        True,
    ),
    "fan-in-fan-out-dropout-init": (
        {
            "r": 4,
            "target_modules": ["value"],
            "fan_in_fan_out": True,
            "lora_dropout": 0.1,
            "init_lora_weights": "gaussian",
        },
        True,
    ),
    "ia3-regex-feedforward": (
        {
            "ia3": True,
            "target_modules": ["key", "intermediate.dense", "output.dense"],
            "feedforward_modules": r".*layer\.\d\.output\.dense",
        },
        False,
    ),
    "ia3-seq-cls": (
        {
            "ia3": True,
            "target_modules": ["value", "intermediate.dense"],
            "feedforward_modules": ["intermediate.dense"],
        },
        True,
    ),
}


def _save(base_dir: Path, out: Path, kwargs: dict, classify: bool, seed: int) -> Path:
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    kwargs = dict(kwargs)
    torch.manual_seed(seed)
    model = (
        BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        if classify
        else BertModel.from_pretrained(base_dir)
    )
    task = {"task_type": "SEQ_CLS"} if classify else {}
    cfg = (
        IA3Config(**{k: v for k, v in kwargs.items() if k != "ia3"}, **task)
        if kwargs.get("ia3")
        else LoraConfig(**kwargs, **task)
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
            elif "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif "modules_to_save" in name:  # classifier and pooler copies: make them differ from the base
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out)
    return out


def _reference(base_dir: Path, folder: Path, classify: bool):
    from peft import PeftModel
    from transformers import BertForSequenceClassification, BertModel

    base = (
        BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        if classify
        else BertModel.from_pretrained(base_dir)
    )
    return PeftModel.from_pretrained(base, folder).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("peft-options")
    store = open_store(root / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    refs = {}
    for i, (name, (kwargs, classify)) in enumerate(SERVED.items()):
        folder = _save(tiny_bert_dir, root / name, kwargs, classify, seed=i)
        labels = ["a", "b", "c"] if classify else None
        store.put(import_peft_dir(folder, f"t{i:02d}", "x", base, labels=labels))
        refs[name] = (f"t{i:02d}", folder, classify)
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    return store, engine, refs


def test_every_served_option_equals_peft_in_one_mixed_batch(served, tiny_bert_dir):
    from transformers import AutoTokenizer

    store, engine, refs = served
    items, wants = [], []
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for j, (name, (tenant, folder, classify)) in enumerate(refs.items()):
        model = _reference(tiny_bert_dir, folder, classify)
        for k in range(2):
            text = TEXTS[(j + k) % len(TEXTS)]
            enc = tok([text], return_tensors="pt")
            with torch.inference_mode():
                if classify:
                    want = model(**enc).logits[0]
                else:
                    hidden, m = model(**enc).last_hidden_state, enc["attention_mask"].unsqueeze(-1).float()
                    want = ((hidden * m).sum(1) / m.sum(1))[0]
            items.append(InferenceItem(tenant, "x", "classify" if classify else "embed", text=text))
            wants.append((name, want))
    results = engine.infer(items)
    for (name, want), res in zip(wants, results, strict=True):
        got = torch.tensor(res.logits if res.logits is not None else res.embedding)
        diff = (got - want).abs().max().item()
        assert diff < TOL, f"{name}: max abs diff {diff}"


def test_the_spec_is_stored_in_the_manifest_and_follows_peft(served):
    store, _, refs = served
    spec = store.resolve(f"{refs['rank-pattern-regex'][0]}/x").peft
    ranks = {p.rsplit(".", 1)[-1]: m.rank for p, m in spec.modules.items()}
    assert ranks == {"query": 4, "key": 2, "value": 4}  # PEFT: re.match(rf"(.*\.)?({key})$", module)
    spec = store.resolve(f"{refs['alpha-pattern-regex'][0]}/x").peft
    assert {m.scaling for m in spec.modules.values()} == {8.0}  # alpha 32 / r 4 on both
    spec = store.resolve(f"{refs['layers-to-transform'][0]}/x").peft
    assert sorted(spec.modules) == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    spec = store.resolve(f"{refs['modules-to-save-pooler'][0]}/x").peft
    assert spec.pooler is not None and spec.head is not None
    spec = store.resolve(f"{refs['ia3-regex-feedforward'][0]}/x").peft
    sides = {p.split(".", 3)[-1]: m.side for p, m in spec.modules.items()}
    assert sides["attention.self.key"] == "ia3_out" and sides["output.dense"] == "ia3_in"
    assert sides["attention.output.dense"] == "ia3_out"  # a regex is a fullmatch (a list entry: a suffix)


@pytest.mark.parametrize(
    "patterns,key,want",
    [
        ({"query|value": 4}, "bert.encoder.layer.0.attention.self.value", 4),
        ({"query|value": 4}, "bert.encoder.layer.0.attention.self.key", 8),
        ({"layer.0.attention.self.query": 2}, "encoder.layer.0.attention.self.query", 2),
        ({"ery": 2}, "encoder.layer.0.attention.self.query", 8),  # a suffix only counts at a dot
    ],
)
def test_pattern_keys_match_as_peft_does(patterns, key, want):
    from peft.utils.other import get_pattern_key

    assert pattern_value(patterns, key, 8) == patterns.get(get_pattern_key(patterns.keys(), key), 8) == want


def test_option_table_covers_every_peft_field_and_the_docs_show_it():
    from peft import IA3Config, LoraConfig

    for cls, peft_type in ((LoraConfig, "LORA"), (IA3Config, "IA3")):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(options_for(peft_type)), peft_type
    assert options_markdown() in DOCS.read_text()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_bert_dir):
    folder = _save(
        tiny_bert_dir,
        tmp_path_factory.mktemp("plain") / "a",
        {"r": 4, "target_modules": ["query", "value"]},
        True,
        0,
    )
    return json.loads((folder / PEFT_CONFIG_FILE).read_text()), (folder / PEFT_WEIGHTS_FILE).read_bytes()


REFUSED = [o for opts in PEFT_OPTIONS.values() for o in opts if o.refuse is not None]
_REFUSED_VALUES = {
    "peft_type": "PREFIX_TUNING",
    "bias": "all",
    "init_lora_weights": "pissa",
    "megatron_config": {"tensor_model_parallel_size": 2},
    "loftq_config": {"loftq_bits": 4},
    "corda_config": {"corda_method": "ipm"},
    "lora_ga_config": {"direction": "ArB2r"},
    "layer_replication": [[0, 2]],
    "alora_invocation_tokens": [1, 2],
    "target_parameters": ["x.weight"],
    "trainable_token_indices": [1],
    "use_bdlora": {"nblocks": 2},
    "velora_config": {"a": 1},
    "monteclora_config": {"a": 1},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"a": 1},
}


@pytest.mark.parametrize("option", REFUSED, ids=lambda o: o.name)
def test_every_refused_option_is_refused_at_push_with_its_message(option, plain, tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    cfg, weights = plain
    value = _REFUSED_VALUES.get(option.name, True)
    bad = {**cfg, option.name: value}
    message = option.message.format(value=value).split(";")[0]
    with pytest.raises(UnsupportedAdapter) as err:
        store.put(
            bundle_from_peft_files(
                json.dumps(bad).encode(), weights, "acme", "x", base, labels=["a", "b", "c"]
            )
        )
    assert message in err.value.message
    assert store.list_tenants() == []


def test_real_peft_dora_and_other_saved_modules_are_refused_at_push(tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    dora = _save(
        tiny_bert_dir, tmp_path / "dora", {"r": 4, "target_modules": ["query"], "use_dora": True}, True, 0
    )
    with pytest.raises(UnsupportedAdapter, match="use_dora is not supported"):
        store.put(import_peft_dir(dora, "acme", "x", base))
    saved = _save(
        tiny_bert_dir,
        tmp_path / "ffn",
        {"r": 4, "target_modules": ["query"], "modules_to_save": ["classifier", "intermediate.dense"]},
        True,
        0,
    )
    with pytest.raises(UnsupportedAdapter, match="is not served: only a classifier"):
        store.put(import_peft_dir(saved, "acme", "x", base))
    assert store.list_tenants() == []


def test_an_unknown_option_with_a_value_is_refused_not_ignored(plain, tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    cfg, weights = plain
    ok = bundle_from_peft_files(
        json.dumps({**cfg, "future_option": None}).encode(), weights, "acme", "x", base
    )
    assert store.put(ok).version == 1
    with pytest.raises(UnsupportedAdapter, match="future_option"):
        bundle_from_peft_files(json.dumps({**cfg, "future_option": 3}).encode(), weights, "acme", "y", base)
    with pytest.raises(ValidationError, match="not a valid regex"):
        bundle_from_peft_files(
            json.dumps({**cfg, "rank_pattern": {"(": 2}}).encode(), weights, "acme", "y", base
        )
    for bad in ({"layers_to_transform": [0], "layers_pattern": "la(yer"}, {"modules_to_save": ["cls)"]}):
        with pytest.raises(ValidationError, match="not a valid regex"):
            bundle_from_peft_files(json.dumps({**cfg, **bad}).encode(), weights, "acme", "y", base)
    assert store.list_adapters("acme") == ["x"]


@pytest.mark.parametrize(
    "bad",
    [
        {"target_modules": r"(?:\w+\.)*query"},  # a repeat inside a repeat
        {"rank_pattern": {"(q|qu)*ery": 2}},  # an ambiguous alternation inside a repeat
        {"exclude_modules": r"(a?)*b"},
        {"modules_to_save": ["(classifier+)+"]},
        {"target_modules": "query|" + "x" * 600},  # over the length cap
    ],
)
def test_a_pattern_that_can_backtrack_exponentially_is_refused_before_it_runs(
    bad, plain, tmp_path, tiny_bert_dir
):
    """``re`` has no timeout: a tenant regex like '(a+)+' run over the base's module paths would hang a worker."""
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    cfg, weights = plain
    with pytest.raises(ValidationError, match="backtrack|at most 512"):
        bundle_from_peft_files(json.dumps({**cfg, **bad}).encode(), weights, "acme", "y", base)
    assert store.list_tenants() == []


def test_the_backtracking_guard_keeps_the_patterns_peft_users_write(plain, tmp_path, tiny_bert_dir):
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    cfg, weights = plain
    for i, ok in enumerate(
        [
            {"target_modules": r".*\.(query|value)"},
            {"target_modules": r".*encoder.*(query|key|value)", "rank_pattern": {"query|value": 4}},
            {"target_modules": r"(?:.*\.)?layer\.\d+\.attention\.self\.(query|value)"},
        ]
    ):
        bundle = bundle_from_peft_files(json.dumps({**cfg, **ok}).encode(), weights, "acme", f"ok{i}", base)
        assert store.put(bundle).version == 1


def test_a_schema_1_manifest_without_a_spec_still_loads_and_answers_the_same(served):
    store, engine, refs = served
    tenant = refs["rank-pattern-regex"][0]
    v2 = store.resolve(f"{tenant}/x")
    old = v2.model_copy(update={"peft": None, "schema_version": 1, "version": 2})
    key = f"tenants/{tenant}/adapters/x/versions/2.json"
    assert store._create(key, old.to_json())  # as a store written before schema 2 holds it
    assert store.resolve(f"{tenant}/x@2").peft is None
    fresh = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    a, b = fresh.infer([InferenceItem(tenant, f"x@{v}", "embed", text=TEXTS[0]) for v in (1, 2)])
    assert (a.version, b.version) == (1, 2) and a.digest != b.digest
    assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6


def test_a_cold_load_hashes_each_byte_once_and_parses_the_config_once(served, monkeypatch):
    import types

    from adapters_store import bundle as bundle_module
    from adapters_store import peft_options

    store, _, refs = served
    tenant = refs["modules-to-save-pooler"][0]
    files = store.get(f"{tenant}/x").files
    hashed, parsed = [], []
    real_hash, real_json = bundle_module.sha256_hex, peft_options.json

    def counting_hash(data):
        hashed.extend(n for n, b in files.items() if b == data)
        return real_hash(data)

    def counting_loads(data, **kw):
        parsed.append(1)
        return real_json.loads(data, **kw)

    monkeypatch.setattr(bundle_module, "sha256_hex", counting_hash)
    monkeypatch.setattr(
        peft_options,
        "json",
        types.SimpleNamespace(loads=counting_loads, JSONDecodeError=real_json.JSONDecodeError),
    )
    fresh = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    [res] = fresh.infer([InferenceItem(tenant, "x", "classify", text=TEXTS[0])])
    assert res.logits is not None
    assert sorted(hashed) == sorted(files) and len(parsed) == 1


def test_onnx_lora_graph_targets_follow_peft_names(tiny_bert_dir):
    from training.onnx_export.errors import OnnxExportError
    from training.onnx_export.lora_graph import canonical_targets

    entry = describe_base("tiny", tiny_bert_dir)
    assert canonical_targets(entry, ["query", "value"]) == ["attention.self.query", "attention.self.value"]
    # PEFT's dotted-suffix rule: 'output.dense' names both outputs, as a LoraConfig with it would adapt
    assert set(canonical_targets(entry, ["output.dense"])) == {"attention.output.dense", "output.dense"}
    assert canonical_targets(entry, ["attention.self.key"]) == ["attention.self.key"]
    with pytest.raises(OnnxExportError, match="unknown LoRA target 'bogus'"):
        canonical_targets(entry, ["bogus"])
