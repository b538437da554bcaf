"""The pieces of riding out a store outage, each on its own (the e2e version: test_deploy_store_outage.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from adapters_store.errors import NotFound, StoreUnavailable
from serving.auth import TokenBook
from serving.engine.resolver import AliasResolver
from serving.gateway import GatewayMiddleware, GatewayState


class FlakyStore:
    """resolve() answers from a dict until ``down`` is set, then raises StoreUnavailable."""

    def __init__(self):
        self.down = False
        self.calls = 0

    def resolve(self, ref):
        self.calls += 1
        if self.down:
            raise StoreUnavailable("the adapter store is unreachable")
        if ref.name != "intent":
            raise NotFound(str(ref))
        return _Manifest(ref.tenant, ref.name, 7)


class _Manifest:
    def __init__(self, tenant, name, version):
        self.tenant, self.name, self.version = tenant, name, version
        self.created_at = f"2026-11-30T00:00:0{version % 10}Z"
        self.digest = f"digest-{tenant}-{name}-{version}"


def test_resolver_keeps_an_expired_answer_while_the_store_is_down():
    store = FlakyStore()
    resolver = AliasResolver(store, ttl_s=0.01, store_retry_s=0.2)
    first = resolver.resolve("acme", "intent")
    time.sleep(0.03)
    store.down = True
    again = resolver.resolve("acme", "intent")  # expired, store down: the last known answer
    assert again == first and store.calls == 2  # it did ask the store first
    # For store_retry_s nobody waits on the store again: warm answers stale, cold fails at once.
    assert resolver.resolve("acme", "intent") == first
    with pytest.raises(StoreUnavailable):
        resolver.resolve("globex", "intent")
    assert store.calls == 2
    time.sleep(0.25)
    with pytest.raises(StoreUnavailable):  # asks again after store_retry_s; nothing to fall back on
        resolver.resolve("globex", "intent")
    assert store.calls == 3
    store.down = False
    time.sleep(0.25)
    store.resolve = lambda ref: _Manifest(ref.tenant, ref.name, 8)  # promoted meanwhile
    assert resolver.resolve("acme", "intent").manifest.version == 8  # back: fresh answers again
    assert resolver.resolve("globex", "intent").manifest.version == 8


def test_resolver_not_found_is_not_hidden_by_an_old_answer():
    store = FlakyStore()
    resolver = AliasResolver(store, ttl_s=0.01)
    resolver.resolve("acme", "intent")
    time.sleep(0.03)
    store.resolve = lambda ref: (_ for _ in ()).throw(NotFound("deleted"))
    with pytest.raises(NotFound):  # only an unreachable store serves the stale answer
        resolver.resolve("acme", "intent")


def _call(app, path="/v1/adapters"):
    state = GatewayState(tokens=TokenBook([], {"acme": ["acme-secret-1"]}), is_ready=lambda: True)
    mw = GatewayMiddleware(app, state)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {
        "type": "http",
        "path": path,
        "method": "GET",
        "headers": [(b"authorization", b"Bearer acme-secret-1")],
    }
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("status", [503, 404, 200])
def test_every_503_carries_retry_after(status):
    async def app(scope, receive, send):
        body = json.dumps({"error": "store_unavailable", "message": "the adapter store is unreachable"})
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    got, headers, _ = _call(app)
    assert got == status
    if status == 503:
        assert int(headers[b"retry-after"]) > 0
    else:
        assert b"retry-after" not in headers


def test_retry_after_from_an_inner_layer_is_kept():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"30")]})
        await send({"type": "http.response.body", "body": b'{"error": "unavailable", "message": "m"}'})

    _, headers, _ = _call(app)
    assert headers[b"retry-after"] == b"30"


def test_gateway_own_503_has_retry_after():
    state = GatewayState(tokens=None)  # tokens not loaded yet: "service is starting"
    mw = GatewayMiddleware(None, state)
    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": "/v1/adapters", "method": "GET", "headers": []}
    asyncio.run(mw(scope, None, send))
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"].isdigit()
