"""The inference routes' bodies and answers: the gateway's handler, BentoML IO specs, one JSON encoder.

Over HTTP, ``/v1/classify`` and ``/v1/embed`` are answered by the gateway (:func:`inference_handler`)
once it has parsed and checked the body: nothing behind it runs. The IO specs serve the
``@bentoml.api`` methods that stay for the OpenAPI document and in-process calls: the input specs take
the parsed object from the ASGI scope (stamping the caller's tenant, resolved from the token, on every
item) instead of reading and parsing the body again. Both render a failed item through the one error
renderer and encode answers from plain lists in one ``json.dumps`` call.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Literal

from _bentoml_sdk.io_models import IODescriptor, IORootModel
from bentoml.exceptions import BentoMLException
from pydantic import ConfigDict, Field
from starlette.responses import Response

from serving.auth import Principal
from serving.error_responses import StatusError, error_response, json_headers, send_error
from serving.gateway import PRINCIPAL_KEY, parsed_body
from serving.inference import item_error
from serving.schemas import ClassifyItem, EmbedItem, Extra, ItemResult
from serving.settings import NATIVE_INFERENCE_ROUTES

# One encoder for every answer; json.dumps' layout, which clients and tests already read.
_dumps = json.JSONEncoder(ensure_ascii=False).encode


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


INCLUDE_HELP = (
    "Extras to add to every answer: 'digest' (the adapter bundle's content digest), 'logits' (classify: "
    "raw head outputs in the adapter's label order). Answers carry adapter, version, labels and scores "
    "(or the embedding) without them."
)


class ClassifyInput(_TenantStamped):
    """``{"items": [{"adapter": "intent@production", "text": "..."}, ...], "include": ["digest"]}``"""

    items: list[ClassifyItem]
    include: list[Extra] = Field(default_factory=list, max_length=2, description=INCLUDE_HELP)


class EmbedInput(_TenantStamped):
    """``{"items": [{"adapter": null, "text": "..."}, ...]}``"""

    items: list[EmbedItem]
    include: list[Literal["digest"]] = Field(default_factory=list, max_length=1, description=INCLUDE_HELP)


class ResultsOutput(IORootModel[list[ItemResult]]):
    """A JSON list, one result per item in request order."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde) -> Response:
        results: list[ItemResult] = list(obj.root if isinstance(obj, IORootModel) else obj)
        failed = first_failed(results)
        if failed is not None:
            return error_response(failed)
        return json_response([plain(r) for r in results])


def first_failed(results: list[ItemResult]) -> StatusError | None:
    """The error of the first failed item (``items[2]: ...``), which fails the whole request."""
    for i, result in enumerate(results):
        if result.error is not None:
            return item_error(result, f"items[{i}]")
    return None


Answer = Callable[[str, list], Awaitable[list[ItemResult]]]


def inference_handler(answer: Answer):
    """The gateway's handler of ``/v1/classify`` and ``/v1/embed``: ``answer(task, items)`` (the
    service's fair batcher) and the answer sent straight to the socket, with the same status codes,
    bodies and headers as the ``@bentoml.api`` routes, but without Starlette's router, BentoML's API
    wrapper and IO descriptors."""

    async def handle(path: str, parsed: ClassifyInput | EmbedInput, tenant: str, send) -> int:
        for item in parsed.items:
            item._tenant = tenant
        results = without_extras(await answer(NATIVE_INFERENCE_ROUTES[path], parsed.items), parsed.include)
        failed = first_failed(results)
        if failed is not None:
            return await send_error(send, failed, path)
        body = _dumps([plain(r) for r in results]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": json_headers(body, 200)})
        await send({"type": "http.response.body", "body": body})
        return 200

    return handle


def plain(result: ItemResult) -> dict[str, Any]:
    """A successful result as a plain dict without nulls (no pydantic serialisation per item)."""
    out = {k: v for k, v in result.__dict__.items() if v is not None}
    if result.results is not None:
        out["results"] = [plain(r) for r in result.results]
    return out


def without_extras(results: list[ItemResult], include: list[str]) -> list[ItemResult]:
    """Drop the extras the request did not ask for (in place; fan-out results too)."""
    drop_digest, drop_logits = "digest" not in include, "logits" not in include
    for r in results:
        if drop_digest:
            r.digest = None
        if drop_logits:
            r.logits = None
        if r.results is not None:
            without_extras(r.results, include)
    return results
