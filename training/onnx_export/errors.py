"""Typed export failures. All are ``ValidationError`` (HTTP 422): the base cannot be exported as asked."""

from __future__ import annotations

from adapters_store.errors import ValidationError


class OnnxExportError(ValidationError):
    """Base of every ONNX export failure."""

    code = "onnx_export_error"


class UnsupportedArchitecture(OnnxExportError):
    code = "onnx_unsupported_architecture"


class OnnxShapeError(OnnxExportError):
    """An output of the graph has another shape than PyTorch's."""

    code = "onnx_shape_error"


class OnnxToleranceError(OnnxExportError):
    """The graph's outputs differ from PyTorch's by more than the spec allows; carries the figures."""

    code = "onnx_tolerance_error"

    def __init__(self, message: str, *, output: str, measured: float, bound: float, metric: str):
        super().__init__(message)
        self.output, self.measured, self.bound, self.metric = output, measured, bound, metric
