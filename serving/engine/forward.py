"""One planned forward pass: set the wrappers' context from a plan, run the backbone, pool, apply heads.

Callers hold the engine's forward lock: the wrappers' context is shared state of the one backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from adapters_store.errors import ValidationError
from adapters_store.preparation import RowPreparation
from serving.engine import lora_layers
from serving.engine.backbone import Backbone, encode_audio, encode_images, encode_texts, pool, run_model
from serving.engine.items import InferenceItem, InferenceResult
from serving.engine.loader import LoadedAdapter
from serving.engine.lora_layers import LoraSegmentSpec, gather_rows, runs_of
from serving.engine.ort_runtime import OrtRuntime
from serving.engine.plan import MixedBatchPlan, Segment, assign_slots, group_rows, plan_batch, share_rows
from serving.engine.settings import EngineSettings


@dataclass(frozen=True)
class PreparedRow:
    """A validated row: its item, the manifest that answers it (None = bare base) and the loaded adapter."""

    item: InferenceItem
    adapter: LoadedAdapter | None
    version: int | None
    digest: str | None


def plan_rows(rows: Sequence[PreparedRow], num_layers: int) -> tuple[MixedBatchPlan, list[LoadedAdapter]]:
    """Slot per distinct adapter; LoRA adapters of the same modules and ranks side by side (see
    lora_layers.runs_of); partial adapters last, those starting higher up first."""
    slots, keys = assign_slots([r.adapter.digest if r.adapter else None for r in rows])
    by_key = {r.adapter.digest: r.adapter for r in rows if r.adapter}
    adapters = [by_key[k] for k in keys]
    rank = {s: num_layers + 1 - a.first_layer for s, a in enumerate(adapters) if a.kind == "partial"}
    groups = {s: a.lora_shape for s, a in enumerate(adapters) if a.lora}
    return plan_batch(slots, rank, groups), adapters


def set_context(backbone: Backbone, plan: MixedBatchPlan, adapters: Sequence[LoadedAdapter]) -> list:
    """Point every touched wrapper at this batch's segments; untouched wrappers stay on the base path.
    Returns the touched wrappers, for :func:`clear_context`."""
    batch = len(plan.order)
    ia3: dict[tuple[str, bool], torch.Tensor] = {}
    lora_segments: list[LoraSegmentSpec] = []
    for seg in plan.segments:
        if seg.slot < 0:
            continue
        a = adapters[seg.slot]
        if a.lora:
            lora_segments.append(LoraSegmentSpec(seg.start, seg.end, a.lora_shape, a.lora_blocks))
        for is_in, vectors in ((True, a.ia3_in), (False, a.ia3_out)):
            for path, vec in vectors.items():
                _ia3_rows(ia3, backbone, path, is_in, batch)[seg.start : seg.end] = vec
    gathered = _gathered(backbone, lora_segments, adapters, plan, batch)
    runs = runs_of(lora_segments, skip=gathered)
    touched: list = []
    try:
        for path in {*runs, *gathered} | {p for p, _ in ia3}:
            wrapper = backbone.linears[path]
            wrapper.set_context(
                lora=runs.get(path, ()),
                lora_rows=gathered.get(path),
                ia3_in=ia3.get((path, True)),
                ia3_out=ia3.get((path, False)),
            )
            touched.append(wrapper)
        _set_layer_context(backbone, plan, adapters, touched)
    except BaseException:  # no wrapper may keep a context the caller will not clear
        clear_context(touched)
        raise
    return touched


def _gathered(
    backbone: Backbone,
    lora_segments: Sequence[LoraSegmentSpec],
    adapters: Sequence[LoadedAdapter],
    plan: MixedBatchPlan,
    batch: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-row A/B for the modules that more than :data:`lora_layers.SEGMENT_LIMIT` segments target
    (one gathered bmm pair each); empty, and nothing computed, for batches of fewer LoRA segments."""
    if len(lora_segments) <= lora_layers.SEGMENT_LIMIT:
        return {}
    per_module: dict[str, list] = {}
    for seg in plan.segments:
        if seg.slot >= 0:
            for path, (a_t, b_t) in adapters[seg.slot].lora.items():
                per_module.setdefault(path, []).append((seg.start, seg.end, a_t, b_t))
    many = {p: segs for p, segs in per_module.items() if len(segs) > lora_layers.SEGMENT_LIMIT}
    shapes = {p: (backbone.linears[p].in_features, backbone.linears[p].out_features) for p in many}
    return gather_rows(many, shapes, batch) if many else {}


def _ia3_rows(ia3: dict, backbone: Backbone, path: str, is_in: bool, batch: int) -> torch.Tensor:
    key = (path, is_in)
    if key not in ia3:
        lin = backbone.linears[path]
        ia3[key] = torch.ones(batch, 1, lin.in_features if is_in else lin.out_features)
    return ia3[key][:, 0]


def _set_layer_context(
    backbone: Backbone, plan: MixedBatchPlan, adapters: Sequence[LoadedAdapter], touched: list
) -> None:
    partial = [
        (seg, adapters[seg.slot]) for seg in plan.segments if seg.slot >= 0 and adapters[seg.slot].blocks
    ]
    if not partial:
        return
    for layer in backbone.layers:
        own = [(s.start, s.end, a.blocks[layer.index]) for s, a in partial if layer.index in a.blocks]
        if own:
            base_rows = min(start for start, _, _ in own)
            # The plan puts active partial rows last; anything else would leave rows unanswered.
            if sum(end - start for start, end, _ in own) != len(plan.order) - base_rows:
                raise RuntimeError("partial segments are not a suffix of the batch; plan_rows is broken")
            layer.set_context(base_rows, own)
            touched.append(layer)


def clear_context(touched: Sequence) -> None:
    """Back to the base path: only the wrappers a batch touched (clearing all ~40 per batch cost ~0.3 ms)."""
    for wrapper in touched:
        wrapper.clear_context()


def encode_rows(backbone: Backbone, rows: Sequence[PreparedRow], settings: EngineSettings) -> dict:
    with backbone.preprocess_lock:
        if backbone.modality == "text":
            lengths = [text_length(r, settings) for r in rows]
            return dict(encode_texts(backbone, [r.item.text for r in rows], lengths))
        if backbone.modality == "audio":
            return encode_audio(backbone, [r.item.audio for r in rows])
        return encode_images(backbone, [r.item.image for r in rows])


def text_length(row: PreparedRow, settings: EngineSettings) -> int:
    """Tokens this row keeps: as its bundle was trained (bare-base rows: the server's limit)."""
    prep = RowPreparation() if row.adapter is None else row.adapter.preparation
    return prep.text_length(settings.max_seq_len)


def run_shared(
    backbone: Backbone, rows: Sequence[PreparedRow], settings: EngineSettings, ort: OrtRuntime | None = None
) -> list[InferenceResult]:
    """Answer ``rows`` (none of kind 'full') with ONE pass of the shared backbone; results in row order.
    With ``ort`` (runtime 'onnx') that pass runs on onnxruntime when the batch's adapters allow it.

    Fan-out: rows with the same input whose adapters leave the backbone untouched (heads on frozen
    features, the bare base) share one pass row; only their pooling and heads run per row."""
    leaders, pass_of = share_rows([shared_input_key(backbone, r) for r in rows])
    if len(leaders) == len(rows):
        plan, adapters, ordered, hidden, pooled, mask = _forward(backbone, rows, settings, ort)
        with single_threaded():
            return _answer_planned(plan, adapters, ordered, hidden, pooled, mask, settings)
    return _run_sharing(backbone, rows, leaders, pass_of, settings, ort)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the tiny per-segment tensor ops (pooling, heads, softmax) on one intra-op thread. Each op on
    a [rows, ...] tensor otherwise opens a parallel region; right after a backbone pass, waiting for
    the second thread made a 2-row head + softmax cost ~8-23 ms of wall time instead of ~0.2 ms on a
    busy 2-core box (measured, issue 18). torch keeps the count per calling thread (OpenMP's and MKL's
    thread-local settings), so a full fine-tune's pass in another thread does not change it here."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _answer_planned(plan, adapters, ordered, hidden, pooled, mask, settings) -> list[InferenceResult]:
    out: list[InferenceResult | None] = [None] * len(ordered)
    # Pool and count tokens once per batch, not per segment: a 64-tenant batch has ~30 segments.
    counts = [None] * len(ordered) if mask is None else mask.sum(dim=1).tolist()
    features: dict[str, torch.Tensor] = {}  # pooling -> [rows, H] in planned order
    for seg in plan.segments:
        adapter = adapters[seg.slot] if seg.slot >= 0 else None
        if adapter is not None and adapter.pooler is not None and adapter.pooling == "pooler":
            answers = finish_segment(seg, ordered, adapter, hidden, mask, pooled, settings)
        else:
            span = slice(seg.start, seg.end)
            feats = _pooled_once(features, adapter, hidden, mask, pooled, settings)[span]
            answers = answer_rows(ordered[span], adapter, feats, counts[span], settings)
        for pos, answer in zip(range(seg.start, seg.end), answers, strict=True):
            out[plan.order[pos]] = answer
    return out  # type: ignore[return-value]


def _forward(
    backbone: Backbone, rows: Sequence[PreparedRow], settings: EngineSettings, ort: OrtRuntime | None
):
    """Plan and run one pass; hidden/pooled/mask are in planned order (``plan.order``)."""
    plan, adapters = plan_rows(rows, backbone.num_layers)
    ordered = [rows[i] for i in plan.order]
    inputs = encode_rows(backbone, ordered, settings)
    passed = ort.try_pass(plan, adapters, inputs) if ort is not None else None
    if passed is not None:
        hidden, pooled = passed
    else:
        touched = set_context(backbone, plan, adapters)
        try:
            hidden, pooled = run_model(backbone.model, inputs)
        finally:
            clear_context(touched)
    return plan, adapters, ordered, hidden, pooled, inputs.get("attention_mask")


def _run_sharing(
    backbone: Backbone,
    rows: Sequence[PreparedRow],
    leaders: list[int],
    pass_of: list[int],
    settings: EngineSettings,
    ort: OrtRuntime | None,
) -> list[InferenceResult]:
    # A shared pass row runs on the plain base (its adapters are heads only), so plan it as a base row.
    keys = [shared_input_key(backbone, rows[i]) for i in leaders]
    pass_rows = [
        rows[i] if k is None else replace(rows[i], adapter=None) for i, k in zip(leaders, keys, strict=True)
    ]
    plan, _, _, hidden, pooled, mask = _forward(backbone, pass_rows, settings, ort)
    with single_threaded():
        return _answer_shared(rows, plan, hidden, pooled, mask, pass_of, settings)


def _answer_shared(rows, plan, hidden, pooled, mask, pass_of, settings) -> list[InferenceResult]:
    position = [0] * len(plan.order)  # pass row -> planned position
    for pos, p in enumerate(plan.order):
        position[p] = pos
    out: list[InferenceResult | None] = [None] * len(rows)
    counts = None if mask is None else mask.sum(dim=1).tolist()
    features: dict[str, torch.Tensor] = {}  # pooling -> [pass rows, H], pooled once for every head
    groups = group_rows([r.adapter.digest if r.adapter else "" for r in rows])
    for idx in groups.values():
        adapter, where = rows[idx[0]].adapter, [position[pass_of[i]] for i in idx]
        at = torch.tensor(where)
        if leaves_backbone_untouched(adapter) and (adapter is None or adapter.pooler is None):
            tokens = [None] * len(idx) if counts is None else [counts[w] for w in where]
            feats = _pooled_once(features, adapter, hidden, mask, pooled, settings).index_select(0, at)
            answers = answer_rows([rows[i] for i in idx], adapter, feats, tokens, settings)
        else:
            h = hidden.index_select(0, at)
            m = None if mask is None else mask.index_select(0, at)
            p = None if pooled is None else pooled.index_select(0, at)
            seg = Segment(0, 0, len(idx))
            answers = finish_segment(seg, [rows[i] for i in idx], adapter, h, m, p, settings)
        for i, answer in zip(idx, answers, strict=True):
            out[i] = answer
    return out  # type: ignore[return-value]


def _pooled_once(features: dict[str, torch.Tensor], adapter, hidden, mask, pooled, settings) -> torch.Tensor:
    """The whole pass pooled the way ``adapter`` pools (the base's way for bare rows), computed once per
    pooling kind and kept in ``features`` for the batch's other segments."""
    how = settings.base_pooling if adapter is None else adapter.pooling
    if how not in features:
        features[how] = pool(hidden, mask, pooled, how)
    return features[how]


def leaves_backbone_untouched(adapter: LoadedAdapter | None) -> bool:
    """Heads on frozen features and the bare base: the backbone pass is the same as the base's."""
    if adapter is None:
        return True
    return not (adapter.lora or adapter.ia3_in or adapter.ia3_out or adapter.blocks or adapter.full_model)


def shared_input_key(backbone: Backbone, row: PreparedRow) -> tuple | None:
    """Rows with equal keys can share a backbone pass row; ``None``: this row needs its own."""
    if not leaves_backbone_untouched(row.adapter):
        return None
    item = row.item
    if backbone.modality == "text":
        return ("text", item.text)
    media = item.image if backbone.modality == "image" else item.audio
    return ("object", id(media))  # one fanned-out item hands the engine one array object


def run_full(
    adapter: LoadedAdapter, rows: Sequence[PreparedRow], backbone: Backbone, settings: EngineSettings
) -> list[InferenceResult]:
    """Answer one full fine-tune's rows on its dedicated model copy (the engine runs the whole pass
    under :func:`single_threaded`)."""
    inputs = encode_rows(backbone, rows, settings)
    hidden, pooled = run_model(adapter.full_model, inputs)
    seg = Segment(0, 0, len(rows))
    return finish_segment(seg, rows, adapter, hidden, inputs.get("attention_mask"), pooled, settings)


def finish_segment(
    seg: Segment,
    ordered: Sequence[PreparedRow],
    adapter: LoadedAdapter | None,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    pooled: torch.Tensor | None,
    settings: EngineSettings,
) -> list[InferenceResult]:
    """Pool rows [start, end) and apply the adapter's head; one result per row."""
    h = hidden[seg.start : seg.end]
    m = None if mask is None else mask[seg.start : seg.end]
    tokens = [None] * seg.rows if m is None else m.sum(dim=1).tolist()
    p = None if pooled is None else pooled[seg.start : seg.end]
    if adapter is not None and adapter.pooler is not None and adapter.pooling == "pooler":
        p = adapter.pooler(h[:, 0])
    feats = pool(h, m, p, settings.base_pooling if adapter is None else adapter.pooling)
    return answer_rows(ordered[seg.start : seg.end], adapter, feats, tokens, settings)


def answer_rows(
    rows: Sequence[PreparedRow],
    adapter: LoadedAdapter | None,
    feats: torch.Tensor,
    tokens: Sequence[int | None],
    settings: EngineSettings,
) -> list[InferenceResult]:
    """Pooled features [rows, H] of one adapter's rows -> head, normalisation, one result per row.
    Softmax, sorting and ``tolist`` run once for all the rows (per-row tensor ops were most of the
    engine's own Python time on a many-tenant batch)."""
    if adapter is None:
        feats = F.normalize(feats, dim=-1) if settings.base_normalize else feats
        return [
            InferenceResult(adapter=None, version=r.version, digest=r.digest, embedding=e, tokens=t)
            for r, e, t in zip(rows, feats.tolist(), tokens, strict=True)
        ]
    manifest = adapter.manifest
    name = f"{manifest.tenant}/{manifest.name}"
    head_out = adapter.head(feats) if adapter.head is not None else None
    classify = [row.item.task == "classify" for row in rows]
    if any(classify):
        ranked = _ranked(head_out, manifest.labels)
    if not all(classify):
        embeds = head_out if manifest.task == "feature-extraction" and head_out is not None else feats
        embeds = F.normalize(embeds, dim=-1) if manifest.normalize else embeds
        vectors = embeds.tolist()
    answers = []
    for i, row in enumerate(rows):
        common = dict(adapter=name, version=row.version, digest=row.digest, tokens=tokens[i])
        if classify[i]:
            labels, scores, logits = ranked[i]
            answers.append(InferenceResult(labels=labels, scores=scores, logits=logits, **common))
        else:
            answers.append(InferenceResult(embedding=vectors[i], **common))
    return answers


def _ranked(
    logits: torch.Tensor | None, labels: Sequence[str]
) -> list[tuple[list[str], list[float], list[float]]]:
    """Head outputs [rows, labels] -> per row (labels by probability, their probabilities, raw logits)."""
    if logits is None:
        raise ValidationError("this adapter has no classification head; use task 'embed'")
    if logits.shape[-1] != len(labels):
        raise ValidationError(f"head gives {logits.shape[-1]} outputs for {len(labels)} labels")
    probs = torch.softmax(logits, dim=-1).tolist()
    # Stable, so ties keep the manifest's label order (as a per-row argsort did).
    orders = np.argsort(-np.asarray(probs), axis=-1, kind="stable").tolist()
    return [
        ([labels[j] for j in order], [p[j] for j in order], row)
        for order, p, row in zip(orders, probs, logits.tolist(), strict=True)
    ]
