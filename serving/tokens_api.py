"""Admin routes for tenant tokens: create, list, rotate and revoke without a restart.

Tokens live hashed in the store (``adapters_store.tokens``). A change made here takes effect on this
replica at once and on every other replica at its next token refresh (``LORAPLEX_TOKEN_REFRESH_S``).
A new token appears once, in the response that created it; listings show ids only.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from adapters_store.names import validate_name
from adapters_store.tokens import TenantTokenRegistry, validate_token_id
from serving.management import ManagementContext, route

TOKENS = "/admin/tenants/{tenant}/tokens"


def _registry(ctx: ManagementContext) -> TenantTokenRegistry:
    return TenantTokenRegistry(ctx.need_store())


def _tenant(request: Request) -> str:
    return validate_name(request.path_params["tenant"], "tenant")


@route(TOKENS, ["GET"], "admin")
async def list_tokens(request: Request, ctx: ManagementContext):
    """A tenant's stored tokens: ids and creation times (never a token or its hash). Tokens from the
    environment or the tokens file are not listed."""
    tenant = _tenant(request)
    records = await run_in_threadpool(_registry(ctx).list, tenant)
    return {"tenant": tenant, "tokens": [r.public() for r in records]}


@route(TOKENS, ["POST"], "admin", status=201)
async def create_token(request: Request, ctx: ManagementContext):
    """Create a token for a tenant (new or existing). The token is in this response only; the store
    keeps its sha256. It works on this replica at once, on others within the token refresh interval."""
    tenant = _tenant(request)
    record, token = await run_in_threadpool(_registry(ctx).create, tenant)
    if ctx.tokens is not None:
        ctx.tokens.added(record)
    return {**record.public(), "token": token}


@route(TOKENS + "/{token_id}/rotate", ["POST"], "admin", status=201)
async def rotate_token(request: Request, ctx: ManagementContext):
    """Replace a token: a new one is created and the old one revoked (to overlap them, create a new
    token first and revoke the old one later)."""
    tenant, token_id = _tenant(request), validate_token_id(request.path_params["token_id"])
    record, token, old = await run_in_threadpool(_registry(ctx).rotate, tenant, token_id)
    if ctx.tokens is not None:
        ctx.tokens.added(record)
        ctx.tokens.removed(old)
    return {**record.public(), "token": token, "revoked": old.id}


@route(TOKENS + "/{token_id}", ["DELETE"], "admin")
async def revoke_token(request: Request, ctx: ManagementContext):
    """Revoke a token: refused here at once, on other replicas within the token refresh interval."""
    tenant, token_id = _tenant(request), validate_token_id(request.path_params["token_id"])
    old = await run_in_threadpool(_registry(ctx).revoke, tenant, token_id)
    if ctx.tokens is not None:
        ctx.tokens.removed(old)
    return {"tenant": tenant, "revoked": old.id}


TOKEN_ROUTES = [list_tokens, create_token, rotate_token, revoke_token]
