"""onnxruntime's transformer fusions for the BERT family, and the choice between fused and plain graphs.

``onnxruntime.transformers.optimizer`` rewrites a traced BERT into ORT contrib ops: Attention (Q, K, V
packed into one GEMM, softmax and mask inside), SkipLayerNormalization (residual add + bias + norm),
BiasGelu and EmbedLayerNormalization. Attention fuses only when the trace used the *eager* attention
(transformers' default SDPA path traces into a mask subgraph the fuser does not recognise: measured on
MiniLM, 0 Attention fused with SDPA, 6 with eager). Input and output names stay as traced, so serving
loads a fused graph exactly like a plain one.

Whether fusion pays off depends on the CPU: on this workplace's AMD EPYC hosts (no AVX2) the fused
MiniLM took ~7% more CPU per batch than the plain graph (docs/onnx.md), so ``choose_faster`` times both
and the export keeps the faster one, recording the figures in the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.onnx_export.errors import OnnxExportError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
# ORT contrib ops the BERT fuser may produce; what a fused graph is recognised by
FUSED_OP_TYPES = ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "EmbedLayerNormalization")


def fuse_transformer(
    graph: bytes, model_type: str, num_heads: int, hidden_size: int
) -> tuple[bytes, dict[str, int]]:
    """The graph after ORT's transformer fusions, and how many of each fused op it now holds.

    ``opt_level=0``: only the Python fuser runs (no ORT session-level rewrite baked into the file), so
    the stored graph stays portable across ORT builds; ORT applies its own level at load time anyway.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory(prefix="loraplex-fuse-") as tmp:
        src = Path(tmp) / "plain.onnx"
        src.write_bytes(graph)
        # the fuser logs every step at INFO and warns about shapes it cannot infer; keep exports quiet
        with _quiet(
            "onnxruntime.transformers", "fusion_base", "onnx_model", "onnx_model_bert", "fusion_utils"
        ):
            model = optimize_model(
                str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0
            )
        counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
        # saving (not SerializeToString) sorts the graph and adds the com.microsoft opset import,
        # without which onnx shape inference (run by the int8 quantizer) rejects the contrib ops
        dst = Path(tmp) / "fused.onnx"
        model.save_model_to_file(str(dst))
        fused = dst.read_bytes()
    if not any(counts.get(op) for op in FUSED_OP_TYPES):
        raise OnnxExportError(f"ORT's {model_type!r} fuser found nothing to fuse in this graph")
    return fused, counts


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def cpu_ms_per_call(
    runners: dict[str, Callable[[Feed], object]], feed: Feed, rounds: int = 7
) -> dict[str, float]:
    """Median process CPU milliseconds per call of each runner, interleaved round by round.

    Process CPU time (all ORT threads together) rather than wall time: on a shared box wall time
    mostly measures the neighbours, while the CPU a graph burns per batch is what it costs us.
    """
    for run in runners.values():  # warm-up: first calls allocate
        run(feed)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            c0 = time.process_time()
            run(feed)
            samples[name].append((time.process_time() - c0) * 1000)
    return {name: statistics.median(v) for name, v in samples.items()}
