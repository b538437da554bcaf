"""Bearer tokens -> who is calling. The tenant comes from the token only, never from the request body.

Tokens are kept as sha256 digests (a config may also give ``sha256:<hex>`` entries, so plain tokens
never need to sit in a file) and compared with ``hmac.compare_digest`` against every entry, so the
time taken does not depend on which entry, or how much of it, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapters_store.errors import Forbidden, InvalidRequest, Unauthorized
from adapters_store.names import validate_name

logger = logging.getLogger("loraplex.auth")

DEV_TENANT_HEADER = "x-loraplex-tenant"
HASH_PREFIX = "sha256:"
Role = Literal["admin", "tenant"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the admin, or one tenant."""

    role: Role
    tenant: str | None = None

    def require_tenant(self) -> str:
        if self.role != "tenant" or self.tenant is None:
            raise Forbidden("this route needs a tenant token; the admin token is for /v1/admin routes")
        return self.tenant

    def require_admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this route needs the admin token")


ADMIN = Principal("admin")


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _digest_of(entry: str) -> bytes:
    if entry.startswith(HASH_PREFIX):
        hex_part = entry[len(HASH_PREFIX) :]
        try:
            digest = bytes.fromhex(hex_part)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise InvalidRequest("a 'sha256:' token entry needs 64 hex digits")
        return digest
    return hash_token(entry)


class TokenBook:
    """Hashed tokens and the principal each one stands for."""

    def __init__(self, admin: list[str], tenants: dict[str, list[str]], insecure_dev: bool = False):
        entries: list[tuple[bytes, Principal]] = [(_digest_of(t), ADMIN) for t in admin]
        for tenant, tokens in tenants.items():
            validate_name(tenant, "tenant")
            entries += [(_digest_of(t), Principal("tenant", tenant)) for t in tokens]
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise InvalidRequest("the same token is configured twice (for two principals or twice for one)")
        self._entries = entries
        self.insecure_dev = insecure_dev
        if not entries and not insecure_dev:
            raise InvalidRequest(
                "no tokens configured: set LORAPLEX_ADMIN_TOKEN and LORAPLEX_TENANT_TOKENS (or "
                "LORAPLEX_TOKENS_FILE); for a local demo only, LORAPLEX_INSECURE_DEV=1"
            )

    @property
    def tenants(self) -> list[str]:
        return sorted({p.tenant for _, p in self._entries if p.tenant})

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, comparing against every entry in constant time."""
        presented = hash_token(token)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found

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


def load_tokens_file(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Read ``{"admin": [...], "tenants": {"acme": [...]}}``; entries may be ``sha256:<hex>``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read tokens file {path}: {e}") from None
    admin = data.get("admin", []) if isinstance(data, dict) else None
    tenants = data.get("tenants", {}) if isinstance(data, dict) else None
    if isinstance(admin, str):
        admin = [admin]
    if not isinstance(admin, list) or not isinstance(tenants, dict):
        raise InvalidRequest(f'{path}: expected {{"admin": [tokens], "tenants": {{"tenant": [tokens]}}}}')
    return [str(t) for t in admin], {
        str(k): [str(t) for t in (v if isinstance(v, list) else [v])] for k, v in tenants.items()
    }


def token_book_from_settings(settings) -> TokenBook:
    """Merge env tokens and the tokens file into one :class:`TokenBook`."""
    admin = [settings.admin_token.get_secret_value()] if settings.admin_token else []
    tenants = {k: list(v) for k, v in settings.tenant_tokens.items()}
    if settings.tokens_file is not None:
        file_admin, file_tenants = load_tokens_file(settings.tokens_file)
        admin += file_admin
        for tenant, tokens in file_tenants.items():
            tenants.setdefault(tenant, []).extend(tokens)
    if settings.insecure_dev:
        logger.warning(
            "\n%s\n!!! LORAPLEX INSECURE DEV MODE: requests without a token are trusted (tenant from the\n"
            "!!! %s header, admin otherwise). NEVER expose this server beyond localhost.\n%s",
            "!" * 100,
            DEV_TENANT_HEADER,
            "!" * 100,
        )
    return TokenBook(admin, tenants, insecure_dev=settings.insecure_dev)
