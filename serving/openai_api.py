"""OpenAI-compatible routes: ``POST /v1/embeddings``, ``POST /v1/classifications``, ``GET /v1/models``.

``model`` names one of the calling tenant's adapters as on ``/v1/embed`` (``intent``, ``intent@3``,
``intent@production``) or the bare base by its registered name. A list of models (a loraplex
extension) fans every input out to each of them in one engine call. The rows go through the same fair
queue and quotas as ``/v1/embed``; errors use OpenAI's shape (:mod:`serving.openai_errors`).
"""

from __future__ import annotations

import base64
import time
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters_store.errors import InvalidRequest, NotFound, ServiceUnavailable, ValidationError
from adapters_store.names import AdapterRef, validate_name
from serving.gateway import parsed_body
from serving.http_io import json_response
from serving.inference import item_error
from serving.management import ManagementContext, context_of, principal_of
from serving.schemas import ADAPTER_REF_MAX, ClassifyItem, EmbedItem, ItemResult
from serving.settings import LimitSettings

ModelName = Annotated[str, Field(min_length=1, max_length=ADAPTER_REF_MAX)]


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName | list[ModelName] = Field(
        description="An adapter of yours ('intent', 'intent@3', 'intent@production') or the base's name; "
        "a list fans every input out to each model (loraplex extension)."
    )
    input: str | list[str] = Field(description="One text or a list of texts.")
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            raise ValueError("'input' must be a string or a list of strings (token arrays are not accepted)")
        return v

    @field_validator("model")
    @classmethod
    def _models(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("'model' list must name at least one model")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(self.model)

    def row_count(self) -> int:
        return len(self.texts) * len(self.models)

    def adapter_refs(self, base_name: str | None) -> list[str | None]:
        """The adapters this request names, for cold preloading (the base's own name is no adapter)."""
        return [target(m, base_name) for m in self.models]

    def check(self, limits: LimitSettings) -> None:
        """The same bounds as ``/v1/embed`` items (422 naming the input)."""
        texts = self.texts
        if not texts:
            raise ValidationError("'input' must hold at least one text")
        if len(texts) > limits.max_inputs:
            raise ValidationError(f"{len(texts)} inputs in one request; the limit is {limits.max_inputs}")
        if len(self.models) > limits.max_fanout:
            raise ValidationError(
                f"{len(self.models)} models in one request; the limit is {limits.max_fanout}"
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValidationError(f"input[{i}] is empty")
            if len(text) > limits.max_chars:
                raise ValidationError(
                    f"input[{i}] has {len(text)} characters; the limit is {limits.max_chars}"
                )


class EmbeddingsRequest(_OpenAIRequest):
    """``{"model": "intent", "input": ["text", ...], "encoding_format": "float"}``"""

    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'base64': little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's size if given.")


class ClassificationsRequest(_OpenAIRequest):
    """``{"model": "intent", "input": ["text", ...]}``"""


def target(model: str, base_name: str | None) -> str | None:
    """A model name -> the engine's adapter reference (``None``: the bare base)."""
    return None if model == base_name else model


async def answer(
    ctx: ManagementContext, tenant: str, task: str, body: _OpenAIRequest
) -> list[list[ItemResult]]:
    """Per input, one result per model (all in one engine call); the first failed row raises.
    ``body`` was parsed and checked against the limits by the gateway."""
    batcher = ctx.need_batcher()
    base_name = ctx.base.name if ctx.base is not None else None
    targets = [target(m, base_name) for m in body.models]
    if task == "classify" and None in targets:
        raise ValidationError(f"model {base_name!r} is the bare base and has no classifier; name an adapter")
    item_cls = ClassifyItem if task == "classify" else EmbedItem
    items = [item_cls(text=t, adapters=targets) for t in body.texts]
    for item in items:
        item._tenant = tenant
    results: list[ItemResult] = await batcher.submit(tenant, body.row_count(), (task, items))
    for i, result in enumerate(results):
        if result.error is not None:
            raise item_error(result, f"input[{i}]")
    return [r.results or [] for r in results]


def usage(results: list[list[ItemResult]]) -> dict[str, int]:
    tokens = sum(r._tokens for per_input in results for r in per_input)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _entry(result: ItemResult, index: int, input_index: int, model: str) -> dict[str, Any]:
    return {
        "index": index,
        "input_index": input_index,
        "model": model,
        "adapter": result.adapter,
        "version": result.version,
        "digest": result.digest,
    }


def encode_embedding(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def openai_route(path: str, methods: list[str]):
    """Tenant token required; a LoraplexError raised here is rendered in OpenAI's error shape by the
    app's one error handler (:mod:`serving.error_responses` picks the shape by path)."""

    def deco(fn) -> Route:
        async def endpoint(request: Request) -> Response:
            tenant = principal_of(request).require_tenant()
            return json_response(await fn(request, context_of(request), tenant))

        endpoint.__doc__ = fn.__doc__
        return Route(path, endpoint, methods=methods, name=fn.__name__)

    return deco


def parse(request: Request, model: type[_OpenAIRequest]) -> _OpenAIRequest:
    """The body the gateway parsed, bounded and admitted: it is never read or parsed a second time."""
    parsed = parsed_body(request.scope)
    if not isinstance(parsed, model):
        raise ServiceUnavailable("request reached a route without passing the gateway")
    return parsed


@openai_route("/embeddings", ["POST"])
async def create_embeddings(request: Request, ctx: ManagementContext, tenant: str) -> dict[str, Any]:
    """OpenAI embeddings: ``{"model", "input", "encoding_format"}`` -> ``{"object": "list", "data", "usage"}``."""
    body = parse(request, EmbeddingsRequest)
    results = await answer(ctx, tenant, "embed", body)
    data = []
    for i, per_input in enumerate(results):
        for model, result in zip(body.models, per_input, strict=True):
            if body.dimensions is not None and body.dimensions != len(result.embedding or []):
                raise InvalidRequest(
                    f"dimensions={body.dimensions} but {model!r} gives {len(result.embedding or [])}; "
                    "omit 'dimensions'"
                )
            entry = _entry(result, len(data), i, model)
            data.append(
                {
                    "object": "embedding",
                    "embedding": encode_embedding(result.embedding or [], body.encoding_format),
                    **entry,
                }
            )
    return {"object": "list", "data": data, "model": _model_field(body), "usage": usage(results)}


@openai_route("/classifications", ["POST"])
async def create_classifications(request: Request, ctx: ManagementContext, tenant: str) -> dict[str, Any]:
    """Classify texts with adapters (OpenAI style): ``{"model", "input"}`` -> one entry per input and
    model with the top ``label`` and every label with its score, most probable first."""
    body = parse(request, ClassificationsRequest)
    results = await answer(ctx, tenant, "classify", body)
    data = []
    for i, per_input in enumerate(results):
        for model, result in zip(body.models, per_input, strict=True):
            entry = _entry(result, len(data), i, model)
            labels, scores = result.labels or [], result.scores or []
            data.append(
                {
                    "object": "classification",
                    "label": labels[0] if labels else None,
                    "score": scores[0] if scores else None,
                    "labels": labels,
                    "scores": scores,
                    **entry,
                }
            )
    return {"object": "list", "data": data, "model": _model_field(body), "usage": usage(results)}


def _model_field(body: _OpenAIRequest) -> str:
    return body.model if isinstance(body.model, str) else ",".join(body.model)


def model_entries(ctx: ManagementContext, tenant: str) -> list[dict[str, Any]]:
    """The tenant's adapters (by name; production, else latest) and the bare base."""
    store, out = ctx.need_store(), []
    for name in store.list_adapters(tenant):
        aliases = store.aliases(tenant, name)
        version = aliases.get("production", aliases.get("latest"))
        if version is None:
            continue  # deleted while listing
        try:
            manifest = store.resolve(AdapterRef(tenant, name, str(version)))
        except NotFound:
            continue
        if manifest.base.fingerprint != ctx.base.fingerprint:
            continue  # trained on another base: this replica cannot serve it
        out.append(
            {
                "id": name,
                "object": "model",
                "created": _epoch(manifest.created_at),
                "owned_by": tenant,
                "kind": manifest.kind,
                "task": manifest.task,
                "labels": manifest.labels,
                "aliases": aliases,
            }
        )
    out.append({"id": ctx.base.name, "object": "model", "created": 0, "owned_by": "loraplex", "kind": "base"})
    return out


def _epoch(stamp: str) -> int:
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return int(time.time())


@openai_route("/models", ["GET"])
async def list_models(request: Request, ctx: ManagementContext, tenant: str) -> dict[str, Any]:
    """Your adapters and the base, as OpenAI models (``id`` is what ``model`` takes)."""
    return {"object": "list", "data": await run_in_threadpool(model_entries, ctx, tenant)}


@openai_route("/models/{model}", ["GET"])
async def retrieve_model(request: Request, ctx: ManagementContext, tenant: str) -> dict[str, Any]:
    """One model by id (404 if it is not yours)."""
    model = request.path_params["model"]
    if ctx.base is None or model != ctx.base.name:
        validate_name(model.partition("@")[0], "model")
    for entry in await run_in_threadpool(model_entries, ctx, tenant):
        if entry["id"] == model:
            return entry
    raise NotFound(f"model {model!r} does not exist")


OPENAI_ROUTES = [create_embeddings, create_classifications, list_models, retrieve_model]


def _schema_ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": model.model_json_schema()}}}


def openapi_paths() -> dict[str, dict[str, Any]]:
    """OpenAPI entries for these routes, with the request schemas."""
    errors = {"4XX": {"description": 'OpenAI error shape: {"error": {"message", "type", "param", "code"}}'}}
    security = [{"bearer": []}]

    def op(fn: Route, method: str, body: type[BaseModel] | None = None) -> dict[str, Any]:
        doc = (fn.endpoint.__doc__ or fn.name).strip()
        entry = {
            "operationId": f"{fn.name}_{method}",
            "summary": doc.split("\n")[0],
            "description": doc,
            "security": security,
            "responses": {"200": {"description": "JSON"}, **errors},
        }
        if body is not None:
            entry["requestBody"] = {"required": True, **_schema_ref(body)}
        else:
            entry["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in fn.param_convertors
            ]
        return entry

    return {
        "/v1/embeddings": {"post": op(create_embeddings, "post", EmbeddingsRequest)},
        "/v1/classifications": {"post": op(create_classifications, "post", ClassificationsRequest)},
        "/v1/models": {"get": op(list_models, "get")},
        "/v1/models/{model}": {"get": op(retrieve_model, "get")},
    }


__all__ = ["OPENAI_ROUTES", "ClassificationsRequest", "EmbeddingsRequest"]
