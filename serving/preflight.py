"""Start-up checks, run before anything is served: settings, store, base and tokens.

``loraplex serve`` runs them before it launches BentoML, and the service runs the same ones, so a bad
setting stops the start with one line naming the variable (never a value) and a non-zero exit, instead
of a worker that BentoML restarts forever while ``/livez`` hangs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapters_store import open_store
from adapters_store.base_models import BaseModelEntry, resolve_source
from adapters_store.errors import InvalidRequest, InvalidSettings, NotFound, StoreUnavailable
from adapters_store.onnx_artifacts import manifest_file
from adapters_store.registry import local_path
from adapters_store.store import AdapterStore
from serving.auth import TokenBook, token_book_from_settings
from serving.settings import ServiceSettings


@dataclass
class StartupCheck:
    """What a replica starts with, every part already checked."""

    settings: ServiceSettings
    store: AdapterStore
    base: BaseModelEntry
    tokens: TokenBook


def check_startup(
    environ: Mapping[str, str] | None = None, settings: ServiceSettings | None = None
) -> StartupCheck:
    """Settings (read from ``environ`` unless given), store, base, tokens, in that order; the first
    problem raises a LoraplexError whose one-line message starts with the variable to fix."""
    if settings is None:
        settings = ServiceSettings.from_env(environ)
    store = open_checked_store(settings.store)
    base = checked_base(store, settings.base)
    token_counter_file(settings, base)
    check_export(settings, store, base)
    try:
        tokens = token_book_from_settings(settings, store)
    except StoreUnavailable as e:
        raise StoreUnavailable(f"LORAPLEX_STORE: reading tenant tokens: {e.message}") from None
    return StartupCheck(settings, store, base, tokens)


def open_checked_store(url: str) -> AdapterStore:
    folder = local_path(url)
    if folder is not None and not Path(folder).is_dir():
        # open_store would create it: for a server that only hides a typo behind an empty store.
        raise InvalidSettings(
            f"LORAPLEX_STORE: no store at {folder} (the folder does not exist); create one with "
            f"'loraplex base register NAME --store {folder}'"
        )
    try:
        return open_store(url)
    except StoreUnavailable as e:
        raise StoreUnavailable(f"LORAPLEX_STORE: {e.message}") from None
    except InvalidRequest as e:
        raise InvalidSettings(f"LORAPLEX_STORE: {e.message}") from None


def checked_base(store: AdapterStore, name: str) -> BaseModelEntry:
    try:
        return store.get_base(name)
    except StoreUnavailable as e:
        raise StoreUnavailable(f"LORAPLEX_STORE: {e.message}") from None
    except NotFound:
        known = ", ".join(b.name for b in store.list_bases()) or "none"
        raise InvalidSettings(
            f"LORAPLEX_BASE: base {name!r} is not registered in the store (registered: {known}); "
            f"run 'loraplex base register {name} --store ...'"
        ) from None


def token_counter_file(settings: ServiceSettings, base: BaseModelEntry) -> Path | None:
    """The tokenizer that counts tokens for ``token_policy='reject'`` (None for 'truncate'). Checked
    here, before any worker starts: found missing in the worker, the worker was restarted forever."""
    if settings.limits.token_policy != "reject":
        return None
    path = resolve_source(base) / "tokenizer.json"
    if not path.is_file():
        raise InvalidSettings(
            f"LORAPLEX_TOKEN_POLICY: 'reject' counts tokens with the base's tokenizer.json, and base "
            f"{base.name!r} has none at {path}; use 'truncate' for this base"
        )
    return path


def check_export(settings: ServiceSettings, store: AdapterStore, base: BaseModelEntry) -> None:
    """``onnx`` / ``onnx-int8`` insist on the base's export (``auto`` falls back to torch and says why).
    Only presence is checked here; the worker checks the graph itself before serving on it."""
    variant = {"onnx": "fp32", "onnx-int8": "int8"}.get(settings.runtime)
    if variant is None:
        return
    try:
        stored = store.has_artifact(base.name, base.fingerprint, manifest_file(variant))
    except StoreUnavailable as e:
        raise StoreUnavailable(f"LORAPLEX_STORE: {e.message}") from None
    if not stored:
        quantize = " --quantize int8" if variant == "int8" else ""
        raise InvalidSettings(
            f"LORAPLEX_RUNTIME: {settings.runtime!r} needs base {base.name!r}'s {variant} ONNX export, and "
            f"none is stored; run 'loraplex onnx export --base {base.name}{quantize}', or use 'auto'"
        )
