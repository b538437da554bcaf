"""Data loading: formats, configurable columns, the stratified split, and every clear error the issue lists."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from training.data import LabelledData, label_names, read_table, stratified_split
from training.errors import DatasetError
from training.media import arrays_data, read_image_folder


def test_csv_and_jsonl_with_configurable_columns(tmp_path):
    (tmp_path / "a.csv").write_text("utterance,intent\nhello there,greet\nbye now,leave\n", encoding="utf-8")
    rows = [{"body": "héllo ünïcode", "cat": "x"}, {"body": "second", "cat": "y"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    a = read_table(tmp_path / "a.csv", "utterance", "intent")
    b = read_table(tmp_path / "b.jsonl", "body", "cat")
    assert list(a.inputs) == ["hello there", "bye now"] and list(a.labels) == ["greet", "leave"]
    assert list(b.inputs) == ["héllo ünïcode", "second"] and list(b.labels) == ["x", "y"]


def test_unknown_label_column_lists_the_columns(tmp_path):
    (tmp_path / "a.csv").write_text("text,intent\nhello,greet\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"unknown label column 'label'.*'text', 'intent'"):
        read_table(tmp_path / "a.csv")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"text,label\n", "no rows"),
        (b"text,label\nhello,\n", "row 1 has an empty label"),
        (b"text,label\nok,a\ncaf\xe9,b\n", r"not valid UTF-8 \(byte 19, line 3\)"),
    ],
)
def test_bad_files_raise_dataset_error(tmp_path, content, message):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_table(path)


def test_bad_jsonl_line_and_unsupported_suffix(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{broken\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        read_table(tmp_path / "d.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="unsupported data file"):
        read_table(tmp_path / "d.parquet")


def test_single_class_is_refused():
    with pytest.raises(DatasetError, match="single class"):
        label_names(LabelledData(["a", "b", "c"], ["x", "x", "x"]))


def test_stratified_split_keeps_every_class_and_is_seeded():
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 5
    data = LabelledData([f"t{i}" for i in range(len(labels))], labels)
    train, val = stratified_split(data, 0.2, seed=3)
    assert len(train) + len(val) == len(data) and not set(train.inputs) & set(val.inputs)
    assert Counter(val.labels) == {"a": 4, "b": 2, "c": 1}
    assert stratified_split(data, 0.2, seed=3)[1].inputs == val.inputs
    assert stratified_split(data, 0.2, seed=4)[1].inputs != val.inputs


@pytest.mark.parametrize("labels", [["a", "a", "b"], ["a", "a", "b", "b", "c", "c"]])
def test_too_small_to_split(labels):
    data = LabelledData([str(i) for i in range(len(labels))], labels)
    with pytest.raises(DatasetError, match="too small to split"):
        stratified_split(data, 0.2, seed=0)


def test_image_folder_and_decode_error(tmp_path):
    from PIL import Image

    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "imgs" / label / f"{i}.png")
    data = read_image_folder(tmp_path / "imgs")
    assert sorted(Counter(data.labels).items()) == [("blue", 2), ("red", 2)]
    assert data.inputs[0].size == (8, 8)
    (tmp_path / "imgs" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"broken\.png: image does not decode"):
        read_image_folder(tmp_path / "imgs")


def test_arrays_refuse_non_finite():
    assert len(arrays_data(np.zeros((3, 8, 8), np.uint8), [0, 1, 0])) == 3
    with pytest.raises(DatasetError, match="NaN/Inf"):
        arrays_data([np.array([0.0, np.nan])], ["a"])
