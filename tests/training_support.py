"""Shared pieces of the training tests: toy separable text data and a store with a tiny base registered."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from adapters_store import describe_base, open_store

# Each class has its own vocabulary, so even a random tiny backbone gives separable mean-pooled features.
TOY_VOCAB = {
    "billing": ["refund", "invoice", "charge", "payment", "billing", "money", "price", "receipt"],
    "login": ["password", "login", "account", "username", "locked", "reset", "sign", "access"],
    "shipping": ["delivery", "package", "parcel", "courier", "shipping", "tracking", "arrive", "truck"],
}


def toy_rows(per_class: int = 30, seed: int = 0, classes: tuple[str, ...] = tuple(TOY_VOCAB)) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label in classes:
        for _ in range(per_class):
            words = rng.choices(TOY_VOCAB[label], k=rng.randint(4, 7))
            rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = ("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in columns})
    return path


def store_with_base(root: Path, base_dir: Path, base: str = "tiny"):
    store = open_store(root / "store")
    store.register_base(describe_base(base, base_dir))
    return store
