"""int8 dynamic quantization of an fp32 graph, with the most sensitive MatMuls kept in fp32.

Weights are per-channel QInt8 (per-tensor loses too much: min cosine ~0.93 on MiniLM, PROBES §4);
activations are quantized per tensor (uint8, asymmetric) at run time. Only MatMuls with a constant
weight are quantized (embedding Gathers and attention score products stay fp32). Quantizing every
MatMul of MiniLM measured min cosine 0.967 on the probe set (the short texts suffer most), so the
export ranks the MatMuls by sensitivity and keeps the fewest most sensitive ones in fp32 that let
the graph pass the cosine gate (``sensitivity_plan``).

Sensitivity is measured in PyTorch, not by quantizing the ONNX graph once per MatMul (that took ~17 s
per MatMul on a loaded 2-core box, 36 of them on MiniLM): each ``nn.Linear`` behind a MatMul node is
fake-quantized alone, emulating ORT's dynamic scheme (per-tensor uint8 activations, per-channel
symmetric int8 weights), and the drop of min cosine over the probe set is its score. The ranking only
*proposes* plans; every plan is still quantized by ORT and measured against torch before it counts.

The optional pre-processing step runs with ``skip_symbolic_shape=True`` (symbolic inference fails on
the ``Min(512, seq)`` axis) and writes temp files into the cwd, hence the private cwd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from training.onnx_export.errors import OnnxExportError
from training.onnx_export.validate import Feed, row_cosine

log = logging.getLogger(__name__)

ALL_MATMUL = "all-matmul"
# MatMuls traced inside a module of this name stay fp32 in every plan (smoothing.FP32Channels)
FP32_SCOPE = "fp32_channels"


@dataclass(frozen=True)
class Int8Plan:
    """Quantize every weight MatMul except the nodes named in ``keep_fp32``."""

    name: str
    keep_fp32: tuple[str, ...] = ()
    """ONNX node names left in fp32 (legacy exporter names nodes after module paths)."""
    predicted_min_cosine: float | None = None
    """The PyTorch fake-quant estimate that proposed this plan (the gate uses the real ORT figure)."""


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    prev = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(prev)


def weight_matmuls(graph: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant weight: the quantizable ones (those
    under :data:`FP32_SCOPE` excepted)."""
    return [n for n in _const_b_matmuls(graph) if not _in_fp32_scope(n)]


def _in_fp32_scope(node: str) -> bool:
    return f"/{FP32_SCOPE}/" in node


def _const_b_matmuls(graph: onnx.ModelProto) -> list[str]:
    consts = {i.name for i in graph.graph.initializer}
    return [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in consts]


def quantize_int8(
    fp32_graph: bytes, plan: Int8Plan = Int8Plan(ALL_MATMUL), preprocess: bool = False
) -> bytes:
    """Bytes of a dynamically int8-quantized copy of the graph (per-channel QInt8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="loraplex-quant-") as tmp, _inside(Path(tmp)):
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(fp32_graph)
        if preprocess:
            src = _preprocess(src)
        graph = onnx.load(str(src))
        unknown = set(plan.keep_fp32) - set(weight_matmuls(graph))
        if unknown:
            raise OnnxExportError(f"int8 plan {plan.name!r}: no weight MatMul named {sorted(unknown)}")
        fp32_scope = [n for n in _const_b_matmuls(graph) if _in_fp32_scope(n)]
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            src,
            out,
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=[*plan.keep_fp32, *fp32_scope],
            # MatMulConstBOnly: activation x activation products (attention scores) stay fp32;
            # DefaultTensorType: fused graphs have contrib ops without inferred output types
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


# ---- sensitivity (PyTorch fake-quant emulating ORT's dynamic int8) ----


def linear_for_node(module: torch.nn.Module, node: str) -> torch.nn.Linear | None:
    """The ``nn.Linear`` a legacy-exported MatMul node came from (``/model/encoder/layer.0/.../MatMul``)."""
    path = node.strip("/").removesuffix("/MatMul").replace("/", ".")
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, torch.nn.Linear) else None


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    # ORT DynamicQuantizeLinear: uint8, range always includes 0, one scale for the whole tensor
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    # per output channel, symmetric int8 (ORT's default for QInt8 weights)
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


@contextlib.contextmanager
def fake_quantized(linears: Sequence[torch.nn.Linear]) -> Iterator[None]:
    """Temporarily make ``linears`` compute like ORT's dynamic int8 MatMul (bias stays fp32)."""
    saved = [lin.weight.data for lin in linears]
    hooks = [
        lin.register_forward_pre_hook(lambda _m, args: (fake_quant_activation(args[0]),)) for lin in linears
    ]
    for lin in linears:
        lin.weight.data = fake_quant_weight(lin.weight.data)
    try:
        yield
    finally:
        for lin, w, h in zip(linears, saved, hooks, strict=True):
            lin.weight.data = w
            h.remove()


def outputs_of(module: torch.nn.Module, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """``module``'s outputs on each feed, as numpy: the reference :func:`min_cosine` compares against."""
    with torch.inference_mode():
        return [[o.numpy() for o in module(*(torch.from_numpy(v) for v in f.values()))] for f in feeds]


def min_cosine(module: torch.nn.Module, probes: Sequence[Feed], reference: list[list[np.ndarray]]) -> float:
    """The lowest row cosine of ``module``'s pooled outputs against ``reference`` (as in the gate)."""
    worst = 1.0
    with torch.inference_mode():
        for feed, ref in zip(probes, reference, strict=True):
            out = module(*(torch.from_numpy(v) for v in feed.values()))
            for r, g in zip(ref, out, strict=True):
                if r.ndim == 2:  # pooled outputs, as in validate.measure
                    worst = min(worst, float(row_cosine(r, g.numpy()).min()))
    return worst


def sensitivity_plan(
    module: torch.nn.Module, fp32_graph: bytes, probes: Sequence[Feed], bound: float, margin: float = 0.002
) -> tuple[list[Int8Plan], dict[str, float]]:
    """Plans to try, fewest fp32 MatMuls first, and each MatMul's measured sensitivity.

    Sensitivity of a node = 1 - min cosine vs torch fp32 over ``probes`` with only that node
    fake-quantized. The first plan keeps the k most sensitive nodes in fp32, k the smallest whose
    fake-quant estimate clears ``bound + margin``; later plans keep more (the estimate can be optimistic).
    Nodes that map to no ``nn.Linear`` (e.g. dynamo-exported names) count as most sensitive.
    The ranking runs on the first probe only (on MiniLM the short texts set the min cosine, and all
    probes made the ranking ~3x slower); the estimates of whole plans use every probe.
    """
    nodes = weight_matmuls(onnx.load_from_string(fp32_graph))
    reference = outputs_of(module, probes)
    linears = {n: linear_for_node(module, n) for n in nodes}
    drops: dict[str, float] = {}
    for node, lin in linears.items():
        if lin is None:
            drops[node] = 1.0
            continue
        with fake_quantized([lin]):
            drops[node] = 1.0 - min_cosine(module, probes[:1], reference[:1])
    order = sorted(nodes, key=lambda n: -drops[n])

    def estimate(k: int) -> float:
        quantized = [linears[n] for n in order[k:] if linears[n] is not None]
        with fake_quantized(quantized):
            return min_cosine(module, probes, reference)

    # keeping every MatMul in fp32 would not be an int8 graph: at most n - 1, and the gate may refuse
    most = len(order) - 1
    k, predicted = _smallest_passing_k(estimate, most, bound + margin)
    # the estimate errs both ways (on a rescaled MiniLM it read 0.9903 where ORT measured 0.9913): the
    # fewest fp32 MatMuls whose estimate clears the bare bound are tried first, the gate decides
    bare, more = _smallest_passing_k(estimate, k, bound, predicted)
    predicted |= more
    plans = []
    for keep in dict.fromkeys([bare, k, *(min(most, k + step) for step in (2, 4, 8, 16))]):
        plans.append(
            Int8Plan(
                name=ALL_MATMUL if keep == 0 else f"keep-{keep}-fp32",
                keep_fp32=tuple(order[:keep]),
                predicted_min_cosine=predicted.get(keep) if keep in predicted else None,
            )
        )
    return plans, drops


def _smallest_passing_k(
    estimate, n: int, target: float, known: dict[int, float] | None = None
) -> tuple[int, dict[int, float]]:
    """Binary search for the smallest k <= n with estimate(k) >= target (estimate grows with k, roughly);
    ``known``: estimates already made, not repeated."""
    seen: dict[int, float] = dict(known or {})

    def at(k: int) -> float:
        if k not in seen:
            seen[k] = estimate(k)
        return seen[k]

    if at(0) >= target:
        return 0, seen
    lo, hi = 0, n  # invariant: estimate(lo) fails; hi is the best candidate (tried last if nothing passes)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) >= target else (mid, hi)
    return hi, seen
