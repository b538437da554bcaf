"""One adaptive batch of HTTP items -> one engine call -> one result per item (errors per item).

Kept apart from BentoML so it can be tested with any object that has the engine's ``infer``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from adapters_store.errors import LoraplexError, ServiceUnavailable
from serving import metrics
from serving.error_responses import StatusError
from serving.limits import TokenCounter, decode_audio, decode_image
from serving.quotas import UsageLedger
from serving.schemas import ErrorBody, ItemResult
from serving.settings import LimitSettings

logger = logging.getLogger("loraplex.inference")


class EngineLike(Protocol):
    def infer(self, items: Sequence[Any]) -> list[Any]: ...


def item_error(result: ItemResult, where: str) -> StatusError:
    """``result`` (failed) -> an error naming where it failed (``items[2]: ...``), for a route to raise
    or render with the item's own status, code and headers."""
    assert result.error is not None
    message = f"{where}: {result.error.message}"
    return StatusError(message, result._status, result.error.error, result._headers)


def error_result(err: LoraplexError) -> ItemResult:
    result = ItemResult(error=ErrorBody(error=err.code, message=err.message))
    result._status = err.status
    result._headers = err.headers()
    return result


def to_result(task: str, answer: Any) -> ItemResult:
    if isinstance(answer, LoraplexError):
        return error_result(answer)
    if task == "classify":
        result = ItemResult(
            adapter=answer.adapter,
            version=answer.version,
            digest=answer.digest,
            labels=answer.labels,
            scores=answer.scores,
            logits=getattr(answer, "logits", None),
        )
    else:
        result = ItemResult(
            adapter=answer.adapter, version=answer.version, digest=answer.digest, embedding=answer.embedding
        )
    result._tokens = answer.tokens or 0
    return result


def fanned_result(results: list[ItemResult]) -> ItemResult:
    """A fan-out item's answer: one result per adapter; the first failed one fails the item."""
    for j, r in enumerate(results):
        if r.error is not None:
            err = ErrorBody(error=r.error.error, message=f"adapters[{j}]: {r.error.message}")
            failed = ItemResult(error=err)
            failed._status, failed._headers = r._status, r._headers
            return failed
    out = ItemResult(results=results)
    out._tokens = sum(r._tokens for r in results)
    return out


def prepare(task: str, item: Any, limits: LimitSettings, tokens: TokenCounter | None, rate: int = 16000):
    """HTTP item -> engine ``InferenceItem`` rows, one per adapter it names (decoding images and audio
    once, applying the token policy)."""
    from serving.engine import InferenceItem

    image = decode_image(item.image_b64, limits) if item.image_b64 is not None else None
    audio = decode_audio(item.audio_b64, limits, rate) if item.audio_b64 is not None else None
    if item.text is not None and tokens is not None and limits.token_policy == "reject":
        tokens.check(item.text, limits.max_tokens)
    return [
        InferenceItem(tenant=item.tenant, adapter=a, task=task, text=item.text, image=image, audio=audio)
        for a in targets_of(item)
    ]


def targets_of(item: Any) -> list[str | None]:
    targets = getattr(item, "targets", None)
    return list(targets) if targets is not None else [item.adapter]


def runs_alone(engine: Any, job: tuple[str, Sequence[Any]]) -> bool:
    """True when a request names a full fine-tune the engine knows (alias cache only): its rows run a
    backbone pass of their own, so the fair batcher answers the shared rows of the batch first."""
    if engine is None:
        return False
    _, items = job
    return any(a is not None and engine.is_full(item.tenant, a) for item in items for a in targets_of(item))


def row_count(items: Sequence[Any]) -> int:
    """Engine rows of a request: every item times the adapters it fans out to."""
    return sum(len(targets_of(item)) for item in items)


def run_batch(
    engine: EngineLike | None,
    task: str,
    items: Sequence[Any],
    limits: LimitSettings,
    tokens: TokenCounter | None = None,
    usage: UsageLedger | None = None,
) -> list[ItemResult]:
    """Answer every item; a bad item fails alone, the rest of the batch is still served."""
    return run_jobs(engine, [(task, items)], limits, tokens, usage)[0]


def run_jobs(
    engine: EngineLike | None,
    jobs: Sequence[tuple[str, Sequence[Any]]],
    limits: LimitSettings,
    tokens: TokenCounter | None = None,
    usage: UsageLedger | None = None,
) -> list[list[ItemResult]]:
    """Several requests' ``(task, items)`` in ONE engine call (fan-out rows included); results per job."""
    if engine is None:
        err = ServiceUnavailable("the backbone is still loading; retry when /readyz is 200")
        return [[error_result(err) for _ in items] for _, items in jobs]
    rate = getattr(getattr(engine, "backbone", None), "sampling_rate", 16000)  # audio bases only use it
    rows: list[Any] = []
    spans: list[list[tuple[int, int] | ItemResult]] = []  # per job, per item: rows [start, end) or error
    for task, items in jobs:
        job_spans: list[tuple[int, int] | ItemResult] = []
        for item in items:
            try:
                prepared = prepare(task, item, limits, tokens, rate)
            except LoraplexError as err:
                job_spans.append(error_result(err))
                continue
            job_spans.append((len(rows), len(rows) + len(prepared)))
            rows.extend(prepared)
        spans.append(job_spans)
    answers: list[Any] = []
    if rows:
        for task in sorted({r.task for r in rows}):  # one engine call may hold both tasks
            mine = [r for r in rows if r.task == task]
            metrics.observe_batch(task, len(mine), len({r.tenant for r in mine}))
        answers = _infer(engine, rows)
    out = []
    for (task, items), job_spans in zip(jobs, spans, strict=True):
        results = [
            _item_result(task, item, span, answers) for item, span in zip(items, job_spans, strict=True)
        ]
        for item, result in zip(items, results, strict=True):
            metrics.observe_item(item.tenant or "-", task, result.error.error if result.error else "ok")
            if usage is not None and result.error is None and item.tenant:
                usage.answered(item.tenant, len(targets_of(item)), result._tokens)
        out.append(results)
    return out


def _item_result(task: str, item: Any, span: tuple[int, int] | ItemResult, answers: list[Any]) -> ItemResult:
    if isinstance(span, ItemResult):
        return span
    results = [to_result(task, a) for a in answers[span[0] : span[1]]]
    return results[0] if getattr(item, "adapters", None) is None else fanned_result(results)


def _infer(engine: EngineLike, batch: list[Any]) -> list[Any]:
    try:
        return engine.infer(batch)
    except LoraplexError as err:  # the engine failed the whole call: every row gets that error
        return [err] * len(batch)
