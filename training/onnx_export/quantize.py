"""int8 dynamic quantization of an fp32 graph, entirely inside a private temp folder.

Weights are per-channel QInt8 (per-tensor loses too much: min cosine ~0.93 on MiniLM, PROBES §4);
activations are quantized per tensor at run time. Only MatMuls with a constant weight are quantized
(embedding Gathers stay fp32). Which MatMuls is an ``Int8Plan``: on MiniLM quantizing the feed-forward
MatMuls too drops the min cosine on very short texts to ~0.97 (measured), so the export tries the
plans fastest-first and keeps the first one that passes the cosine gate.

The optional pre-processing step runs with ``skip_symbolic_shape=True`` (symbolic inference fails on
the ``Min(512, seq)`` axis) and writes temp files into the cwd, hence the private cwd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from training.onnx_export.errors import OnnxExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Plan:
    """Which weight MatMuls to quantize: all of them minus those whose node name matches ``exclude``."""

    name: str
    exclude: tuple[str, ...] = ()
    """regexes over ONNX node names (legacy exporter names nodes after module paths)."""


_FFN_IN = r"/layer\.\d+/intermediate/dense/MatMul$"
_FFN_OUT = r"/layer\.\d+/output/dense/MatMul$"
# Fastest first. The names hold for BERT-family and ViT encoders (same module paths).
INT8_PLANS: tuple[Int8Plan, ...] = (
    Int8Plan("all-matmul"),
    Int8Plan("no-ffn-output", exclude=(_FFN_OUT,)),
    Int8Plan("attention-only", exclude=(_FFN_IN, _FFN_OUT)),
)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    prev = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(prev)


def excluded_nodes(graph: onnx.ModelProto, plan: Int8Plan) -> list[str]:
    """Names of the MatMul nodes ``plan`` keeps in fp32; a pattern that matches nothing is an error."""
    names = [n.name for n in graph.graph.node if n.op_type == "MatMul"]
    out = []
    for pattern in plan.exclude:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise OnnxExportError(f"int8 plan {plan.name!r}: no MatMul node matches {pattern!r}")
        out += hits
    return out


def quantize_int8(fp32_graph: bytes, plan: Int8Plan = INT8_PLANS[0], preprocess: bool = False) -> bytes:
    """Bytes of a dynamically int8-quantized copy of the graph (per-channel QInt8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="loraplex-quant-") as tmp, _inside(Path(tmp)):
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(fp32_graph)
        if preprocess:
            src = _preprocess(src)
        exclude = excluded_nodes(onnx.load(str(src)), plan)
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            src,
            out,
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude,
            # MatMulConstBOnly: activation x activation products (attention scores) stay fp32;
            # DefaultTensorType: pre-processed graphs have fused ops without inferred output types
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
        )
        return out.read_bytes()


def _preprocess(src: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = src.with_name("fp32-pre.onnx")
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:  # optional optimisation step: quantize the plain graph instead
        log.warning("quant_pre_process failed (%s); quantizing the graph without it", e)
        return src
    return dst
