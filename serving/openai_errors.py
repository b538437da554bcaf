"""OpenAI's error shape, used on the OpenAI-compatible routes instead of ``{"error", "message"}``.

``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}`` with the same HTTP status and
loraplex's stable error code in ``code`` (clients such as the ``openai`` package read this shape).
"""

from __future__ import annotations

import json

OPENAI_PATHS = frozenset({"/v1/embeddings", "/v1/classifications", "/v1/models"})
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, code: str, message: str) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def is_openai_error(data: object) -> bool:
    return isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], dict)


def openai_error_bytes(status: int, code: str, message: str) -> bytes:
    return json.dumps(openai_error(status, code, message)).encode()
