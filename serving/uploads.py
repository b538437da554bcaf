"""Upload parsing: multipart parts -> a validated :class:`~adapters_store.bundle.Bundle`.

Two shapes are accepted: a loraplex bundle (``manifest.json`` plus the files it lists, digests checked)
or the files of a PEFT ``save_pretrained`` folder (kept byte for byte; side files such as README.md are
ignored). Every part's file name is checked as a bundle file name first, so pickles are refused unread.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from adapters_store.base_models import BaseModelEntry
from adapters_store.bundle import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    AdapterManifest,
    Bundle,
    check_file_name,
)
from adapters_store.errors import IntegrityError, PayloadTooLarge, UnsupportedMediaType, ValidationError
from adapters_store.peft_import import bundle_from_peft_files

MAX_UPLOAD_FILES = 16


async def read_upload(request: Request, max_bytes: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """Multipart parts -> ({file name: bytes}, {field: value}); file names are checked as bundle names."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType("upload with 'Content-Type: multipart/form-data' (one part per file)")
    files: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    total = 0
    async with request.form(max_files=MAX_UPLOAD_FILES, max_fields=16, max_part_size=1 << 20) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
                continue
            fname = check_file_name((value.filename or "").rsplit("/", 1)[-1])
            if fname in files:
                raise ValidationError(f"file {fname!r} was sent twice")
            files[fname] = await value.read()
            total += len(files[fname])
            if total > max_bytes:
                raise PayloadTooLarge(f"upload is over the limit of {max_bytes} bytes")
    return files, fields


def bundle_from_upload(
    files: dict[str, bytes], fields: dict[str, str], tenant: str, name: str, base: BaseModelEntry
) -> Bundle:
    """A full bundle if ``manifest.json`` is among the files, else a PEFT folder's two files."""
    if MANIFEST_FILE in files:
        manifest = AdapterManifest.from_json(files.pop(MANIFEST_FILE))
        if (manifest.tenant, manifest.name) != (tenant, name):
            raise ValidationError(
                f"manifest names {manifest.tenant}/{manifest.name} but the upload URL is {tenant}/{name}"
            )
        bundle = Bundle(manifest.model_copy(update={"version": None}), files)
        try:
            bundle.verify()
        except IntegrityError as e:
            # The uploaded files disagree with the uploaded manifest: a bad request, not a damaged store.
            raise ValidationError(f"upload does not match its {MANIFEST_FILE}: {e.message}") from None
        return bundle
    if PEFT_CONFIG_FILE in files and PEFT_WEIGHTS_FILE in files:
        return bundle_from_peft_files(
            files[PEFT_CONFIG_FILE],
            files[PEFT_WEIGHTS_FILE],
            tenant,
            name,
            base,
            task=fields.get("task") or None,
            labels=parse_labels(fields.get("labels")),
            pooling=fields.get("pooling") or None,
        )
    raise ValidationError(
        f"upload either a bundle ({MANIFEST_FILE} + its files) or a PEFT folder "
        f"({PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE}); got {', '.join(sorted(files)) or 'no files'}"
    )


def parse_labels(value: str | None) -> list[str] | None:
    """``'["neg","pos"]'`` or ``'neg,pos'`` -> ``['neg', 'pos']``."""
    if not value:
        return None
    if value.lstrip().startswith("["):
        try:
            labels = json.loads(value)
        except ValueError:
            raise ValidationError("labels is not a valid JSON list") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValidationError("labels must be a list of strings")
        return labels
    return [x.strip() for x in value.split(",") if x.strip()]
