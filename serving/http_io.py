"""BentoML IO specs for the batchable inference routes.

The input specs stamp the caller's tenant (resolved from the token by the gateway) on every item
after BentoML parses the body; the output spec turns a failed item into the request's error status
with an ``{error, message}`` body, and leaves nulls out of successful answers.
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
from serving.gateway import PRINCIPAL_KEY
from serving.schemas import ClassifyItem, EmbedItem, ItemResult


class _TenantStamped(IODescriptor):
    # Unknown top-level fields (e.g. a 'tenant' someone hopes we read) are refused, as the docs say.
    model_config = ConfigDict(extra="forbid")

    @classmethod
    async def from_http_request(cls, request, serde) -> IODescriptor:
        principal = request.scope.get("state", {}).get(PRINCIPAL_KEY)
        if not isinstance(principal, Principal) or principal.tenant is None:
            # Only reachable if the gateway middleware is missing: refuse rather than guess a tenant.
            raise BentoMLException("inference needs a tenant token", error_code=HTTPStatus.UNAUTHORIZED)
        parsed = await super().from_http_request(request, serde)
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
                body = {"error": result.error.error, "message": f"items[{i}]: {result.error.message}"}
                return Response(
                    json.dumps(body),
                    status_code=result._status,
                    media_type="application/json",
                    headers=result._headers,
                )
        payload = [r.model_dump(exclude_none=True) for r in results]
        return Response(json.dumps(payload), media_type="application/json")
