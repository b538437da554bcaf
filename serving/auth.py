"""Bearer tokens -> who is calling. The tenant comes from the token only, never from the request body.

Tokens are known only by their sha256 (configured entries may already be ``sha256:<hex>``, so plain
tokens never need to sit in a file). Sources, merged into one :class:`TokenBook`:

- ``LORAPLEX_ADMIN_TOKEN``, ``LORAPLEX_TENANT_TOKENS``, ``LORAPLEX_METRICS_TOKEN`` and the
  ``LORAPLEX_TOKENS_FILE`` (read at start);
- tenant token records in the store (``adapters_store.tokens``), created, rotated and revoked over the
  admin API or ``loraplex tokens`` without a restart, re-read every ``token_refresh_s`` seconds.

A presented token is hashed and looked up by its digest. The attacker chooses the token, not its
digest, so the time a lookup takes tells nothing about any stored digest's bytes.
No message built here contains a token or a part of one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapters_store.errors import Forbidden, InvalidSettings, Unauthorized
from adapters_store.names import is_valid_name, validate_name
from adapters_store.tokens import TenantTokenRecord, TenantTokenRegistry, entry_digest, hash_token

logger = logging.getLogger("loraplex.auth")

DEV_TENANT_HEADER = "x-loraplex-tenant"
Role = Literal["admin", "tenant", "metrics"]
__all__ = ["ADMIN", "METRICS", "Principal", "TokenBook", "hash_token", "token_book_from_settings"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the admin, one tenant, or the metrics scraper."""

    role: Role
    tenant: str | None = None

    def require_tenant(self) -> str:
        if self.role != "tenant" or self.tenant is None:
            raise Forbidden("this route needs a tenant token; the admin token is for /v1/admin routes")
        return self.tenant

    def require_admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this route needs the admin token")

    def require_metrics(self) -> None:
        if self.role not in ("admin", "metrics"):
            raise Forbidden("/metrics needs the admin token or the metrics token")


ADMIN = Principal("admin")
METRICS = Principal("metrics")


@dataclass(frozen=True)
class ConfiguredToken:
    """A configured secret and where it came from (for errors: a variable and position, never a value)."""

    secret: str
    principal: Principal
    where: str


class TokenBook:
    """Token digests and the principal each one stands for: configured ones plus the store's records."""

    def __init__(
        self,
        admin: list[str] = (),  # type: ignore[assignment]
        tenants: Mapping[str, list[str]] | None = None,
        insecure_dev: bool = False,
        *,
        configured: list[ConfiguredToken] = (),  # type: ignore[assignment]
        registry: TenantTokenRegistry | None = None,
    ):
        """``TokenBook(["adm..."], {"acme": ["tok..."]})``, or ``configured=`` entries that know where
        they came from (settings), plus an optional store ``registry`` of tenant token records."""
        entries = [ConfiguredToken(t, ADMIN, f"admin token {i}") for i, t in enumerate(admin, 1)]
        for tenant, tokens in (tenants or {}).items():
            validate_name(tenant, "tenant")
            entries += [
                ConfiguredToken(t, Principal("tenant", tenant), f"tenant {tenant!r} token {i}")
                for i, t in enumerate(tokens, 1)
            ]
        self._static: dict[bytes, Principal] = {}
        seen: dict[bytes, str] = {}
        for entry in [*entries, *configured]:
            try:
                digest = entry_digest(entry.secret)
            except ValueError as e:
                raise InvalidSettings(f"{entry.where}: {e}") from None
            if digest in seen:
                raise InvalidSettings(f"{entry.where} repeats the token of {seen[digest]}")
            seen[digest] = entry.where
            self._static[digest] = entry.principal
        self.insecure_dev = insecure_dev
        self.registry = registry
        self._records: dict[str, TenantTokenRecord] = {}
        self._dynamic: dict[bytes, Principal] = {}
        self._lock = threading.Lock()
        if registry is not None:
            self.refresh()
        callers = [p for p in self._static.values() if p.role != "metrics"]  # a scraper alone serves nobody
        if not callers and not self._dynamic and not insecure_dev:
            raise InvalidSettings(
                "no tokens configured: set LORAPLEX_ADMIN_TOKEN and LORAPLEX_TENANT_TOKENS (or "
                "LORAPLEX_TOKENS_FILE), or create tenant tokens with 'loraplex tokens create'; for a "
                "local demo only, LORAPLEX_INSECURE_DEV=1"
            )

    @property
    def tenants(self) -> list[str]:
        principals = [*self._static.values(), *self._dynamic.values()]
        return sorted({p.tenant for p in principals if p.tenant})

    def lookup(self, token: str) -> Principal | None:
        digest = hash_token(token)
        return self._static.get(digest) or self._dynamic.get(digest)

    def authenticate(self, authorization: str | None, dev_tenant: str | None = None) -> Principal:
        """``Authorization: Bearer <token>`` -> principal, else :class:`Unauthorized`."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            principal = self.lookup(token.strip())
            if principal is not None:
                return principal
            raise Unauthorized("invalid token")
        if self.insecure_dev:
            # Demo mode: with a tenant header the caller is that tenant, without one the admin.
            return Principal("tenant", validate_name(dev_tenant, "tenant")) if dev_tenant else ADMIN
        raise Unauthorized("missing 'Authorization: Bearer <token>' header")

    # -- store records ------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Re-read the store's tenant token records (only new ones are fetched); returns how many."""
        if self.registry is None:
            return 0
        with self._lock:  # a revoke on this replica during a listing must not be undone by it
            records = self.registry.refresh(self._records)
            self._install(records)
        return len(records)

    def added(self, record: TenantTokenRecord) -> None:
        """A record this replica just created: valid here at once, not at the next refresh."""
        with self._lock:
            self._install({**self._records, record.key: record})

    def removed(self, record: TenantTokenRecord) -> None:
        """A record this replica just revoked: refused here at once."""
        with self._lock:
            self._install({k: r for k, r in self._records.items() if k != record.key})

    def _install(self, records: dict[str, TenantTokenRecord]) -> None:
        # Built aside and swapped in one assignment: a lookup sees the old or the new map, never half.
        self._dynamic = {r.digest: Principal("tenant", r.tenant) for r in records.values()}
        self._records = records


class TokenRefresher(threading.Thread):
    """Re-reads the store's tenant tokens every ``interval`` seconds, so a token created or revoked on
    any replica works (or stops working) here within that bound. A failed read keeps the last set
    and is logged (nobody can change the records while the store is unreachable either)."""

    def __init__(self, book: TokenBook, interval: float):
        super().__init__(name="loraplex-token-refresh", daemon=True)
        self.book, self.interval = book, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.book.refresh()
            except Exception as e:  # the message of our errors carries no secret; others: type only
                logger.warning("re-reading tenant tokens failed: %s", getattr(e, "message", type(e).__name__))


def load_tokens_file(path: Path) -> list[ConfiguredToken]:
    """Read ``{"admin": [...], "tenants": {"acme": [...]}, "metrics": [...]}``; entries may be
    ``sha256:<hex>``. Errors name the file and the entry's place, never its content."""
    where = f"LORAPLEX_TOKENS_FILE {path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidSettings(f"{where}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        at = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidSettings(f"{where}: not valid JSON{at}") from None
    shape = '{"admin": [tokens], "tenants": {"tenant": [tokens]}, "metrics": [tokens]}'
    if not isinstance(data, dict) or set(data) - {"admin", "tenants", "metrics"}:
        raise InvalidSettings(f"{where}: expected {shape}")
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise InvalidSettings(f"{where}: 'tenants' must map tenant names to token lists")
    out = _entries(data.get("admin", []), ADMIN, f"{where}, admin")
    out += _entries(data.get("metrics", []), METRICS, f"{where}, metrics")
    for i, (tenant, tokens) in enumerate(tenants.items(), 1):
        if not is_valid_name(tenant):
            raise InvalidSettings(f"{where}: tenant {i} has an invalid name")
        out += _entries(tokens, Principal("tenant", tenant), f"{where}, tenant {tenant!r}")
    return out


def _entries(value: object, principal: Principal, where: str) -> list[ConfiguredToken]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise InvalidSettings(f"{where}: expected a token or a list of tokens (strings)")
    return [ConfiguredToken(t, principal, f"{where} entry {i}") for i, t in enumerate(items, 1)]


def configured_tokens(settings) -> list[ConfiguredToken]:
    """Every token from the environment and the tokens file, with where each came from."""
    out = []
    if settings.admin_token is not None:
        out.append(ConfiguredToken(settings.admin_token.get_secret_value(), ADMIN, "LORAPLEX_ADMIN_TOKEN"))
    if settings.metrics_token is not None:
        out.append(
            ConfiguredToken(settings.metrics_token.get_secret_value(), METRICS, "LORAPLEX_METRICS_TOKEN")
        )
    for tenant, tokens in settings.tenant_tokens.items():
        out += [
            ConfiguredToken(
                t.get_secret_value(),
                Principal("tenant", tenant),
                f"LORAPLEX_TENANT_TOKENS (tenant {tenant!r})",
            )
            for t in tokens
        ]
    if settings.tokens_file is not None:
        out += load_tokens_file(settings.tokens_file)
    return out


def token_book_from_settings(settings, store=None) -> TokenBook:
    """Merge env tokens, the tokens file and (with a store) the store's tenant token records."""
    if settings.insecure_dev:
        logger.warning(
            "\n%s\n!!! LORAPLEX INSECURE DEV MODE: requests without a token are trusted (tenant from the\n"
            "!!! %s header, admin otherwise). NEVER expose this server beyond localhost.\n%s",
            "!" * 100,
            DEV_TENANT_HEADER,
            "!" * 100,
        )
    registry = TenantTokenRegistry(store) if store is not None else None
    return TokenBook(
        configured=configured_tokens(settings), insecure_dev=settings.insecure_dev, registry=registry
    )
