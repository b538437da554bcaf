"""ONNX export of registered bases (build step): graphs validated against PyTorch, stored as base artifacts."""

from training.onnx_export.artifacts import OnnxExportManifest, graph_file, manifest_file
from training.onnx_export.errors import (
    OnnxExportError,
    OnnxShapeError,
    OnnxToleranceError,
    UnsupportedArchitecture,
)
from training.onnx_export.export import ExportReport, ExportSettings, export_base

__all__ = [
    "ExportReport",
    "ExportSettings",
    "OnnxExportError",
    "OnnxExportManifest",
    "OnnxShapeError",
    "OnnxToleranceError",
    "UnsupportedArchitecture",
    "export_base",
    "graph_file",
    "manifest_file",
]
