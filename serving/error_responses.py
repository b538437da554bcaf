"""The one place a :class:`~adapters_store.errors.LoraplexError` becomes an HTTP response.

Handlers raise; this module renders. The body is ``{"error": code, "message": ...}``, or OpenAI's
``{"error": {...}}`` on the OpenAI-style routes (picked by path); the status is the error's own, its
extra headers (``Retry-After`` on a quota 429) are kept, and every 503 tells clients when to come back.
"""

from __future__ import annotations

import json

from starlette.responses import Response

from adapters_store.errors import LoraplexError
from serving.openai_errors import is_openai_path, openai_error_bytes

# Every 503 (starting, draining, adapter store unreachable) tells clients when to come back.
RETRY_AFTER_S = 5
Headers = list[tuple[bytes, bytes]]


class StatusError(LoraplexError):
    """An error whose status and code are known only at run time: a failed item of an answered batch,
    or an error body some inner layer (BentoML, Starlette) wrote in its own shape."""

    def __init__(self, message: str, status: int, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self._headers = status, code, dict(headers or {})

    def headers(self) -> dict[str, str]:
        return dict(self._headers)


def error_body(err: LoraplexError, path: str = "") -> bytes:
    if is_openai_path(path):
        return openai_error_bytes(err.status, err.code, err.message)
    return json.dumps(err.to_dict()).encode()


def retry_after(status: int) -> Headers:
    return [(b"retry-after", str(RETRY_AFTER_S).encode())] if status == 503 else []


def json_headers(body: bytes, status: int, extra: Headers = ()) -> Headers:
    """Content type and length, ``extra``, and a ``Retry-After`` on a 503 unless ``extra`` has one."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list(extra)
    if not any(k.lower() == b"retry-after" for k, _ in headers):
        headers += retry_after(status)
    return headers


def render(err: LoraplexError, path: str = "") -> tuple[int, Headers, bytes]:
    """``err`` -> (status, headers, body), the format chosen by the route family of ``path``."""
    body = error_body(err, path)
    extra = [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    return err.status, json_headers(body, err.status, extra), body


def error_response(err: LoraplexError, path: str = "") -> Response:
    """For Starlette exception handlers and IO descriptors that must return a ``Response``."""
    status, headers, body = render(err, path)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


async def send_error(send, err: LoraplexError, path: str = "") -> int:
    """Answer an ASGI request with ``err``; returns the status sent."""
    status, headers, body = render(err, path)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
