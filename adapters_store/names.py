"""Names and references: the one documented pattern every tenant, adapter, alias and base name obeys.

Pattern: 1-64 characters of lower-case ``a-z``, digits and ``._-``; it starts with a letter or digit
and never contains ``..``. Anything else (slashes, backslashes, NUL, percent-encoding, upper case,
trailing dots) is refused before it gets near a path or an object key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters_store.errors import Conflict, InvalidName

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
_VERSION_RE = re.compile(r"^v?([1-9][0-9]{0,8})$")
_NUMERIC_RE = re.compile(r"^v?[0-9]+$")

NAME_RULE = (
    "use 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit, "
    "without '..' or a trailing '.'"
)
LATEST = "latest"
RESERVED_ALIASES = frozenset({LATEST})


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid name, else raise :class:`InvalidName` saying why.

    >>> validate_name("acme-corp", "tenant")
    'acme-corp'
    """
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    if not _NAME_RE.match(value) or ".." in value or value.endswith("."):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidName(f"invalid {what} {shown!r}: {NAME_RULE}")
    return value


def is_valid_name(value: object) -> bool:
    """Whether ``value`` obeys the name rule; for messages that must not echo what they refuse."""
    return (
        isinstance(value, str)
        and bool(_NAME_RE.match(value))
        and ".." not in value
        and not value.endswith(".")
    )


def parse_version(value: str) -> int | None:
    """``"3"`` or ``"v3"`` -> 3; anything else -> None (it may be an alias)."""
    m = _VERSION_RE.match(value)
    return int(m.group(1)) if m else None


def validate_alias(value: object) -> str:
    alias = validate_name(value, "alias")
    if _NUMERIC_RE.match(alias):
        raise InvalidName(f"alias {alias!r} looks like a version number; pick a name such as 'production'")
    return alias


def validate_settable_alias(value: object) -> str:
    """An alias a caller may point at a version: valid, and not reserved (``latest`` always names the
    newest version). Checked before anything is written, so a refused alias stores nothing.

    >>> validate_settable_alias("production")
    'production'
    """
    alias = validate_alias(value)
    if alias in RESERVED_ALIASES:
        raise Conflict(f"'{alias}' always points at the newest version and cannot be moved")
    return alias


@dataclass(frozen=True)
class AdapterRef:
    """``tenant/adapter[@version|@alias]``; ``selector`` defaults to ``latest``."""

    tenant: str
    name: str
    selector: str = LATEST

    @property
    def version(self) -> int | None:
        return parse_version(self.selector)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.selector}"

    @classmethod
    def parse(cls, text: object, tenant: str | None = None) -> AdapterRef:
        """Parse ``tenant/name[@sel]``, or ``name[@sel]`` when ``tenant`` is given (the caller's tenant).

        >>> AdapterRef.parse("acme/intent@production")
        AdapterRef(tenant='acme', name='intent', selector='production')
        >>> AdapterRef.parse("intent@3", tenant="acme").version
        3
        """
        if not isinstance(text, str) or not text:
            raise InvalidName("adapter reference must be a non-empty string like 'tenant/name@alias'")
        body, _, selector = text.partition("@")
        if "@" in selector:
            raise InvalidName(f"adapter reference {text[:80]!r} has more than one '@'")
        parts = body.split("/")
        if tenant is not None and len(parts) == 1:
            parts = [tenant, parts[0]]
        if len(parts) != 2:
            raise InvalidName(
                f"adapter reference {text[:80]!r} must look like 'tenant/name[@version|@alias]'"
            )
        t = validate_name(parts[0], "tenant")
        n = validate_name(parts[1], "adapter name")
        if "@" in text and selector == "":
            # 'name@' would silently serve latest and bypass production: an empty selector is a mistake.
            raise InvalidName(
                f"adapter reference {text[:80]!r} ends with '@': give a version or alias after it, "
                "or leave out the '@' for the production alias"
            )
        if selector == "":
            selector = LATEST
        elif parse_version(selector) is None:
            if _NUMERIC_RE.match(selector):
                raise InvalidName(f"version {selector!r} is out of range: versions are 1, 2, 3...")
            validate_name(selector, "alias")
        return cls(t, n, selector)
