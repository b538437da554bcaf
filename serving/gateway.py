"""The ASGI middleware in front of every route: auth, body limits, overload, error bodies, metrics.

Order for each HTTP request: public probe paths pass straight through; otherwise the bearer token is
resolved to a :class:`~serving.auth.Principal` (401 without one), the route's role is checked (403),
the in-flight limit is taken (429), the body limit applied (413 from ``Content-Length`` or while
streaming), inference bodies are validated (400/415/422 with our messages), and the principal is put
in ``scope["state"]`` for the routes, with the parsed inference body (routes never parse it again).
After quotas and cold preloading, ``/v1/classify`` and ``/v1/embed`` are answered right here by the
state's ``inference`` handler: nothing behind the gateway runs for them.
Any 4xx/5xx that some inner layer (BentoML, Starlette) wrote in its own shape is rewritten to
``{"error", "message"}``. Every error is rendered by :mod:`serving.error_responses`.

The middleware's :class:`GatewayState` belongs to one service instance: it is given to the middleware,
or read per request from ``source.state.gateway`` (the ``/v1`` app the service instance fills in).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from adapters_store.errors import (
    InvalidName,
    InvalidRequest,
    LoraplexError,
    NotFound,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationError,
)
from serving import metrics
from serving.auth import DEV_TENANT_HEADER, Principal, TokenBook
from serving.error_responses import StatusError, error_body, json_headers, send_error
from serving.limits import InflightLimiter, check_content_length, check_items, limited_receive, read_body
from serving.openai_errors import is_openai_error, is_openai_path
from serving.settings import NATIVE_INFERENCE_ROUTES, LimitSettings

logger = logging.getLogger("loraplex.gateway")

PRINCIPAL_KEY = "loraplex_principal"
PARSED_KEY = "loraplex_parsed"  # the inference body the gateway parsed, for the route
PUBLIC_PATHS = frozenset(
    {"/livez", "/readyz", "/healthz", "/docs.json", "/schema.json", "/", "/v1/openapi.json", "/v1/docs"}
) | {"/console"}
# The console's files are static and hold no data; its data comes from token-checked /v1 routes.
PUBLIC_PREFIXES = ("/static_content/", "/assets/", "/console/")
INFERENCE_PATHS = frozenset(NATIVE_INFERENCE_ROUTES)
_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
    504: "timeout",
}


@dataclass
class GatewayState:
    """One service instance's gateway settings and hooks; the middleware reads it per request."""

    tokens: TokenBook | None = None
    limits: LimitSettings = field(default_factory=LimitSettings)
    validators: dict[str, type[BaseModel]] = field(default_factory=dict)
    is_ready: Callable[[], bool] = lambda: False
    cache_stats: Callable[[], dict[str, Any]] = dict
    resident: Callable[[], list[dict[str, Any]]] = list
    limiter: InflightLimiter | None = None
    preload: Callable[[str | None, list], Awaitable[Callable[[], None]]] | None = None
    """Loads an inference request's cold adapters before it is batched (serving.preload.ColdLoads);
    returns the function that releases them once the request is answered."""
    # Per-tenant quotas: admit(tenant, rows) raises 429 (see serving.quotas); release(tenant, rows).
    quotas: Any = None
    inference: Callable[[str, Any, str, Any], Awaitable[int]] | None = None
    """Answers ``/v1/classify`` and ``/v1/embed`` here, once the request is authenticated, parsed,
    admitted and preloaded: ``(path, parsed body, tenant, send) -> status`` (serving.http_io.
    inference_handler). None: the request goes on to the routes behind the gateway."""
    metrics_public: bool = False  # /metrics without a token (LORAPLEX_METRICS_AUTH=public, insecure dev)
    base_name: str | None = None  # an OpenAI-style 'model' naming the base is no adapter to preload


def parsed_body(scope) -> BaseModel | None:
    """The inference body the gateway parsed for this request (None if it parsed none)."""
    return scope.get("state", {}).get(PARSED_KEY)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_upload(method: str, path: str) -> bool:
    """Adapter uploads and training jobs (datasets) take the upload limit; their routes apply their own."""
    if method != "POST":
        return False
    return (path.startswith("/v1/admin/") and path.endswith("/versions")) or path.endswith("/jobs")


# Percent-encoded '/', '\\' and NUL: no name may hold them, and decoded they would move a request
# into another route (``acme%2Fadapters%2Fvictim``).
_ENCODED_SEPARATORS = (b"%2f", b"%5c", b"%00")


def check_path(path: str, raw_path: bytes | None) -> None:
    """Refuse a path that is not plain names between single slashes, before any route sees it.

    ``.../versions/..%2F`` decodes to ``.../versions/../``: a router would redirect it (307) to
    ``.../versions/..``, which a client following redirects resolves to the adapter itself (and a
    DELETE there deletes every version). So dot segments and encoded separators are a 400, empty
    segments (a trailing or doubled '/') a 404; nothing here is ever redirected.
    """
    raw = (raw_path or path.encode()).split(b"?", 1)[0].lower()
    if any(sep in raw for sep in _ENCODED_SEPARATORS):
        raise InvalidName("a percent-encoded '/', '\\' or NUL is never part of a name in a URL path")
    segments = path.split("/")[1:]
    for segment in segments:
        if segment in (".", "..") or "\\" in segment or "\x00" in segment:
            raise InvalidName(f"path segment {segment!r} is not a name: names are a-z, 0-9, '.', '_', '-'")
    if "" in segments:
        raise NotFound(f"no route {path[:200]!r}: paths have no empty segments or trailing '/'")


def required_role(path: str) -> str:
    """``admin`` for management, ``tenant`` for everything else under /v1 and unknown paths."""
    return "admin" if path == "/v1/admin" or path.startswith("/v1/admin/") else "tenant"


def normalise_error_body(status: int, body: bytes, path: str, ready: bool) -> tuple[int, bytes]:
    """Rewrite a foreign error body into ours (``{"error", "message"}``, OpenAI's shape on its routes);
    ours pass unchanged."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if is_openai_path(path):
        if is_openai_error(data):
            return status, body
        if isinstance(data, dict) and set(data) == {"error", "message"}:
            return status, error_body(StatusError(str(data["message"]), status, str(data["error"])), path)
    elif isinstance(data, dict) and set(data) == {"error", "message"}:
        return status, body
    if status == 503 and ready and path in INFERENCE_PATHS:
        # BentoML's batch dispatcher sheds load with 503; to clients that is overload: 429.
        status, data = 429, {"error": "server is overloaded; retry shortly"}
    err = StatusError(_foreign_message(data, body), status, _CODES.get(status, "internal_error"))
    return status, error_body(err, path)


def _foreign_message(data: Any, body: bytes) -> str:
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        text = str(data.get("error") or data.get("detail") or data)
        if isinstance(data.get("detail"), list):
            text += ": " + "; ".join(str(d.get("msg", d)) for d in data["detail"][:5] if isinstance(d, dict))
        return text[:1000]
    return (body.decode(errors="replace").strip() or "request failed")[:1000]


def validate_inference_body(body: bytes, model: type[BaseModel], limits: LimitSettings) -> BaseModel:
    """Parse with the route's schema and apply item limits; raises our errors with clear messages."""
    try:
        parsed = model.model_validate_json(body)
    except PydanticValidationError as e:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            raise InvalidRequest("request body is not valid JSON") from None
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ValidationError(f"request body does not match the schema: {details}") from None
    if hasattr(parsed, "row_count"):  # the OpenAI-style bodies check and count their own inputs
        parsed.check(limits)
    else:
        check_items(getattr(parsed, "items", []), limits)
    return parsed


def request_rows(parsed: BaseModel | None) -> int:
    """The request's engine rows (items times fanned-out adapters), which quotas count."""
    if parsed is None:
        return 0
    if hasattr(parsed, "row_count"):
        return parsed.row_count()
    return sum(len(getattr(item, "targets", None) or [None]) for item in getattr(parsed, "items", []))


def request_adapters(parsed: BaseModel, base_name: str | None = None) -> list[str | None]:
    """The adapter references a body names (fan-out included; OpenAI-style ``model``s other than the
    base's own name), for cold preloading."""
    if hasattr(parsed, "adapter_refs"):
        return parsed.adapter_refs(base_name)
    return [t for item in getattr(parsed, "items", []) for t in (getattr(item, "targets", None) or [None])]


class GatewayMiddleware:
    """ASGI middleware; BentoML installs it with ``Service.add_asgi_middleware``."""

    def __init__(self, app, state: GatewayState | None = None, source: Any = None):
        self.app = app
        self._state = state
        self._source = source  # an ASGI app whose ``state.gateway`` its service instance fills in
        self._starting = GatewayState()  # until then: 503 "service is starting"

    @property
    def state(self) -> GatewayState:
        if self._state is not None:
            return self._state
        found = getattr(getattr(self._source, "state", None), "gateway", None)
        return found if isinstance(found, GatewayState) else self._starting

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/metrics":
            return await self._metrics(scope, receive, send)
        if is_public(path):
            return await self.app(scope, receive, send)
        start, principal, status = time.perf_counter(), None, 500
        state = self.state
        limiter = state.limiter
        try:
            check_path(path, scope.get("raw_path"))
            principal = self._authenticate(state, scope)
            if limiter is not None:
                limiter.acquire()
            release = None
            try:
                receive, parsed = await self._guard_body(state, scope, receive, principal)
                scope_state = scope.setdefault("state", {})
                scope_state[PRINCIPAL_KEY] = principal
                if parsed is not None:
                    scope_state[PARSED_KEY] = parsed
                rows = request_rows(parsed)
                quotas = state.quotas if rows else None
                if quotas is not None:
                    quotas.admit(principal.tenant, rows)
                try:
                    if parsed is not None and state.preload is not None:
                        refs = request_adapters(parsed, state.base_name)
                        release = await state.preload(principal.tenant, refs)
                    if parsed is not None and state.inference is not None and path in INFERENCE_PATHS:
                        status = await self._answer(state.inference, path, parsed, principal, send)
                    else:
                        status = await self._call_app(state, scope, receive, send, path)
                finally:
                    if quotas is not None:
                        quotas.release(principal.tenant, rows)
            finally:
                if release is not None:
                    release()
                if limiter is not None:
                    limiter.release()
        except LoraplexError as err:
            status = await send_error(send, err, path)
        metrics.observe_request(
            principal.tenant if principal else None, path, status, time.perf_counter() - start
        )

    async def _metrics(self, scope, receive, send) -> None:
        """``/metrics`` lists tenant names: it needs the admin or metrics token unless made public."""
        state = self.state
        if not state.metrics_public:
            try:
                tokens = state.tokens
                if tokens is None:
                    raise ServiceUnavailable("service is starting")
                headers = dict(scope["headers"])
                tokens.authenticate(headers.get(b"authorization", b"").decode("latin-1")).require_metrics()
            except LoraplexError as err:
                await send_error(send, err)
                return
        self._publish_cache_stats(state)
        await self.app(scope, receive, send)

    def _authenticate(self, state: GatewayState, scope) -> Principal:
        tokens = state.tokens
        if tokens is None:
            raise ServiceUnavailable("service is starting")  # tokens are set in the service's __init__
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        dev = headers.get(DEV_TENANT_HEADER.encode(), b"").decode("latin-1") or None
        principal = tokens.authenticate(auth, dev_tenant=dev)
        if required_role(scope["path"]) == "admin":
            principal.require_admin()
        return principal

    async def _guard_body(self, state: GatewayState, scope, receive, principal: Principal):
        headers = dict(scope["headers"])
        method, path = scope["method"], scope["path"]
        limit = state.limits.max_upload_bytes if is_upload(method, path) else state.limits.max_body_bytes
        check_content_length(headers, limit)
        model = state.validators.get(path)
        if model is None or method != "POST":
            return limited_receive(receive, limit), None
        principal.require_tenant()
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType(
                f"send JSON with 'Content-Type: application/json' (got {ctype or 'none'!r})"
            )
        body = await read_body(receive, limit)
        parsed = validate_inference_body(body, model, state.limits)
        return _replay(body), parsed

    async def _call_app(self, state: GatewayState, scope, receive, send, path: str) -> int:
        rewriter = _ErrorRewriter(send, path, state.is_ready())
        try:
            await self.app(scope, receive, rewriter)
        except LoraplexError as err:  # e.g. PayloadTooLarge raised from the limited receive
            if rewriter.started:
                raise
            return await send_error(send, err, path)
        return rewriter.status

    async def _answer(self, handler, path: str, parsed: BaseModel, principal: Principal, send) -> int:
        try:
            return await handler(path, parsed, principal.tenant, send)
        except LoraplexError as err:
            return await send_error(send, err, path)
        except Exception:  # as BentoML's API wrapper did: logged, and a 500 in our shape
            logger.exception("answering %s failed", path)
            err = StatusError("an unexpected error has occurred; see the server log", 500, "internal_error")
            return await send_error(send, err, path)

    def _publish_cache_stats(self, state: GatewayState) -> None:
        try:
            metrics.publish_cache_stats(state.cache_stats())
            metrics.publish_residency(state.resident(), protected=not state.metrics_public)
        except Exception:  # metrics must never break the scrape
            logger.exception("cache stats unavailable")


def _replay(body: bytes):
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


class _ErrorRewriter:
    """Wraps ``send``: passes 2xx and 304 through, buffers error bodies and rewrites them (they are
    small). A redirect from an inner router becomes a 404: no route of ours redirects, and following
    one could carry a DELETE onto another resource."""

    def __init__(self, send, path: str, ready: bool):
        self.send, self.path, self.ready = send, path, ready
        self.status, self.started = 500, False
        self._start: dict[str, Any] | None = None
        self._chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            if self.status < 300 or self.status == 304:
                return await self.send(message)
            self._start = message
            return None
        if message["type"] == "http.response.body" and self._start is not None:
            self._chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            return await self._flush()
        return await self.send(message)

    async def _flush(self) -> None:
        if self.status < 400:  # a redirect (see the class docstring)
            self.status = await send_error(self.send, NotFound(f"no route {self.path[:200]!r}"))
            return
        status, body = normalise_error_body(self.status, b"".join(self._chunks), self.path, self.ready)
        self.status = status
        keep = [
            (k, v)
            for k, v in self._start.get("headers", [])
            if k.lower() not in (b"content-length", b"content-type")
        ]
        headers = json_headers(body, status, keep)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
