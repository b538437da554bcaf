"""BentoML IO specs for the inference routes, and the one JSON encoder of successful answers.

The gateway parses and checks an inference body once and leaves the parsed object in the ASGI scope;
the input specs hand that object to the route (stamping the caller's tenant, resolved from the token,
on every item) instead of reading and parsing the body again. The output spec renders a failed item
through the one error renderer, and encodes answers from plain lists in one ``json.dumps`` call.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from _bentoml_sdk.io_models import IODescriptor, IORootModel
from bentoml.exceptions import BentoMLException
from pydantic import ConfigDict
from starlette.responses import Response

from serving.auth import Principal
from serving.error_responses import error_response
from serving.gateway import PRINCIPAL_KEY, parsed_body
from serving.inference import item_error
from serving.schemas import ClassifyItem, EmbedItem, ItemResult

# Compact separators: the numbers dominate the body; spaces after ',' would add ~1 byte per float.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_response(data: Any, status: int = 200) -> Response:
    """Plain dicts and lists -> a JSON response, encoded once."""
    return Response(_dumps(data).encode(), status_code=status, media_type="application/json")


class _TenantStamped(IODescriptor):
    # Unknown top-level fields (e.g. a 'tenant' someone hopes we read) are refused, as the docs say.
    model_config = ConfigDict(extra="forbid")

    @classmethod
    async def from_http_request(cls, request, serde) -> IODescriptor:
        principal = request.scope.get("state", {}).get(PRINCIPAL_KEY)
        if not isinstance(principal, Principal) or principal.tenant is None:
            # Only reachable if the gateway middleware is missing: refuse rather than guess a tenant.
            raise BentoMLException("inference needs a tenant token", error_code=HTTPStatus.UNAUTHORIZED)
        parsed = parsed_body(request.scope)
        if not isinstance(parsed, cls):  # likewise: the gateway parses every inference body
            raise BentoMLException(
                "request did not pass the gateway", error_code=HTTPStatus.SERVICE_UNAVAILABLE
            )
        for item in parsed.items:
            item._tenant = principal.tenant
        return parsed


class ClassifyInput(_TenantStamped):
    """``{"items": [{"adapter": "intent@production", "text": "..."}, ...]}``"""

    items: list[ClassifyItem]


class EmbedInput(_TenantStamped):
    """``{"items": [{"adapter": null, "text": "..."}, ...]}``"""

    items: list[EmbedItem]


class ResultsOutput(IORootModel[list[ItemResult]]):
    """A JSON list, one result per item in request order."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde) -> Response:
        results: list[ItemResult] = list(obj.root if isinstance(obj, IORootModel) else obj)
        for i, result in enumerate(results):
            if result.error is not None:
                return error_response(item_error(result, f"items[{i}]"))
        return json_response([plain(r) for r in results])


def plain(result: ItemResult) -> dict[str, Any]:
    """A successful result as a plain dict without nulls (no pydantic serialisation per item)."""
    out = {k: v for k, v in result.__dict__.items() if v is not None}
    if result.results is not None:
        out["results"] = [plain(r) for r in result.results]
    return out
