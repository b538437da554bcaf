"""One error hierarchy for loraplex. Each subclass carries the HTTP status the service answers with.

The service maps these to ``{"error": code, "message": ...}`` bodies, so no handler builds an error
response by hand (see serving/). Training and the CLI raise the same classes.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class InvalidRequest(LoraplexError):
    status, code = 400, "invalid_request"


class InvalidName(InvalidRequest):
    status, code = 400, "invalid_name"


class InvalidSettings(InvalidRequest):
    """A setting the service or CLI cannot start with; the message names the variable, never a secret."""

    code = "invalid_settings"


class Unauthorized(LoraplexError):
    status, code = 401, "unauthorized"


class Forbidden(LoraplexError):
    status, code = 403, "forbidden"


class NotFound(LoraplexError):
    status, code = 404, "not_found"


class Conflict(LoraplexError):
    status, code = 409, "conflict"


class PayloadTooLarge(LoraplexError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(LoraplexError):
    status, code = 415, "unsupported_media_type"


class ValidationError(LoraplexError):
    """The input parsed but is not acceptable (wrong shapes, unknown modules, non-finite values...)."""

    status, code = 422, "validation_error"


class UnsafeFormat(ValidationError):
    """A file type loraplex never opens (pickle checkpoints, ONNX graphs from tenants...)."""

    code = "unsafe_format"


class IncompatibleBase(ValidationError):
    code = "incompatible_base"


class UnsupportedAdapter(ValidationError):
    code = "unsupported_adapter"


class TooManyRequests(LoraplexError):
    status, code = 429, "too_many_requests"


class IntegrityError(LoraplexError):
    """A stored file does not match its recorded digest or size: the store is damaged, not the request."""

    status, code = 500, "integrity_error"


class ServiceUnavailable(LoraplexError):
    status, code = 503, "unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached or refused our credentials (wrong endpoint, missing keys...)."""

    code = "store_unavailable"
