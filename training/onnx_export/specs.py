"""Each exportable architecture described as data: graph inputs, dynamic axes, outputs, tolerances, probes.

Adding a family is a new ``ArchitectureSpec`` in ``ARCHITECTURES`` (as Optimum does with its
``OnnxConfig`` classes), not a new code path. Every export is validated against PyTorch with the
spec's tolerances before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from training.onnx_export.errors import UnsupportedArchitecture

# Graph output names. Never plain "embedding": the dynamo exporter names a Gather output that way
# and ORT then refuses the graph for a duplicate definition (PROBES §4, pitfall 1).
MEAN_OUTPUT = "mean_pooled"
CLS_OUTPUT = "cls_token"
POOLER_OUTPUT = "pooler_output"
# [batch, tokens, hidden]: lets serving swap the torch forward for ORT and keep its own pooling code
HIDDEN_OUTPUT = "last_hidden_state"
# manifest.pooling -> graph output that serves it
POOLING_OUTPUTS: dict[str, str] = {"mean": MEAN_OUTPUT, "cls": CLS_OUTPUT, "pooler": POOLER_OUTPUT}

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class GraphInput:
    """One graph input. ``dynamic_axes`` maps a dimension index to its symbolic name."""

    name: str
    dtype: Literal["int64", "float32"]
    dynamic_axes: dict[int, str]


@dataclass(frozen=True)
class Tolerance:
    """Acceptance bounds of an exported graph against PyTorch fp32 on the probe inputs."""

    atol: float = 1e-4
    """fp32 graphs: largest allowed |onnx - torch| / (1 + |torch|) of any output value."""
    min_cosine: float = 0.9999
    """fp32 graphs: smallest allowed per-row cosine similarity of any output."""
    int8_min_cosine: float = 0.99
    """int8 graphs: smallest allowed per-row cosine vs fp32 PyTorch (abs diff is not meaningful there)."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family is exported and checked."""

    name: str
    model_types: tuple[str, ...]
    """``config.model_type`` values this spec handles."""
    modality: Modality
    inputs: tuple[GraphInput, ...]
    tolerance: Tolerance = field(default_factory=Tolerance)
    probe_batches: tuple[int, ...] = (1, 8, 32)
    """Batch sizes the export is validated at."""
    probe_seq_lens: tuple[int, ...] = ()
    """Text only: sequence lengths validated (short and long); capped by max_position_embeddings."""
    probe_max_tokens: int = 1 << 30
    """Text only: batch x seq pairs above this are skipped (long sequences are still probed at the
    smaller batches); keeps the export quick enough to run at every base registration."""
    opset: int = 17
    fusion: str | None = None
    """``model_type`` for onnxruntime.transformers' fuser (None: no fusion tried). Traced with eager
    attention, since only that pattern fuses into ORT's Attention op."""

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def output_names(self, has_pooler: bool) -> list[str]:
        return [MEAN_OUTPUT, CLS_OUTPUT] + ([POOLER_OUTPUT] if has_pooler else []) + [HIDDEN_OUTPUT]

    def dynamic_axes(self, outputs: list[str]) -> dict[str, dict[int, str]]:
        axes = {i.name: dict(i.dynamic_axes) for i in self.inputs}
        axes.update({o: {0: "batch"} for o in outputs})
        if HIDDEN_OUTPUT in outputs and self.modality == "text":
            axes[HIDDEN_OUTPUT] = {0: "batch", 1: "seq"}
        return axes


_TEXT_INPUTS = (
    GraphInput("input_ids", "int64", {0: "batch", 1: "seq"}),
    GraphInput("attention_mask", "int64", {0: "batch", 1: "seq"}),
)

BERT_FAMILY = ArchitectureSpec(
    name="bert-family",
    # Encoders whose forward takes input_ids + attention_mask; only "bert" is exercised by the tests,
    # the others are still validated against PyTorch at every export.
    model_types=("bert", "roberta", "xlm-roberta", "electra"),
    modality="text",
    inputs=_TEXT_INPUTS,
    probe_batches=(1, 5, 32),
    probe_seq_lens=(8, 32, 256),
    # 32 x 256 alone was most of the validation time on MiniLM; 5 x 256 still probes long inputs
    probe_max_tokens=2048,
    fusion="bert",
)

VIT = ArchitectureSpec(
    name="vit",
    model_types=("vit",),
    modality="image",
    inputs=(GraphInput("pixel_values", "float32", {0: "batch"}),),
    # Attention over few patches: errors stay tiny, but layer norms on random images amplify a bit.
    tolerance=Tolerance(atol=2e-4),
    probe_batches=(1, 7, 32),
)

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (BERT_FAMILY, VIT)


def spec_for(model_type: str) -> ArchitectureSpec:
    """The spec that exports ``model_type``; a clear error listing the supported ones otherwise."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHITECTURES for t in s.model_types)
    raise UnsupportedArchitecture(
        f"no ONNX export for model_type {model_type!r}; supported: {', '.join(known)}"
    )
