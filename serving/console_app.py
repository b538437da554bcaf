"""The operator console: a static page (``serving/console/``) on the JSON routes, plus two admin helpers.

``/console/`` serves plain HTML, CSS and JS from this package (no CDN, no build step); the files hold no
data, so they need no token. The page asks for the admin token and sends it as a bearer token to the
``/v1/admin/...`` routes, like any client. Two admin routes exist for it:
``POST /v1/admin/tenants/{tenant}/classify`` (the try-it box: any adapter version of any tenant) and
``GET /v1/admin/cache/residents`` (what the engine holds now). Usage comes from ``/v1/admin/usage``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from adapters_store.errors import InvalidRequest, LoraplexError
from adapters_store.names import AdapterRef, validate_name
from serving.management import ManagementContext, json_body, route

STATIC_DIR = Path(__file__).resolve().parent / "console"
MAX_TRY_CHARS = 2000


class TryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, max_length=200, description="name, name@version or name@alias")
    text: str = Field(min_length=1, max_length=MAX_TRY_CHARS)


@route("/admin/tenants/{tenant}/classify", ["POST"], "admin")
async def try_classify(request: Request, ctx: ManagementContext):
    """Classify one text with any of a tenant's adapters (the console's try-it box)."""
    from serving.engine import InferenceItem

    tenant = validate_name(request.path_params["tenant"], "tenant")
    body = await json_body(request, TryRequest)
    if AdapterRef.parse(body.adapter, tenant=tenant).tenant != tenant:  # 400 for a malformed reference
        raise InvalidRequest(f"adapter must be one of {tenant}'s: 'name', 'name@version' or 'name@alias'")
    engine = ctx.need_engine()
    item = InferenceItem(tenant=tenant, adapter=body.adapter, task="classify", text=body.text)
    (answer,) = await run_in_threadpool(engine.infer, [item])
    if isinstance(answer, LoraplexError):
        raise answer
    return {
        "adapter": answer.adapter,
        "version": answer.version,
        "digest": answer.digest,
        "labels": answer.labels,
        "scores": answer.scores,
    }


@route("/admin/cache/residents", ["GET"], "admin")
async def cache_residents(request: Request, ctx: ManagementContext):
    """Adapters loaded in this replica's engine now, least recently used (next evicted) first."""
    return {"residents": await run_in_threadpool(ctx.need_engine().cache_residents)}


CONSOLE_ROUTES = [try_classify, cache_residents]


def console_app() -> Starlette:
    """Mounted at ``/console``: the static page (``/console/`` is ``index.html``)."""
    return Starlette(routes=[Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="console")])
