"""Labelled text tables (CSV / TSV / JSONL): the one reading rule for ``training/`` and the job routes.

``training.data.read_table`` reads files with it; ``serving.jobs`` reads uploaded datasets with it, so
a dataset the service accepts is exactly one the training code can read, with the same messages.
Every problem ends in a :class:`DatasetError` naming where (file or upload) and, where it helps, the row.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from adapters_store.errors import DatasetError

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def table_format(file_name: str, where: str) -> str:
    """``csv`` / ``tsv`` / ``jsonl`` from a file name's suffix."""
    suffix = "." + file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    kind = TABLE_FORMATS.get(suffix)
    if kind is None:
        raise DatasetError(f"{where}: unsupported data file; use one of {', '.join(sorted(TABLE_FORMATS))}")
    return kind


def decode_text(raw: bytes, where: str) -> str:
    if not raw.strip():
        raise DatasetError(f"{where}: the file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{where}: not valid UTF-8 (byte {e.start}, line {line}); re-save the file as UTF-8"
        ) from None


def parse_rows(raw: bytes, kind: str, where: str) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV (header line) or JSONL (one object per line) table."""
    text = decode_text(raw, where)
    if kind in ("csv", "tsv"):
        try:
            return list(csv.DictReader(io.StringIO(text), delimiter="\t" if kind == "tsv" else ","))
        except csv.Error as e:
            raise DatasetError(f"{where}: malformed CSV: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: line {n} must be a JSON object")
        rows.append(row)
    return rows


def column(rows: list[dict[str, Any]], col: str, where: str, what: str) -> list[str]:
    """One column as non-empty strings; an unknown column lists the ones the table has."""
    if not rows:
        raise DatasetError(f"{where}: the file has a header but no rows")
    if col not in rows[0]:
        raise DatasetError(
            f"{where}: unknown {what} column {col!r}; the file has columns {', '.join(map(repr, rows[0]))}"
        )
    out = []
    for n, row in enumerate(rows, start=1):
        value = row.get(col)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DatasetError(f"{where}: row {n} has an empty {what} ({col!r})")
        out.append(str(value))
    return out
