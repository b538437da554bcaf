"""Labelled data: reading text tables (CSV / JSONL), label maps, and the stratified validation split.

Every problem a user can make with a data file ends in a :class:`DatasetError` that names the file and,
where it helps, the row and what to do; nothing here raises a bare ``KeyError`` or ``UnicodeDecodeError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The reading rules live in adapters_store.tables: the service's job routes read uploads with them.
from adapters_store.tables import column, parse_rows, table_format
from training.errors import DatasetError


@dataclass(frozen=True)
class LabelledData:
    """Inputs (texts, images or arrays) and their label names, same length; ``labels`` may be None
    for unlabelled target-domain data."""

    inputs: Sequence[Any]
    labels: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.inputs):
            raise DatasetError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, idx: Sequence[int]) -> LabelledData:
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return LabelledData([self.inputs[i] for i in idx], labels)

    def concat(self, other: LabelledData) -> LabelledData:
        if self.labels is None or other.labels is None:
            raise DatasetError("cannot concatenate labelled and unlabelled data")
        return LabelledData(list(self.inputs) + list(other.inputs), list(self.labels) + list(other.labels))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return parse_rows(path.read_bytes(), table_format(path.name, str(path)), str(path))


def read_table(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> LabelledData:
    """Read a CSV/TSV/JSONL file into texts and label names; ``label_column=None`` for unlabelled data."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such data file")
    rows = _read_rows(path)
    texts = column(rows, text_column, str(path), "text")
    labels = column(rows, label_column, str(path), "label") if label_column else None
    return LabelledData(texts, labels)


def label_names(data: LabelledData, where: str = "training data") -> list[str]:
    """Sorted label names; refuses unlabelled data and a single class."""
    if data.labels is None:
        raise DatasetError(f"{where} has no labels")
    names = sorted(set(data.labels))
    if len(names) < 2:
        raise DatasetError(f"{where} has a single class ({names[0]!r}); classification needs at least two")
    return names


def check_val_labels(val: LabelledData, names: Sequence[str]) -> None:
    unknown = sorted(set(val.labels or ()) - set(names))
    if unknown:
        raise DatasetError(
            f"validation labels not in the training data: {', '.join(map(repr, unknown[:10]))}"
        )


def stratified_split(data: LabelledData, val_fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """Split so every class is in both parts; refuses data too small for that."""
    from sklearn.model_selection import train_test_split

    counts = Counter(data.labels)
    n_classes, n_val = len(counts), round(len(data) * val_fraction)
    rare = sorted(k for k, c in counts.items() if c < 2)
    if rare or n_val < n_classes or len(data) - n_val < n_classes:
        raise DatasetError(
            f"dataset too small to split: {len(data)} examples, {n_classes} classes"
            + (f", classes with one example: {', '.join(map(repr, rare[:10]))}" if rare else "")
            + f"; every class needs 2+ examples and val_fraction={val_fraction} must give each class one "
            "validation example, or pass a validation file"
        )
    idx = list(range(len(data)))
    tr, va = train_test_split(idx, test_size=n_val, stratify=list(data.labels), random_state=seed)
    return data.subset(sorted(tr)), data.subset(sorted(va))


def encode_labels(data: LabelledData, names: Sequence[str]) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    return [index[label] for label in data.labels or ()]
