"""Tenant tokens: the one rule for token entries, and hashed token records kept in the store.

A plain token is never stored: a record holds only its sha256, so anyone who can read the bucket still
cannot call the service. Records are immutable (rotate = a new record + deleting the old one), so a
replica that re-lists the records reads only the ones it has not seen yet. Layout::

    auth/tenant-tokens/<tenant>/<id>.json     {"id", "tenant", "sha256", "created_at"}

Example::

    registry = TenantTokenRegistry(open_store(url))
    record, token = registry.create("acme")     # ``token`` is shown once; the store keeps its hash
    registry.revoke("acme", record.id)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.errors import IntegrityError, InvalidName, NotFound
from adapters_store.names import validate_name
from adapters_store.store import ObjectStore

MIN_TOKEN_CHARS = 8
HASH_PREFIX = "sha256:"
TOKEN_PREFIX = "lpx_"
RECORDS_PREFIX = "auth/tenant-tokens/"
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> bytes:
    """The sha256 a token is known by."""
    return hashlib.sha256(token.encode()).digest()


def entry_digest(entry: str) -> bytes:
    """A configured entry (a plain token, or ``sha256:<64 hex>``) -> its digest.

    Raises ``ValueError`` with a reason that never contains any part of the entry: callers add where
    the entry came from (variable, position, tenant)."""
    if entry.startswith(HASH_PREFIX):
        hex_part = entry[len(HASH_PREFIX) :].lower()
        if not _HEX64_RE.match(hex_part):
            raise ValueError("a 'sha256:' entry needs exactly 64 hex digits after the prefix")
        return bytes.fromhex(hex_part)
    if len(entry) < MIN_TOKEN_CHARS:
        raise ValueError(f"a token needs at least {MIN_TOKEN_CHARS} characters")
    if entry != entry.strip() or any(c.isspace() for c in entry):
        raise ValueError("a token must not contain whitespace")
    return hash_token(entry)


def new_token() -> str:
    """A fresh random tenant token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def record_key(tenant: str, token_id: str) -> str:
    return f"{RECORDS_PREFIX}{tenant}/{token_id}.json"


def validate_token_id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidName("a token id is 16 lower-case hex digits (see 'loraplex tokens list')")
    return value


class TenantTokenRecord(BaseModel):
    """One stored tenant token: its id (public, for listing and revoking) and its hash, never the token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=_ID_RE.pattern, description="16 hex digits; names the token in lists and URLs.")
    tenant: str = Field(description="The tenant this token authenticates.")
    sha256: str = Field(pattern=_HEX64_RE.pattern, description="sha256 of the token, hex.")
    created_at: float = Field(description="Unix time of creation.")

    @property
    def key(self) -> str:
        """Where the record is stored."""
        return record_key(self.tenant, self.id)

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256)

    def public(self) -> dict[str, object]:
        """What listings show: no hash (it is not secret, but nobody needs it)."""
        return {"id": self.id, "tenant": self.tenant, "created_at": self.created_at}


class TenantTokenRegistry:
    """Create, list, rotate and revoke tenant tokens in a store (local folder or S3)."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def create(self, tenant: str) -> tuple[TenantTokenRecord, str]:
        """A new token for ``tenant``: the record stored, and the token (returned only here)."""
        tenant = validate_name(tenant, "tenant")
        token = new_token()
        record = TenantTokenRecord(
            id=secrets.token_hex(8), tenant=tenant, sha256=hash_token(token).hex(), created_at=time.time()
        )
        if not self.store._create(record.key, record.model_dump_json().encode()):
            raise IntegrityError("token id collision; retry")  # 64 random bits: never in practice
        return record, token

    def get(self, tenant: str, token_id: str) -> TenantTokenRecord:
        key = record_key(validate_name(tenant, "tenant"), validate_token_id(token_id))
        try:
            return self._parse(self.store._read(key))
        except NotFound:
            raise NotFound(f"tenant {tenant!r} has no token {token_id!r}") from None

    def list(self, tenant: str | None = None) -> list[TenantTokenRecord]:
        """Every record (of one tenant), oldest first."""
        records = self.refresh({}, tenant).values()
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def revoke(self, tenant: str, token_id: str) -> TenantTokenRecord:
        record = self.get(tenant, token_id)
        self.store._delete(record.key)
        return record

    def rotate(self, tenant: str, token_id: str) -> tuple[TenantTokenRecord, str, TenantTokenRecord]:
        """A new token for the tenant, then the old one revoked: (new record, new token, old record)."""
        old = self.get(tenant, token_id)
        record, token = self.create(old.tenant)
        self.revoke(old.tenant, old.id)
        return record, token, old

    def refresh(
        self, known: dict[str, TenantTokenRecord], tenant: str | None = None
    ) -> dict[str, TenantTokenRecord]:
        """The current records by key; only keys not in ``known`` are read (records never change)."""
        prefix = RECORDS_PREFIX + (f"{validate_name(tenant, 'tenant')}/" if tenant else "")
        out: dict[str, TenantTokenRecord] = {}
        for key in self.store._keys(prefix):
            if not key.endswith(".json"):
                continue
            if key in known:
                out[key] = known[key]
                continue
            try:
                record = self._parse(self.store._read(key))
            except (NotFound, IntegrityError):
                continue  # revoked since the listing, or damaged: it authenticates nobody
            # Only valid under its own tenant's folder: a record copied elsewhere proves nothing.
            if key == record.key:
                out[key] = record
        return out

    @staticmethod
    def _parse(data: bytes) -> TenantTokenRecord:
        try:
            return TenantTokenRecord.model_validate_json(data)
        except Exception:
            raise IntegrityError("a stored tenant token record is damaged") from None
