"""Import a folder written by PEFT's ``save_pretrained`` as a bundle, weights byte-for-byte unchanged.

The PEFT config is narrowed to what loraplex serves at this boundary (STYLE principle 3) by
:mod:`adapters_store.peft_spec` (every option served exactly or refused, docs/peft_options.md); the
spec it computes goes into the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_store import peft_spec
from adapters_store.base_models import BaseModelEntry
from adapters_store.bundle import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, Bundle, check_file_name
from adapters_store.errors import UnsafeFormat, UnsupportedAdapter, ValidationError
from adapters_store.model_families import default_pooling
from adapters_store.validation import StoreLimits, parse_peft_config, parse_safetensors

_TASK_TYPES = {
    "SEQ_CLS": "text-classification",
    "FEATURE_EXTRACTION": "feature-extraction",
    None: "feature-extraction",
}
_KINDS = {"LORA": "lora", "IA3": "ia3"}


def peft_kind_and_task(cfg: dict[str, Any], task: str | None) -> tuple[str, str]:
    kind = _KINDS.get(str(cfg.get("peft_type", "")).upper())
    if kind is None:
        raise UnsupportedAdapter(f"peft_type {cfg.get('peft_type')!r} is not supported; use LoRA or IA3")
    if task is None:
        if cfg.get("task_type") not in _TASK_TYPES:
            raise UnsupportedAdapter(
                f"task_type {cfg.get('task_type')!r} is not supported; pass --task explicitly"
            )
        task = _TASK_TYPES[cfg.get("task_type")]
    return kind, task


def import_peft_dir(
    path: str | Path,
    tenant: str,
    name: str,
    base: BaseModelEntry,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    pooling: str | None = None,
    **manifest_fields: Any,
) -> Bundle:
    """Make a bundle from a PEFT ``save_pretrained`` folder (the bytes of both files are kept as they are).

    ``task`` defaults from the config's ``task_type`` (SEQ_CLS -> text-classification); ``labels``
    default to ``LABEL_0..N-1`` from the classifier's shape; ``pooling`` defaults to what the base
    family's task model classifies (BERT: ``pooler``; ViT: ``cls``) and ``mean`` for embeddings.
    """
    folder = Path(path)
    for p in folder.iterdir():
        if p.is_file():
            try:
                check_file_name(p.name)
            except UnsafeFormat:
                raise
            except ValidationError:
                continue  # README/other side files are not imported
    cfg_path, w_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValidationError(
            f"{folder} is not a PEFT adapter folder: it needs {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}"
        )
    return bundle_from_peft_files(
        cfg_path.read_bytes(),
        w_path.read_bytes(),
        tenant,
        name,
        base,
        task=task,
        labels=labels,
        pooling=pooling,
        **manifest_fields,
    )


def bundle_from_peft_files(
    config: bytes,
    weights: bytes,
    tenant: str,
    name: str,
    base: BaseModelEntry,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    pooling: str | None = None,
    **manifest_fields: Any,
) -> Bundle:
    """The same as :func:`import_peft_dir` from the two files' bytes (HTTP uploads use this)."""
    cfg = parse_peft_config(config)
    kind, task = peft_kind_and_task(cfg, task)
    header = parse_safetensors(weights, PEFT_WEIGHTS_FILE, StoreLimits())
    spec = peft_spec.build(cfg, header, base, labels)  # the store recomputes it at put and must agree
    if task != "feature-extraction" and not labels:
        if spec.head is None:
            raise ValidationError(f"task {task!r} needs a classifier in modules_to_save, or pass labels")
        labels = [f"LABEL_{i}" for i in range(spec.head.out_features)]
    pooling = pooling or default_pooling({"model_type": base.model_type}, task)
    return Bundle.build(
        {PEFT_CONFIG_FILE: config, PEFT_WEIGHTS_FILE: weights},
        tenant=tenant,
        name=name,
        kind=kind,
        task=task,
        labels=list(labels or []),
        base=base.ref,
        pooling=pooling,
        peft=spec,
        **manifest_fields,
    )
