"""Choose a store implementation by URL scheme from a small registry."""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlparse

from adapters_store.errors import InvalidRequest
from adapters_store.store import AdapterStore
from adapters_store.validation import StoreLimits

DEFAULT_STORE_URL = os.environ.get("LORAPLEX_STORE", ".loraplex/store")


def local_path(url: str | os.PathLike) -> str | None:
    """The folder of a local store URL (a path or ``file://...``); None for other schemes."""
    url = os.fspath(url)
    scheme = urlparse(url).scheme
    if len(scheme) > 1 and scheme != "file":
        return None
    return url[len("file://") :] if url.startswith("file://") else url


def _local(url: str, limits: StoreLimits | None) -> AdapterStore:
    from adapters_store.local import LocalStore

    return LocalStore(local_path(url), limits)


def _s3(url: str, limits: StoreLimits | None) -> AdapterStore:
    from adapters_store.s3 import S3Store

    return S3Store(url, limits)


STORE_SCHEMES: dict[str, Callable[[str, StoreLimits | None], AdapterStore]] = {
    "": _local,
    "file": _local,
    "s3": _s3,
}


def absolute_store_url(url: str | os.PathLike) -> str:
    """A local store URL made absolute against the current directory; other schemes unchanged.

    A server started from another folder (``bentoml serve --working-dir``) must open the store the
    user named, not one relative to its own working directory.
    """
    url = os.fspath(url)
    scheme = urlparse(url).scheme
    if len(scheme) > 1 and scheme != "file":
        return url
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def open_store(url: str | os.PathLike | None = None, limits: StoreLimits | None = None) -> AdapterStore:
    """Open a store: a folder path or ``file://`` URL (local), or ``s3://bucket/prefix[?endpoint=...]``."""
    url = os.fspath(url) if url is not None else DEFAULT_STORE_URL
    scheme = urlparse(url).scheme
    factory = STORE_SCHEMES.get(scheme if len(scheme) > 1 else "")  # 1 letter: a Windows drive
    if factory is None:
        valid = ", ".join(f"{s}://" for s in STORE_SCHEMES if s) + ", or a folder path"
        raise InvalidRequest(f"unknown store URL scheme {scheme!r}; use {valid}")
    return factory(url, limits)
