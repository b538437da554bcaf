"""The exports the service's default runtime ('auto') looks for, built when a base is registered.

``loraplex base register`` and ``loraplex demo`` call :func:`export_for_serving`, so a new user serves
on onnxruntime without an extra step: the plain fp32 graph (head and bare-base rows) and, for text
bases, the adapter graph: LoRA on the targets training adapts by default and IA3 on training's default
IA3 modules (lora_graph.py), so the demo's LoRA and IA3 tenants both run on it. Both are validated
against PyTorch before they are stored (see export.py). A base the exporter cannot take is still
registered: the report says why, and the service then serves it on torch and logs the same reason.

>>> report = export_for_serving(open_store("/srv/loraplex"), "minilm")  # doctest: +SKIP
>>> report.variants, round(report.seconds)  # doctest: +SKIP
(['fp32', 'lora-fp32'], 9)
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from training.onnx_export.errors import OnnxExportError

# What training's LoRA strategy adapts when no target_modules are given (training/learners/peft_adapter.py):
# the LoRA graph must take those, or the demo's own LoRA tenants would run on torch.
FALLBACK_LORA_TARGETS = ("query", "value")


class ServingExportsReport(BaseModel):
    """What :func:`export_for_serving` stored (or found already stored) for one base."""

    model_config = ConfigDict(frozen=True)

    base: str
    variants: list[str] = Field(default_factory=list, description="validated graphs now in the store")
    reused: list[str] = Field(default_factory=list, description="of those, the ones already stored")
    seconds: float = Field(ge=0, description="wall time of the exports and their validation")
    skipped: str | None = Field(default=None, description="why some graph was not built (torch serves it)")

    def summary(self) -> str:
        """One line for the CLI and the demo."""
        if not self.variants:
            return f"onnx: not exported ({self.skipped}); the service will run base {self.base} on torch"
        text = f"onnx: {' + '.join(self.variants)} validated against PyTorch and stored ({self.seconds:.1f} s"
        text += ", already stored)" if set(self.reused) == set(self.variants) else ")"
        return text + (f"; {self.skipped}" if self.skipped else "")


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    from training.learners.peft_adapter import LORA_TARGETS

    return tuple(LORA_TARGETS.get(model_type) or FALLBACK_LORA_TARGETS)


def export_for_serving(store: Any, base_name: str, settings: Any = None) -> ServingExportsReport:
    """Build (or reuse) the fp32 graph and, for text bases, the LoRA graph; never raises for a base
    the exporter cannot take or a graph that fails validation (the report says why)."""
    from training.backbone import quiet_transformers
    from training.onnx_export.export import ExportSettings, export_base
    from training.onnx_export.lora_graph import export_lora_base
    from training.onnx_export.specs import spec_for

    t0 = time.perf_counter()
    quiet_transformers()  # the CLI prints this report, not loading bars
    settings = settings or ExportSettings()
    entry = store.get_base(base_name)
    variants: list[str] = []
    reused: list[str] = []

    def done(skipped: str | None = None) -> ServingExportsReport:
        return ServingExportsReport(
            base=base_name,
            variants=variants,
            reused=reused,
            seconds=time.perf_counter() - t0,
            skipped=skipped,
        )

    try:
        spec = spec_for(entry.model_type)
        report = export_base(store, base_name, settings=settings)
    except OnnxExportError as e:  # unsupported architecture or a graph outside tolerance
        return done(str(e))
    variants.append("fp32")
    reused += ["fp32"] if report.reused else []
    if spec.modality != "text":
        return done(f"no adapter graph for {spec.modality} bases (their LoRA and IA3 rows run on torch)")
    try:
        lora = export_lora_base(store, base_name, default_lora_targets(entry.model_type), settings)
    except OnnxExportError as e:
        return done(f"adapter graph not stored ({e}); LoRA and IA3 rows run on torch")
    variants.append("lora-fp32")
    reused += ["lora-fp32"] if lora.reused else []
    return done()
