"""``runtime="onnx"``: the shared backbone pass on onnxruntime where the stored graphs can do it.

Batches of head and bare-base rows run the base's validated plain export (fp32 or int8); batches that
also hold LoRA rows run the ``lora-fp32`` graph (stacked A/B inputs + a per-row slot index) when it
was exported. Anything a graph cannot express (IA3, partial blocks, LoRA on modules the graph does not
take, images with LoRA) runs on the torch backbone, so every row is still answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapters_store.errors import UnsupportedAdapter

LORA_MANIFEST = "backbone-lora-fp32.json"
FP32_MANIFEST = "backbone-fp32.json"


@dataclass
class OrtRuntime:
    """The ORT sessions an engine uses instead of its torch backbone, created once at start."""

    plain: Any  # serving.onnx_backbone.OrtBackbone over the fp32 or int8 export
    lora: Any | None = None  # OrtLoraBackbone over the lora-fp32 export, when one is stored
    slots: Any | None = None  # serving.onnx_backbone.LoraSlots: resident LoRA inputs of that graph
    calls: int = 0  # backbone passes served by ORT (the rest ran on torch)
    fallbacks: dict[str, int] = field(default_factory=dict)  # passes sent to torch, by reason

    def describe(self) -> str:
        """What runs where, for the start log."""
        text = f"onnxruntime ({self.plain.record.variant} graph) for head and bare-base rows"
        if self.lora is None:
            return text + "; no LoRA graph stored, so batches with LoRA rows run on torch"
        return (
            text + f" and LoRA on {', '.join(self.lora.record.lora.targets)}; IA3, partial and full on torch"
        )

    def _fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    @staticmethod
    def exported(store: Any, base: Any) -> bool:
        """True when ``loraplex onnx export`` stored the base's plain fp32 graph (what 'auto' needs)."""
        return store.has_artifact(base.name, base.fingerprint, FP32_MANIFEST)

    @classmethod
    def load(cls, store: Any, base: Any, runtime: str, threads: int, lora_slots: int = 64) -> OrtRuntime:
        from serving.onnx_backbone import LoraSlots, OrtBackbone

        plain = OrtBackbone.from_store(store, base, "int8" if runtime == "onnx-int8" else "fp32", threads)
        lora = slots = None
        if store.has_artifact(base.name, base.fingerprint, LORA_MANIFEST):
            lora = OrtBackbone.from_store(store, base, "lora-fp32", threads)
            slots = LoraSlots(lora.record, capacity=lora_slots)
        return cls(plain, lora, slots)

    def try_pass(self, plan: Any, adapters: list, inputs: dict) -> tuple[Any, Any] | None:
        """(hidden, pooled) from ORT, or None when this batch needs the torch backbone."""
        kinds = {a.kind for a in adapters}
        if kinds <= {"head"}:
            self.calls += 1
            return self.plain.hidden_and_pooler(inputs)
        other = sorted(kinds - {"head", "lora"})
        if other or self.lora is None or "input_ids" not in inputs:
            self._fallback(f"kind {other[0]}" if other else "no LoRA graph")
            return None
        try:
            out = self._lora_pass(plan, adapters, inputs)
        except UnsupportedAdapter:
            self._fallback("LoRA outside the graph")  # e.g. a LoRA on a module the graph does not take
            return None
        self.calls += 1
        return out

    def _lora_pass(self, plan: Any, adapters: list, inputs: dict) -> tuple[Any, Any]:
        from serving.onnx_backbone import LoraWeights

        # Keyed by content digest: a resident adapter is never packed again, a new version always is.
        by_digest = {a.digest: a for a in adapters if a.lora}
        stack, slots = self.slots.assign(list(by_digest), lambda d: LoraWeights.from_paths(by_digest[d].lora))
        slot_of = dict(zip(by_digest, slots, strict=True))
        # Plan slot -> graph slot; the bare base (BASE_SLOT, -1) and head-only adapters get the zero slot.
        graph_slot = {s: slot_of[a.digest] for s, a in enumerate(adapters) if a.lora}
        index = np.array([graph_slot.get(s, stack.no_adapter_slot) for s in plan.slot_of_position()])
        return self.lora.hidden_and_pooler(inputs, stack, index)
