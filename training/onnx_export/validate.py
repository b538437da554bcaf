"""Check an ONNX graph against PyTorch on probe inputs; raise a typed error carrying the figure."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from adapters_store.onnx_artifacts import ValidationFigures
from training.onnx_export.errors import OnnxShapeError, OnnxToleranceError

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], list[np.ndarray]]


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row of two [B, H] arrays, computed in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(1) / np.maximum(denom, 1e-30)


def measure(
    run_ref: Runner, run_onnx: Runner, feeds: Sequence[Feed], names: Sequence[str]
) -> ValidationFigures:
    """Run both on every feed and collect the worst differences; shape mismatches raise at once."""
    diffs, scaled, cosines, shapes = [0.0], [0.0], [], []
    for feed in feeds:
        ref, got = run_ref(feed), run_onnx(feed)
        shape = list(next(iter(feed.values())).shape)
        shapes.append(shape)
        for name, r, g in zip(names, ref, got, strict=True):
            if r.shape != g.shape:
                raise OnnxShapeError(
                    f"output {name!r}: ONNX shape {list(g.shape)} != torch {list(r.shape)} for input {shape}"
                )
            d = np.abs(r.astype(np.float64) - g)
            diffs.append(float(d.max()))
            scaled.append(float((d / (1.0 + np.abs(r))).max()))
            if r.ndim == 2:  # pooled features: what heads consume; token states are covered by abs diff
                cosines.append(row_cosine(r, g))
    allcos = np.concatenate(cosines)
    return ValidationFigures(
        max_abs_diff=max(diffs),
        max_scaled_diff=max(scaled),
        min_cosine=float(allcos.min()),
        mean_cosine=float(allcos.mean()),
        shapes=shapes,
    )


def check_fp32(figures: ValidationFigures, atol: float, min_cosine: float, what: str) -> None:
    # scaled: token states of long inputs reach |x| ~ 10, where float32 noise alone is ~1e-4
    if not figures.max_scaled_diff <= atol:  # written so that NaN fails too
        raise OnnxToleranceError(
            f"{what}: max |onnx - torch| / (1 + |torch|) is {figures.max_scaled_diff:.3g} > tolerance {atol:.3g} "
            f"(max abs diff {figures.max_abs_diff:.3g})",
            output="*",
            measured=figures.max_scaled_diff,
            bound=atol,
            metric="max_scaled_diff",
        )
    check_cosine(figures, min_cosine, what)


def check_cosine(figures: ValidationFigures, min_cosine: float, what: str) -> None:
    if not figures.min_cosine >= min_cosine:
        raise OnnxToleranceError(
            f"{what}: min cosine vs fp32 PyTorch is {figures.min_cosine:.6f} < required {min_cosine} "
            f"(mean {figures.mean_cosine:.6f}); not stored",
            output="*",
            measured=figures.min_cosine,
            bound=min_cosine,
            metric="min_cosine",
        )
