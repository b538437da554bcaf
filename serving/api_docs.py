"""The API description: one OpenAPI document for every route, and a Swagger page that shows it.

BentoML's own ``/docs.json`` (and its page at ``/``) knows only the BentoML APIs (classify, embed,
probes); the management routes live in a mounted Starlette app. ``GET /v1/openapi.json`` merges both,
and ``GET /v1/docs`` renders it with BentoML's bundled Swagger UI, whose "Authorize" button takes the
bearer token (kept across reloads), so every route can be tried from the page.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

logger = logging.getLogger("loraplex.api_docs")

BEARER = {"bearer": {"type": "http", "scheme": "bearer", "description": "admin or tenant token"}}
# BentoML routes that need a token (the probes and /metrics do not).
TOKEN_ROUTES = frozenset({"/v1/classify", "/v1/embed"})
ERROR_RESPONSE = {"description": 'error: {"error": "<code>", "message": "..."}'}


def route_spec(route: Route, status: int, extra_params: list[dict]) -> dict[str, Any]:
    """The OpenAPI operations of one management route (its success status as the route answers it)."""
    doc = (route.endpoint.__doc__ or route.name).strip()
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in route.param_convertors
    ] + extra_params
    return {
        method.lower(): {
            "operationId": f"{route.name}_{method.lower()}",
            "summary": doc.split("\n")[0],
            "description": doc,
            "parameters": params,
            "security": [{"bearer": []}],
            "responses": {str(status): {"description": "JSON"}, "4XX": ERROR_RESPONSE},
        }
        for method in sorted(route.methods - {"HEAD"})
    }


def spec_document(paths: dict[str, Any], title: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.2",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": BEARER},
    }


def with_service_routes(spec: dict[str, Any], service_spec: dict[str, Any] | None) -> dict[str, Any]:
    """``spec`` plus BentoML's routes (classify, embed, probes) and their schemas."""
    if not service_spec:
        return spec
    paths = dict(spec["paths"])
    for path, item in service_spec.get("paths", {}).items():
        ops = {m: dict(op) for m, op in item.items()}
        if path in TOKEN_ROUTES:
            for op in ops.values():
                op["security"] = [{"bearer": []}]
        paths.setdefault(path, ops)
    components = {**service_spec.get("components", {}), **spec["components"]}
    info = {**spec["info"], "title": "loraplex API"}
    return {**spec, "info": info, "paths": dict(sorted(paths.items())), "components": components}


def bentoml_service_spec() -> dict[str, Any] | None:
    """BentoML's description of the service's own APIs; None if it cannot be built here."""
    try:
        from serving.service import LoraplexService

        return LoraplexService.openapi_spec.asdict()
    except Exception:  # the page must still show the management routes
        logger.exception("BentoML's OpenAPI description is unavailable")
        return None


SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>loraplex API</title>
  <link rel="stylesheet" href="/static_content/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/static_content/swagger-ui-bundle.js"></script>
  <script src="/static_content/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/v1/openapi.json",
      dom_id: "#swagger-ui",
      persistAuthorization: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout",
    });
  </script>
</body>
</html>
"""


async def docs_page(request: Request) -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE)
