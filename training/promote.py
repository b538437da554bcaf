"""Promote a ``full`` fine-tune to a new registered base that other adapters can then target."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from adapters_store.base_models import BaseModelEntry, describe_base, resolve_source
from adapters_store.bundle import MODEL_WEIGHTS_FILE
from adapters_store.errors import Conflict, IncompatibleBase, ValidationError
from adapters_store.names import AdapterRef, validate_name

# Weight files of the old base are replaced by the fine-tune's; everything else (config, tokenizer,
# image processor) is copied so the new folder loads like the old one.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def promote_full_to_base(
    store: Any, manifest_ref: AdapterRef | str, new_base_name: str, out_dir: str | Path
) -> BaseModelEntry:
    """Write the ``full`` bundle's backbone as a Hugging Face folder in ``out_dir`` and register it.

    >>> promote_full_to_base(store, "acme/domain-bert@3", "acme-bert", "/models/acme-bert")  # doctest: +SKIP
    """
    validate_name(new_base_name, "base name")
    bundle = store.get(manifest_ref)
    m = bundle.manifest
    if m.kind != "full":
        raise ValidationError(
            f"{m.tenant}/{m.name}@{m.version} is a {m.kind!r} bundle; only 'full' can become a base"
        )
    parent = store.get_base(m.base.name)
    if parent.fingerprint != m.base.fingerprint:
        raise IncompatibleBase(
            f"base {m.base.name!r} was re-registered since {m.tenant}/{m.name} was trained"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise Conflict(f"{out} is not empty; choose a new folder for the promoted base")
    out.mkdir(parents=True, exist_ok=True)
    for item in resolve_source(parent).iterdir():
        if (
            item.is_file()
            and not item.name.endswith(_WEIGHT_SUFFIXES)
            and not item.name.endswith(".index.json")
        ):
            shutil.copy2(item, out / item.name)
    (out / MODEL_WEIGHTS_FILE).write_bytes(bundle.files[MODEL_WEIGHTS_FILE])
    entry = describe_base(
        new_base_name,
        out,
        promoted_from=f"{m.tenant}/{m.name}@{m.version}",
        parent_base=parent.name,
        parent_fingerprint=parent.fingerprint,
    )
    return store.register_base(entry)
