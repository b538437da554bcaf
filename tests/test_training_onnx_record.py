"""The LoRA graph's export record: its schema describes the data it holds (issue 16)."""

from __future__ import annotations

import re

from adapters_store.onnx_artifacts import LoraGraphRecord


def test_lora_targets_schema_and_data_agree(tiny_bert_dir):
    from transformers import AutoModel

    from adapters_store import describe_base
    from training.onnx_export.lora_graph import LoraTextFeatures, canonical_targets, lora_record

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    entry = describe_base("tiny", tiny_bert_dir)
    record = lora_record(LoraTextFeatures(model, canonical_targets(entry, ["query", "value"])))
    block = AutoModel.from_pretrained(tiny_bert_dir).encoder.layer[0]
    for target in record.targets:  # the data: paths that resolve inside one encoder block
        block.get_submodule(target)
    described = LoraGraphRecord.model_fields["targets"].description
    example = re.search(r"e\.g\. (\S+)", described).group(1)
    block.get_submodule(example)  # the schema's example is of the same form (it said 'query')
    assert example in record.targets
