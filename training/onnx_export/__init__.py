"""ONNX export of registered bases (build step): graphs validated against PyTorch, stored as base artifacts.

Only the click group is imported eagerly, so mounting ``loraplex onnx`` does not load torch or
onnxruntime; the rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from training.onnx_export.cli import onnx_group

_LAZY = {
    "OnnxExportManifest": "adapters_store.onnx_artifacts",
    "graph_file": "adapters_store.onnx_artifacts",
    "manifest_file": "adapters_store.onnx_artifacts",
    "OnnxExportError": "training.onnx_export.errors",
    "OnnxShapeError": "training.onnx_export.errors",
    "OnnxToleranceError": "training.onnx_export.errors",
    "UnsupportedArchitecture": "training.onnx_export.errors",
    "ExportReport": "training.onnx_export.export",
    "ExportSettings": "training.onnx_export.export",
    "export_base": "training.onnx_export.export",
    "export_lora_base": "training.onnx_export.lora_graph",
}

__all__ = ["onnx_group", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'training.onnx_export' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
