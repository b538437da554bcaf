"""The ONNX export manifest: the one schema ``training/onnx_export`` writes and ``serving`` reads.

An export stores, under its base (``store.put_artifact(base, fingerprint, filename, data)``)::

    bases/<base>/artifacts/<fingerprint>/backbone-<variant>.onnx   the graph, no external data
    bases/<base>/artifacts/<fingerprint>/backbone-<variant>.json   OnnxExportManifest (written last)

The manifest is the commit point: it is written after the graph and records the graph's sha256, so a
half-written export is never served. It lives here, in the registry package, because both sides
depend on it and serving never imports training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.bundle import utc_now

EXPORT_SCHEMA_VERSION = 1
Variant = Literal["fp32", "int8", "lora-fp32"]
VARIANTS: tuple[str, ...] = ("fp32", "int8", "lora-fp32")
# The LoRA graph input layout the exporter writes and serving feeds (see LoraGraphRecord).
LORA_LAYOUT = "rank-chunks"
LORA_DELTA_ADD = "combine"


def graph_file(variant: str) -> str:
    return f"backbone-{variant}.onnx"


def manifest_file(variant: str) -> str:
    return f"backbone-{variant}.json"


class GraphInputRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: Literal["int64", "float32"]
    dynamic_axes: dict[str, str] = Field(description="dimension index (as text) -> symbolic name")


class LoraGraphRecord(BaseModel):
    """How the LoRA variant's extra inputs are laid out (see training/onnx_export/lora_graph.py).

    ``rank-chunks`` (current): a LoRA is stored as chunks of one rank R, and each call lists the (row,
    chunk) pairs it uses; the per-row slot index picks IA3 vectors only (slot ``i`` holds adapter ``i``'s
    IA3 vectors, ones where it has none). ``slot-per-row`` (records without ``layout``): one slot index
    per row for both kinds, LoRA ranks zero-padded to the largest; serving no longer feeds that layout
    (its LoRA and IA3 rows run on torch) and the next export rebuilds it. Records written before IA3
    joined the graph have no IA3 fields.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    targets: list[str] = Field(
        description="module paths inside one encoder block that take a LoRA delta, e.g. "
        "attention.self.query (what `--lora-targets query` records for BERT)"
    )
    num_layers: int = Field(gt=0)
    layout: Literal["slot-per-row", "rank-chunks"] = Field(
        default="slot-per-row", description="the input layout (older records: slot-per-row)"
    )
    index_input: str = Field(
        description="int64 [batch]: the slot of each row (rank-chunks: its IA3 slot; slot-per-row: both)"
    )
    rows_input: str | None = Field(default=None, description="rank-chunks: int64 [chunks], each chunk's row")
    chunks_input: str | None = Field(
        default=None, description="rank-chunks: int64 [chunks], each chunk's slot in the A/B stacks"
    )
    a_input: str = Field(
        description="pattern with {layer} and {target}: float32 [N, in, R] = A^T per chunk (or slot)"
    )
    b_input: str = Field(
        description="pattern with {layer} and {target}: float32 [N, R, out] = (scale*B)^T per chunk (or slot)"
    )
    delta_add: Literal["combine", "scatter"] = Field(
        default="combine",
        description="how chunk deltas reach their rows: a 0/1 [batch, chunks] matmul and add. 'scatter' "
        "(one ScatterND add per module, exported 2026-12-01 11:05-11:45 UTC) gave wrong rows when "
        "onnxruntime ran it on several threads (its ScatterND add races on duplicate rows): serving "
        "refuses such graphs and the next export rebuilds them",
    )
    in_features: dict[str, int] = Field(description="in features of every adapted module (LoRA or IA3)")
    out_features: dict[str, int] = Field(description="out features of every adapted module")
    ia3_input: str | None = Field(
        default=None,
        description="pattern with {layer} and {target}: float32 [N, dim] IA3 vector per slot (ones: none)",
    )
    ia3_in: list[str] = Field(
        default_factory=list,
        description="module paths whose INPUT takes an IA3 vector (PEFT's feedforward_modules side), "
        "e.g. output.dense",
    )
    ia3_out: list[str] = Field(
        default_factory=list,
        description="module paths whose OUTPUT takes an IA3 vector, e.g. attention.self.key",
    )

    @property
    def takes_index(self) -> bool:
        """Whether the graph has the per-row slot input: only IA3 reads it in the rank-chunk layout, so
        a LoRA-only graph's trace dropped it."""
        return bool(self.ia3_in or self.ia3_out)


class QuantAttempt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: str
    min_cosine: float
    mean_cosine: float
    accepted: bool
    kept_fp32: int | None = Field(default=None, description="how many weight MatMuls this plan kept in fp32")
    predicted_min_cosine: float | None = Field(
        default=None, description="the PyTorch fake-quant estimate that proposed the plan"
    )


class SmoothingRecord(BaseModel):
    """int8 of a BERT-family graph: how its activations were rescaled before quantization (the stored
    graph computes the same function in fp32; training.onnx_export.smoothing)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alphas: dict[str, float] = Field(
        description="kind of input (qkv, attention_output, intermediate) -> SmoothQuant migration strength"
    )
    outlier_ratio: float = Field(description="FFN down-projection inputs above this x median were split off")
    split_channels: dict[str, list[int]] = Field(
        default_factory=dict, description="layer index -> FFN input channels computed in fp32 beside int8"
    )
    calibration_rows: int = Field(description="calibration texts the scales were fitted on")
    calibration_min_cosine: float = Field(
        description="fake-int8 min cosine vs fp32 on those texts with the chosen strengths (the gate "
        "grades the stored graph on the probe set, not this)"
    )


class QuantizationRecord(BaseModel):
    """int8 only: the plan stored and every plan tried before it, with their measured cosines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str = "dynamic int8, per-channel QInt8 weights, MatMul only"
    plan: str
    excluded_patterns: list[str] = Field(default_factory=list, description="older exports: regexes kept fp32")
    attempts: list[QuantAttempt]
    min_cosine_required: float
    kept_fp32: list[str] = Field(default_factory=list, description="weight MatMul nodes left in fp32")
    sensitivity: dict[str, float] = Field(
        default_factory=dict,
        description="per weight MatMul: 1 - min cosine vs torch fp32 with only that MatMul quantized "
        "(PyTorch fake-quant on the probe set); the most sensitive are the ones kept in fp32",
    )
    smoothing: SmoothingRecord | None = Field(
        default=None, description="activation rescaling applied before quantizing; None: the fp32 graph as is"
    )


class GraphOptimizationRecord(BaseModel):
    """fp32 graph rewrites tried at export (ORT transformer fusions) and which graph was kept, with why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kept: Literal["fused", "plain"]
    reason: str
    fuser: str | None = Field(default=None, description="e.g. 'onnxruntime.transformers bert'")
    fused_ops: dict[str, int] = Field(default_factory=dict, description="fused op type -> count")
    cpu_ms_per_batch: dict[str, float] = Field(
        default_factory=dict, description="'fused'/'plain' -> median process CPU ms per call at export"
    )
    timing_shape: list[int] = Field(default_factory=list, description="[batch, seq] of the timed input")


class ValidationFigures(BaseModel):
    """What was measured: worst case over every probe, row and output."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float = Field(ge=0, description="largest |onnx - torch| of any value")
    max_scaled_diff: float = Field(
        ge=0,
        description="largest |onnx - torch| / (1 + |torch|): absolute for small values, relative for large",
    )
    min_cosine: float = Field(description="smallest per-row cosine of any pooled output")
    mean_cosine: float = Field(description="mean per-row cosine over the pooled outputs")
    shapes: list[list[int]] = Field(description="probe input shapes (first input) that were checked")


class OnnxExportManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = EXPORT_SCHEMA_VERSION
    base: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    variant: Variant
    architecture: str
    modality: Literal["text", "image"]
    graph_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    opset: int
    exporter: str
    torch_version: str
    onnxruntime_version: str
    inputs: list[GraphInputRecord]
    outputs: list[str]
    pooling_outputs: dict[str, str] = Field(description="manifest pooling (mean/cls/pooler) -> output name")
    hidden_size: int
    validation: ValidationFigures
    validated_against: str = Field(description="what the figures compare to, e.g. 'torch fp32'")
    lora: LoraGraphRecord | None = None
    quantization: QuantizationRecord | None = None
    graph_optimization: GraphOptimizationRecord | None = None
    created_at: str = Field(default_factory=utc_now)
