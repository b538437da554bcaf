"""Export a registered base to ONNX, validate it against PyTorch, and store it as a base artifact.

>>> report = export_base(open_store("/srv/loraplex"), "minilm", quantize="int8")  # doctest: +SKIP
>>> report.manifest.validation.min_cosine  # doctest: +SKIP
0.9931...

The graph is built only from the registered base's own weights (the folder is re-fingerprinted and
must match the registry entry), never from anything a tenant supplied.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, Field

from adapters_store.base_models import BaseModelEntry, fingerprint_folder, resolve_source
from adapters_store.bundle import sha256_hex
from adapters_store.errors import IncompatibleBase
from adapters_store.onnx_artifacts import (
    GraphInputRecord,
    GraphOptimizationRecord,
    LoraGraphRecord,
    OnnxExportManifest,
    QuantAttempt,
    QuantizationRecord,
    SmoothingRecord,
    graph_file,
    manifest_file,
)
from training.onnx_export.errors import OnnxExportError, OnnxToleranceError
from training.onnx_export.fusion import cpu_ms_per_call, fuse_transformer
from training.onnx_export.probes import CALIBRATION_SENTENCES, quality_probes, shape_probes, text_probe_set
from training.onnx_export.quantize import ALL_MATMUL, Int8Plan, quantize_int8, sensitivity_plan
from training.onnx_export.smoothing import smoothable, smoothed_copy
from training.onnx_export.specs import POOLING_OUTPUTS, ArchitectureSpec, spec_for
from training.onnx_export.validate import Feed, Runner, ValidationFigures, check_fp32, measure
from training.onnx_export.wrappers import features_module, pooler_of

EXPORTERS = {"legacy": "torch.onnx legacy (dynamo=False)", "dynamo": "torch.onnx dynamo (torch.export)"}
Exporter = Literal["legacy", "dynamo"]
Fusion = Literal["auto", "fused", "plain"]
# auto keeps the fused graph only if it costs clearly less CPU: on the EPYC hosts the two measured
# within a few % of each other and a bare "<" flipped between runs (docs/onnx.md)
FUSED_MIN_GAIN = 0.95
log = logging.getLogger(__name__)


class ExportSettings(BaseModel):
    """Knobs of one export run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threads: int = Field(default=2, ge=1, le=64, description="torch and ORT threads used while validating")
    force: bool = Field(default=False, description="re-export even if a validated artifact already exists")
    preprocess_int8: bool = Field(
        default=False, description="run ORT's quant_pre_process first (measured: no cosine change on MiniLM)"
    )
    int8_keep_fp32: int | None = Field(
        default=None,
        ge=0,
        description="force how many of the most sensitive MatMuls stay fp32; default: the fewest that pass",
    )
    int8_smoothing: bool = Field(
        default=True,
        description="int8 of BERT-family text graphs: rescale activations first (SmoothQuant scales, "
        "outlier channels split off; training.onnx_export.smoothing), falling back to the graph as is",
    )
    fusion: Fusion = Field(
        default="auto",
        description="ORT transformer fusions (spec.fusion families): 'auto' times fused and plain "
        "at export and keeps the faster; 'fused' or 'plain' force one (both are validated vs torch)",
    )
    exporter: Exporter = Field(
        default="legacy", description="legacy tracing gave faster ORT graphs on MiniLM here (bench_onnx.py)"
    )


class ExportReport(BaseModel):
    """The outcome for the requested variant (an int8 export also stores the fp32 graph it came from)."""

    model_config = ConfigDict(frozen=True)

    manifest: OnnxExportManifest
    reused: bool = Field(
        description="True if a validated artifact was already stored and nothing was exported"
    )
    seconds: float = Field(ge=0, description="wall time of export + validation + store")
    also_stored: list[str] = Field(default_factory=list, description="other variants written by this run")


def export_base(
    store: Any,
    base_name: str,
    quantize: Literal[None, "int8"] = None,
    settings: ExportSettings | None = None,
) -> ExportReport:
    """Export ``base_name``'s backbone + pooling (fp32, or int8 with ``quantize="int8"``) into the store."""
    settings = settings or ExportSettings()
    if quantize not in (None, "int8"):
        raise OnnxExportError(f"quantize must be None or 'int8', got {quantize!r}")
    variant = "int8" if quantize == "int8" else "fp32"
    t0 = time.perf_counter()
    entry = store.get_base(base_name)
    existing = stored_manifest(store, entry, variant)
    if existing is not None and not settings.force:
        return ExportReport(manifest=existing, reused=True, seconds=time.perf_counter() - t0)
    torch.set_num_threads(settings.threads)
    spec = spec_for(entry.model_type)
    model = load_base_model(entry)
    if spec.fusion and settings.fusion != "plain":
        model.set_attn_implementation("eager")  # the only attention pattern ORT's fuser recognises
    module = features_module(model, spec.modality)
    outputs = spec.output_names(has_pooler=pooler_of(model) is not None)
    probes = shape_probes(spec, model.config)
    plain = export_graph(module, spec, probes[0], outputs, exporter=settings.exporter)
    fp32, fp32_manifest = chosen_fp32(entry, spec, module, plain, outputs, probes, settings)
    fp32_manifest = fp32_manifest.model_copy(update={"exporter": EXPORTERS[settings.exporter]})
    if variant == "fp32":
        put_graph(store, fp32_manifest, fp32)
        return ExportReport(manifest=fp32_manifest, reused=False, seconds=time.perf_counter() - t0)
    quality = quality_probes(spec, resolve_source(entry), model.config)
    int8, int8_manifest = validated_int8(entry, spec, module, fp32, outputs, quality, settings)
    int8_manifest = int8_manifest.model_copy(
        update={"graph_optimization": fp32_manifest.graph_optimization, "exporter": fp32_manifest.exporter}
    )
    also = []
    if settings.force or stored_manifest(store, entry, "fp32") is None:
        put_graph(store, fp32_manifest, fp32)
        also.append("fp32")
    put_graph(store, int8_manifest, int8)
    return ExportReport(
        manifest=int8_manifest, reused=False, seconds=time.perf_counter() - t0, also_stored=also
    )


def validated_int8(
    entry: BaseModelEntry,
    spec: ArchitectureSpec,
    module: torch.nn.Module,
    fp32: bytes,
    outputs: list[str],
    probes: list[Feed],
    settings: ExportSettings,
) -> tuple[bytes, OnnxExportManifest]:
    """Try int8 plans fewest-fp32-MatMuls first; keep the first whose min cosine vs torch passes the gate.

    A BERT-family text graph is first rescaled (``smoothing``: SmoothQuant scales and split-off outlier
    channels, fitted on the calibration texts) and its plans are tried first; the plans of the fp32
    graph as it is come after. Every plan is graded against ``module``, the unmodified torch model."""
    bound = spec.tolerance.int8_min_cosine
    sources: list[tuple[bytes, torch.nn.Module, SmoothingRecord | None]] = []
    if settings.int8_smoothing and spec.modality == "text" and smoothable(module.model):
        calibration = text_probe_set(resolve_source(entry), module.model.config, CALIBRATION_SENTENCES)
        smooth, record = smoothed_copy(module, calibration)
        graph = export_graph(smooth, spec, probes[0], outputs, exporter=settings.exporter)
        sources.append((graph, smooth, record))
    sources.append((fp32, module, None))
    reference, attempts = torch_runner(module), []
    for source, source_module, smoothing in sources:
        plans, sensitivity = _int8_plans(source_module, source, probes, bound, settings)
        prefix = "smooth-" if smoothing else ""
        for plan in plans:
            graph = quantize_int8(source, plan, preprocess=settings.preprocess_int8)
            figures = measure(reference, ort_runner(graph, settings.threads), probes, outputs)
            ok = figures.min_cosine >= bound
            attempts.append(
                QuantAttempt(
                    plan=prefix + plan.name,
                    min_cosine=figures.min_cosine,
                    mean_cosine=figures.mean_cosine,
                    accepted=ok,
                    kept_fp32=len(plan.keep_fp32),
                    predicted_min_cosine=plan.predicted_min_cosine,
                )
            )
            if ok:
                record = QuantizationRecord(
                    plan=prefix + plan.name,
                    kept_fp32=list(plan.keep_fp32),
                    sensitivity=sensitivity,
                    attempts=attempts,
                    min_cosine_required=bound,
                    smoothing=smoothing,
                )
                hidden = int(module.model.config.hidden_size)
                return graph, describe(
                    entry, spec, "int8", graph, outputs, figures, hidden, quantization=record
                )
    tried = ", ".join(f"{a.plan}: {a.min_cosine:.4f}" for a in attempts)
    raise OnnxToleranceError(
        f"{entry.name} int8 export refused: min cosine vs fp32 PyTorch below {bound} for every plan ({tried})",
        output="*",
        measured=max(a.min_cosine for a in attempts),
        bound=bound,
        metric="min_cosine",
    )


def _int8_plans(
    module: torch.nn.Module, graph: bytes, probes: list[Feed], bound: float, settings: ExportSettings
) -> tuple[list[Int8Plan], dict[str, float]]:
    """The sensitivity-ranked plans for ``graph`` (``settings.int8_keep_fp32`` forces one)."""
    plans, sensitivity = sensitivity_plan(module, graph, probes, bound)
    if settings.int8_keep_fp32 is not None:
        order = sorted(sensitivity, key=lambda n: -sensitivity[n])
        if settings.int8_keep_fp32 >= len(order):
            raise OnnxExportError(
                f"int8_keep_fp32 must be below the {len(order)} weight MatMuls of this graph"
            )
        keep = tuple(order[: settings.int8_keep_fp32])
        plans = [Int8Plan(f"keep-{len(keep)}-fp32" if keep else ALL_MATMUL, keep_fp32=keep)]
    return plans, sensitivity


def chosen_fp32(
    entry: BaseModelEntry,
    spec: ArchitectureSpec,
    module: torch.nn.Module,
    plain: bytes,
    outputs: list[str],
    probes: list[Feed],
    settings: ExportSettings,
) -> tuple[bytes, OnnxExportManifest]:
    """The plain graph or its ORT-fused rewrite, whichever is faster here; the one kept is validated vs
    torch (a fused graph that fails validation falls back to the plain one, unless fusion is forced)."""
    if spec.fusion is None or settings.fusion == "plain":
        why = "fusion not requested" if spec.fusion else f"no ORT fuser wired for {spec.name}"
        return plain, _validated(
            entry, spec, module, plain, outputs, probes, settings, kept="plain", reason=why
        )
    config = module.model.config
    fuser = f"onnxruntime.transformers {spec.fusion}"
    try:
        fused, counts = fuse_transformer(plain, spec.fusion, config.num_attention_heads, config.hidden_size)
    except OnnxExportError as e:
        if settings.fusion == "fused":
            raise
        why = f"fusion failed: {e}"
        return plain, _validated(
            entry, spec, module, plain, outputs, probes, settings, "plain", why, fuser=fuser
        )
    timing: dict[str, Any] = {}
    kept, why = "fused", "forced by settings"
    if settings.fusion == "auto":
        feed = timing_feed(probes)
        ms = cpu_ms_per_call(
            {"plain": ort_runner(plain, settings.threads), "fused": ort_runner(fused, settings.threads)}, feed
        )
        kept = "fused" if ms["fused"] < FUSED_MIN_GAIN * ms["plain"] else "plain"
        why = f"faster here: {kept} {ms[kept]:.1f} CPU-ms per batch, other {max(ms.values()):.1f}"
        timing = {"cpu_ms_per_batch": ms, "timing_shape": list(feed["input_ids"].shape)}
    extra = {"fuser": fuser, "fused_ops": counts, **timing}
    if kept == "plain":
        return plain, _validated(entry, spec, module, plain, outputs, probes, settings, "plain", why, **extra)
    try:
        return fused, _validated(entry, spec, module, fused, outputs, probes, settings, "fused", why, **extra)
    except OnnxExportError as e:
        if settings.fusion == "fused":
            raise
        log.warning("%s: fused graph not used (%s); keeping the plain graph", entry.name, e)
        why = f"fusion failed validation: {e}"
        return plain, _validated(entry, spec, module, plain, outputs, probes, settings, "plain", why, **extra)


def _validated(
    entry: BaseModelEntry,
    spec: ArchitectureSpec,
    module: torch.nn.Module,
    graph: bytes,
    outputs: list[str],
    probes: list[Feed],
    settings: ExportSettings,
    kept: str,
    reason: str,
    **record: Any,
) -> OnnxExportManifest:
    manifest = validated_fp32(entry, spec, module, graph, outputs, probes, settings.threads)
    return _with_record(manifest, GraphOptimizationRecord(kept=kept, reason=reason, **record))


def _with_record(manifest: OnnxExportManifest, record: GraphOptimizationRecord) -> OnnxExportManifest:
    return manifest.model_copy(update={"graph_optimization": record})


def timing_feed(probes: list[Feed]) -> Feed:
    """The probe closest to serving's typical call: the largest batch, and its longest sequence."""
    return max(probes, key=lambda f: tuple(next(iter(f.values())).shape[:2]))


def validated_fp32(
    entry: BaseModelEntry,
    spec: ArchitectureSpec,
    module: torch.nn.Module,
    graph: bytes,
    outputs: list[str],
    probes: list[Feed],
    threads: int,
) -> OnnxExportManifest:
    """Measure the fp32 graph on every shape probe and raise unless it is within the spec's tolerance."""
    figures = measure(torch_runner(module), ort_runner(graph, threads), probes, outputs)
    check_fp32(figures, spec.tolerance.atol, spec.tolerance.min_cosine, f"{entry.name} fp32 export")
    return describe(entry, spec, "fp32", graph, outputs, figures, int(module.model.config.hidden_size))


def load_base_model(entry: BaseModelEntry) -> torch.nn.Module:
    """The registered base's backbone, after checking its folder still has the registered fingerprint."""
    from transformers import AutoModel

    folder = resolve_source(entry)
    fingerprint, _, _ = fingerprint_folder(folder)
    if fingerprint != entry.fingerprint:
        raise IncompatibleBase(
            f"base {entry.name!r}: the weights at {folder} have fingerprint {fingerprint[:12]}..., "
            f"not the registered {entry.fingerprint[:12]}...; re-register the base before exporting"
        )
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return model.eval()


def export_graph(
    module: torch.nn.Module,
    spec: ArchitectureSpec,
    sample: Feed,
    outputs: list[str],
    extra_inputs: dict[str, torch.Tensor] | None = None,
    extra_axes: dict[str, dict[int, str]] | None = None,
    exporter: Exporter = "legacy",
) -> bytes:
    """Trace ``module`` to ONNX bytes (legacy by default: faster graphs at runtime here, PROBES §4)."""
    args = tuple(torch.from_numpy(sample[n]) for n in spec.input_names) + tuple((extra_inputs or {}).values())
    names = spec.input_names + list((extra_inputs or {}).keys())
    if exporter == "dynamo":
        if extra_inputs:
            raise OnnxExportError("the dynamo exporter is wired for the plain backbone only; use 'legacy'")
        return _export_dynamo(module, spec, args, outputs)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings are expected; the graph is validated below
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=spec.opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes={**spec.dynamic_axes(outputs), **(extra_axes or {})},
            do_constant_folding=True,
        )
    return buf.getvalue()


def _export_dynamo(module: torch.nn.Module, spec: ArchitectureSpec, args: tuple, outputs: list[str]) -> bytes:
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in i.dynamic_axes.items()}
        for i in spec.inputs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=spec.input_names,
            output_names=outputs,
            dynamic_shapes=shapes,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def torch_runner(module: torch.nn.Module) -> Runner:
    def run(feed: Feed) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(v) for v in feed.values()))
        return [o.numpy() for o in out]

    return run


def ort_runner(graph: bytes, threads: int) -> Runner:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def describe(
    entry: BaseModelEntry,
    spec: ArchitectureSpec,
    variant: str,
    graph: bytes,
    outputs: list[str],
    figures: ValidationFigures,
    hidden: int,
    lora: LoraGraphRecord | None = None,
    inputs: list[GraphInputRecord] | None = None,
    quantization: QuantizationRecord | None = None,
) -> OnnxExportManifest:
    records = inputs or [
        GraphInputRecord(
            name=i.name, dtype=i.dtype, dynamic_axes={str(k): v for k, v in i.dynamic_axes.items()}
        )
        for i in spec.inputs
    ]
    return OnnxExportManifest(
        base=entry.name,
        fingerprint=entry.fingerprint,
        variant=variant,
        architecture=spec.name,
        modality=spec.modality,
        graph_file=graph_file(variant),
        sha256=sha256_hex(graph),
        size=len(graph),
        opset=spec.opset,
        exporter=EXPORTERS["legacy"],
        torch_version=torch.__version__,
        onnxruntime_version=ort.__version__,
        inputs=records,
        outputs=outputs,
        pooling_outputs={p: o for p, o in POOLING_OUTPUTS.items() if o in outputs},
        hidden_size=hidden,
        validation=figures,
        lora=lora,
        quantization=quantization,
        validated_against="torch fp32"
        + (" (real-text probe set)" if variant == "int8" else " (shape probes)"),
    )


def put_graph(store: Any, manifest: OnnxExportManifest, graph: bytes) -> None:
    """Graph first, manifest last: the manifest is the commit point serving looks for."""
    store.put_artifact(manifest.base, manifest.fingerprint, manifest.graph_file, graph)
    store.put_artifact(
        manifest.base,
        manifest.fingerprint,
        manifest_file(manifest.variant),
        manifest.model_dump_json(indent=2).encode(),
    )


def stored_manifest(store: Any, entry: BaseModelEntry, variant: str) -> OnnxExportManifest | None:
    name = manifest_file(variant)
    if not store.has_artifact(entry.name, entry.fingerprint, name):
        return None
    return OnnxExportManifest.model_validate_json(store.get_artifact(entry.name, entry.fingerprint, name))
