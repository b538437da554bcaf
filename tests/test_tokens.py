"""Tenant tokens kept hashed in the store: the registry (local and S3), the token book's refresh, the
``loraplex tokens`` commands, and /metrics behind a token. No server here (see test_e2e_auth.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from adapters_store.errors import InvalidName, NotFound
from adapters_store.tokens import RECORDS_PREFIX, TenantTokenRegistry, hash_token
from serving.auth import TokenBook
from serving.gateway import GatewayMiddleware, GatewayState
from training.cli import main


def stored_bytes(store) -> bytes:
    return b"".join(store._read(k) for k in store._keys("auth/"))


def test_registry_create_list_rotate_revoke_keeps_only_hashes(any_store):
    registry = TenantTokenRegistry(any_store)
    record, token = registry.create("acme")
    other, _ = registry.create("globex")
    assert token.startswith("lpx_") and len(token) > 40 and record.sha256 == hash_token(token).hex()
    assert token.encode() not in stored_bytes(any_store)  # only the hash is stored
    assert [r.id for r in registry.list("acme")] == [record.id]
    assert {r.tenant for r in registry.list()} == {"acme", "globex"}
    new, new_token, old = registry.rotate("acme", record.id)
    assert old.id == record.id and new.id != record.id and new_token != token
    assert [r.id for r in registry.list("acme")] == [new.id]
    registry.revoke("globex", other.id)
    assert registry.list("globex") == []
    with pytest.raises(NotFound):
        registry.revoke("globex", other.id)
    with pytest.raises(InvalidName):
        registry.revoke("acme", "../../bases/x")


def test_token_book_follows_the_store_and_ignores_moved_records(local_store):
    registry = TenantTokenRegistry(local_store)
    book = TokenBook(["admin-token-123"], {}, registry=registry)
    record, token = registry.create("acme")
    assert book.lookup(token) is None  # created elsewhere: not seen before the next refresh
    book.refresh()
    assert book.lookup(token).tenant == "acme" and "acme" in book.tenants
    # A record copied under another tenant's folder must not authenticate as that tenant.
    local_store._write(f"{RECORDS_PREFIX}globex/{record.id}.json", local_store._read(record.key))
    registry.revoke("acme", record.id)
    book.refresh()
    assert book.lookup(token) is None
    # Changes made through this replica apply at once.
    record2, token2 = registry.create("initech")
    book.added(record2)
    assert book.lookup(token2).tenant == "initech"
    book.removed(record2)
    assert book.lookup(token2) is None


def test_a_store_with_tenant_tokens_is_enough_to_start(local_store):
    with pytest.raises(Exception, match="no tokens configured"):
        TokenBook(registry=TenantTokenRegistry(local_store))
    TenantTokenRegistry(local_store).create("acme")
    assert TokenBook(registry=TenantTokenRegistry(local_store)).tenants == ["acme"]


def test_tokens_cli_create_list_rotate_revoke(tmp_path):
    runner, store = CliRunner(), str(tmp_path / "store")

    def run(*args: str) -> str:
        result = runner.invoke(main, ["tokens", *args, "--store", store])
        assert result.exit_code == 0, result.output
        return result.output

    created = json.loads(run("create", "acme", "--json"))
    listed = json.loads(run("list", "--json"))
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    assert created["token"] not in run("list")
    rotated = json.loads(run("rotate", "acme", created["id"], "--json"))
    assert rotated["revoked"] == created["id"] and rotated["token"] != created["token"]
    assert "revoked token" in run("revoke", "acme", rotated["id"])
    assert run("list").strip() == "(none)"
    bad = runner.invoke(main, ["tokens", "revoke", "acme", rotated["id"], "--store", store])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "[not_found]" in bad.output


async def _get_metrics(state: GatewayState, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"loraplex_ready 1.0"})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/metrics", "method": "GET", "headers": headers}
    await GatewayMiddleware(app, state)(scope, receive, send)
    return sent[0]["status"]


@pytest.mark.parametrize(
    "public, token, status",
    [
        (False, None, 401),
        (False, "acme-token-123", 403),  # a tenant token: tenant names are not a tenant's business
        (False, "wrong-token-123", 401),
        (False, "admin-token-123", 200),
        (False, "metrics-token-123", 200),
        (True, None, 200),
    ],
)
def test_metrics_needs_the_admin_or_metrics_token_unless_public(public, token, status):
    from serving.auth import METRICS, ConfiguredToken

    book = TokenBook(
        ["admin-token-123"],
        {"acme": ["acme-token-123"]},
        configured=[ConfiguredToken("metrics-token-123", METRICS, "LORAPLEX_METRICS_TOKEN")],
    )
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    state = GatewayState(tokens=book, metrics_public=public)
    assert asyncio.run(_get_metrics(state, headers)) == status
