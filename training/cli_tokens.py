"""``loraplex tokens``: create, list, rotate and revoke tenant tokens in the store, no restart needed.

The store keeps only each token's sha256 (``adapters_store.tokens``); a new token is printed once.
Running servers pick changes up within ``LORAPLEX_TOKEN_REFRESH_S`` (default 5 s).
"""

from __future__ import annotations

import json
import time

import click

from adapters_store import open_store
from adapters_store.tokens import TenantTokenRecord, TenantTokenRegistry
from training.cli_support import store_option

_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _registry(store_url: str) -> TenantTokenRegistry:
    return TenantTokenRegistry(open_store(store_url))


def _when(record: TenantTokenRecord) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.created_at))


@click.group("tokens")
def tokens_group() -> None:
    """Tenant tokens stored hashed in the store (servers see changes within LORAPLEX_TOKEN_REFRESH_S)."""


@tokens_group.command("create")
@click.argument("tenant")
@store_option
@_json
def tokens_create(tenant: str, store_url: str, as_json: bool) -> None:
    """Create a token for TENANT and print it once (only its sha256 is stored)."""
    record, token = _registry(store_url).create(tenant)
    if as_json:
        click.echo(json.dumps({**record.public(), "token": token}))
        return
    click.echo(f"created token {record.id} for tenant {record.tenant} (shown only now):")
    click.echo(token)


@tokens_group.command("list")
@click.argument("tenant", required=False)
@store_option
@_json
def tokens_list(tenant: str | None, store_url: str, as_json: bool) -> None:
    """List stored token ids (of TENANT, or of every tenant); never a token or its hash."""
    records = _registry(store_url).list(tenant)
    if as_json:
        click.echo(json.dumps([r.public() for r in records], indent=2))
        return
    if not records:
        click.echo("(none)")
        return
    for r in records:
        click.echo(f"{r.tenant}  {r.id}  created {_when(r)}")


@tokens_group.command("rotate")
@click.argument("tenant")
@click.argument("token_id")
@store_option
@_json
def tokens_rotate(tenant: str, token_id: str, store_url: str, as_json: bool) -> None:
    """Replace TOKEN_ID of TENANT: a new token is printed once and the old one is revoked."""
    record, token, old = _registry(store_url).rotate(tenant, token_id)
    if as_json:
        click.echo(json.dumps({**record.public(), "token": token, "revoked": old.id}))
        return
    click.echo(f"revoked {old.id}; created token {record.id} for tenant {record.tenant} (shown only now):")
    click.echo(token)


@tokens_group.command("revoke")
@click.argument("tenant")
@click.argument("token_id")
@store_option
def tokens_revoke(tenant: str, token_id: str, store_url: str) -> None:
    """Revoke TOKEN_ID of TENANT (refused by every server within LORAPLEX_TOKEN_REFRESH_S)."""
    old = _registry(store_url).revoke(tenant, token_id)
    click.echo(f"revoked token {old.id} of tenant {old.tenant}")
