"""ONNX export of registered bases (build step): graphs validated against PyTorch, stored as base artifacts.

Only the click group is imported eagerly, so mounting ``loraplex onnx`` does not load torch or
onnxruntime; the rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from training.onnx_export.cli import onnx_group

_LAZY = {
    "OnnxExportManifest": "artifacts",
    "graph_file": "artifacts",
    "manifest_file": "artifacts",
    "OnnxExportError": "errors",
    "OnnxShapeError": "errors",
    "OnnxToleranceError": "errors",
    "UnsupportedArchitecture": "errors",
    "ExportReport": "export",
    "ExportSettings": "export",
    "export_base": "export",
    "export_lora_base": "lora_graph",
}

__all__ = ["onnx_group", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'training.onnx_export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"training.onnx_export.{_LAZY[name]}"), name)
