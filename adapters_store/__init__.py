"""loraplex registry: versioned, integrity-checked adapter bundles per tenant, on disk or S3."""

from adapters_store.base_models import BaseModelEntry, describe_base, fingerprint_folder
from adapters_store.bundle import AdapterManifest, Bundle, HeadSpec
from adapters_store.errors import LoraplexError
from adapters_store.names import AdapterRef, validate_name
from adapters_store.registry import open_store
from adapters_store.store import AdapterStore
from adapters_store.validation import StoreLimits

__all__ = [
    "AdapterManifest",
    "AdapterRef",
    "AdapterStore",
    "BaseModelEntry",
    "Bundle",
    "HeadSpec",
    "LoraplexError",
    "StoreLimits",
    "describe_base",
    "fingerprint_folder",
    "open_store",
    "validate_name",
]
