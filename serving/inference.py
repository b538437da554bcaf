"""One adaptive batch of HTTP items -> one engine call -> one result per item (errors per item).

Kept apart from BentoML so it can be tested with any object that has the engine's ``infer``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from adapters_store.errors import LoraplexError, ServiceUnavailable
from serving import metrics
from serving.limits import TokenCounter, decode_audio, decode_image
from serving.schemas import ErrorBody, ItemResult
from serving.settings import LimitSettings

logger = logging.getLogger("loraplex.inference")


class EngineLike(Protocol):
    def infer(self, items: Sequence[Any]) -> list[Any]: ...


def error_result(err: LoraplexError) -> ItemResult:
    result = ItemResult(error=ErrorBody(error=err.code, message=err.message))
    result._status = err.status
    return result


def to_result(task: str, answer: Any) -> ItemResult:
    if isinstance(answer, LoraplexError):
        return error_result(answer)
    if task == "classify":
        return ItemResult(
            adapter=answer.adapter,
            version=answer.version,
            digest=answer.digest,
            labels=answer.labels,
            scores=answer.scores,
        )
    return ItemResult(
        adapter=answer.adapter, version=answer.version, digest=answer.digest, embedding=answer.embedding
    )


def prepare(task: str, item: Any, limits: LimitSettings, tokens: TokenCounter | None, rate: int = 16000):
    """HTTP item -> engine ``InferenceItem`` (decoding images and audio, applying the token policy)."""
    from serving.engine import InferenceItem

    image = decode_image(item.image_b64, limits) if item.image_b64 is not None else None
    audio = decode_audio(item.audio_b64, limits, rate) if item.audio_b64 is not None else None
    if item.text is not None and tokens is not None and limits.token_policy == "reject":
        tokens.check(item.text, limits.max_tokens)
    return InferenceItem(
        tenant=item.tenant, adapter=item.adapter, task=task, text=item.text, image=image, audio=audio
    )


def run_batch(
    engine: EngineLike | None,
    task: str,
    items: Sequence[Any],
    limits: LimitSettings,
    tokens: TokenCounter | None = None,
) -> list[ItemResult]:
    """Answer every item; a bad item fails alone, the rest of the batch is still served."""
    if engine is None:
        err = ServiceUnavailable("the backbone is still loading; retry when /readyz is 200")
        return [error_result(err) for _ in items]
    results: list[ItemResult | None] = [None] * len(items)
    ready: list[tuple[int, Any]] = []
    rate = getattr(getattr(engine, "backbone", None), "sampling_rate", 16000)  # audio bases only use it
    for i, item in enumerate(items):
        try:
            ready.append((i, prepare(task, item, limits, tokens, rate)))
        except LoraplexError as err:
            results[i] = error_result(err)
    if ready:
        metrics.observe_batch(task, len(ready), len({it.tenant for _, it in ready}))
        answers = _infer(engine, [it for _, it in ready])
        for (i, _), answer in zip(ready, answers, strict=True):
            results[i] = to_result(task, answer)
    for item, result in zip(items, results, strict=True):
        metrics.observe_item(item.tenant or "-", task, result.error.error if result.error else "ok")
    return results  # type: ignore[return-value]


def _infer(engine: EngineLike, batch: list[Any]) -> list[Any]:
    try:
        return engine.infer(batch)
    except LoraplexError as err:  # the engine failed the whole call: every row gets that error
        return [err] * len(batch)
