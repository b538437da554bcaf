"""Admin routes for per-tenant quotas and usage (mounted in the /v1 management app).

``GET /v1/admin/usage``: rows, tokens, requests and rejections per tenant on this replica, with the
limits each is held to and its rows in flight. ``GET /v1/admin/quotas``: defaults and overrides.
``PUT /v1/admin/tenants/{tenant}/quota`` (JSON ``TenantQuota``) stores an override in the store and
applies it here at once (other replicas within ``LORAPLEX_QUOTA_REFRESH_S``); ``DELETE`` removes it.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from adapters_store.names import validate_name
from adapters_store.quotas import TenantQuota
from serving.management import ManagementContext, json_body, route
from serving.quotas import QuotaBook

QUOTA = "/admin/tenants/{tenant}/quota"


def _view(book: QuotaBook, tenant: str) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "quota": book.quota(tenant).model_dump(),
        "override": (o.model_dump(exclude_none=True) if (o := book.overrides().get(tenant)) else None),
    }


@route("/admin/usage", ["GET"], "admin")
async def usage(request: Request, ctx: ManagementContext):
    """Per-tenant usage on this replica since it started (rows, tokens, requests, rejected), with
    each tenant's limits and rows in flight now."""
    book = ctx.need_book()
    snap = ctx.usage.snapshot()
    for tenant, row in snap["tenants"].items():
        row["inflight_rows"] = book.inflight_rows(tenant)
        row["quota"] = book.quota(tenant).model_dump()
    return snap


@route("/admin/quotas", ["GET"], "admin")
async def list_quotas(request: Request, ctx: ManagementContext):
    """Default per-tenant limits and every stored override."""
    book = ctx.need_book()
    await run_in_threadpool(book.refresh, True)
    return {
        "defaults": book.defaults.model_dump(),
        "overrides": {t: q.model_dump(exclude_none=True) for t, q in sorted(book.overrides().items())},
    }


@route(QUOTA, ["GET"], "admin")
async def show_quota(request: Request, ctx: ManagementContext):
    """The limits one tenant is held to and its override, if any."""
    tenant = validate_name(request.path_params["tenant"], "tenant")
    return _view(ctx.need_book(), tenant)


@route(QUOTA, ["PUT"], "admin")
async def set_quota(request: Request, ctx: ManagementContext):
    """Override a tenant's limits (JSON ``{"rps", "burst", "max_inflight_rows"}``; omitted or null
    fields keep the default). Applies at once, no restart."""
    tenant = validate_name(request.path_params["tenant"], "tenant")
    quota = await json_body(request, TenantQuota)
    book, store = ctx.need_book(), ctx.need_store()
    await run_in_threadpool(store.set_quota, tenant, quota)
    book.set_override(tenant, quota)
    return _view(book, tenant)


@route(QUOTA, ["DELETE"], "admin")
async def delete_quota(request: Request, ctx: ManagementContext):
    """Remove a tenant's override: the defaults apply again."""
    tenant = validate_name(request.path_params["tenant"], "tenant")
    book, store = ctx.need_book(), ctx.need_store()
    await run_in_threadpool(store.delete_quota, tenant)
    book.set_override(tenant, None)
    return _view(book, tenant)


QUOTA_ROUTES = [usage, list_quotas, show_quota, set_quota, delete_quota]
