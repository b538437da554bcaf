"""``runtime="onnx"``: the shared backbone pass on onnxruntime where the stored graphs can do it.

Batches of head and bare-base rows run the base's validated plain export (fp32 or int8); batches that
also hold LoRA or IA3 rows run the ``lora-fp32`` adapter graph (LoRA rank chunks and IA3 vectors kept
resident, a per-row slot index and the call's (row, chunk) pairs) when it was exported, so head,
bare-base, LoRA and IA3 rows share ONE ORT call. An adapter graph stored with an older input layout is
not used (its LoRA and IA3 rows run on torch, ``describe`` says why) until the next export rebuilds it.
Anything a graph cannot express (partial and full fine-tunes, LoRA/IA3 on modules or sides the graph
does not take, IA3 on a graph stored before IA3 joined it, images or audio with LoRA/IA3) runs on the
torch backbone, so every row is still answered; ``fallbacks`` counts those passes by reason.
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
    slots: Any | None = None  # serving.onnx_backbone.LoraSlots: resident LoRA/IA3 inputs of that graph
    lora_skipped: str | None = None  # why a stored adapter graph is not used (e.g. an older layout)
    calls: int = 0  # backbone passes served by ORT (the rest ran on torch)
    fallbacks: dict[str, int] = field(default_factory=dict)  # passes sent to torch, by reason

    def describe(self) -> str:
        """What runs where, for the start log."""
        text = f"onnxruntime ({self.plain.record.variant} graph) for head and bare-base rows"
        if self.lora is None:
            why = self.lora_skipped or "no adapter graph stored"
            return text + f"; {why}, so batches with LoRA or IA3 rows run on torch"
        spec = self.lora.record.lora
        ia3 = [*spec.ia3_in, *spec.ia3_out]
        return (
            text
            + f", LoRA on {', '.join(spec.targets)}"
            + (f", IA3 on {', '.join(ia3)}" if ia3 else " (graph without IA3: IA3 rows on torch)")
            + "; partial and full fine-tunes on torch"
        )

    def _fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    @staticmethod
    def exported(store: Any, base: Any) -> bool:
        """True when ``loraplex onnx export`` stored the base's plain fp32 graph (what 'auto' needs)."""
        return store.has_artifact(base.name, base.fingerprint, FP32_MANIFEST)

    @classmethod
    def load(cls, store: Any, base: Any, runtime: str, threads: int, lora_slots: int = 64) -> OrtRuntime:
        from serving.onnx_adapters import LoraSlots
        from serving.onnx_backbone import OrtBackbone

        plain = OrtBackbone.from_store(store, base, "int8" if runtime == "onnx-int8" else "fp32", threads)
        lora = slots = skipped = None
        if store.has_artifact(base.name, base.fingerprint, LORA_MANIFEST):
            try:
                lora = OrtBackbone.from_store(store, base, "lora-fp32", threads)
            except UnsupportedAdapter as e:  # an older input layout: serve on torch until re-exported
                skipped = str(e)
            else:
                slots = LoraSlots(lora.record, capacity=lora_slots)
        return cls(plain, lora, slots, lora_skipped=skipped)

    def try_pass(self, plan: Any, adapters: list, inputs: dict) -> tuple[Any, Any] | None:
        """(hidden, pooled) from ORT, or None when this batch needs the torch backbone."""
        kinds = {a.kind for a in adapters}
        if kinds <= {"head"}:
            self.calls += 1
            return self.plain.hidden_and_pooler(inputs)
        other = sorted(kinds - {"head", "lora", "ia3"})
        if other or self.lora is None or "input_ids" not in inputs:
            reason = "outdated adapter graph" if self.lora_skipped else "no adapter graph"
            self._fallback(f"kind {other[0]}" if other else reason)
            return None
        try:
            out = self._lora_pass(plan, adapters, inputs)
        except UnsupportedAdapter:
            self._fallback("adapter outside the graph")  # e.g. LoRA on a module the graph does not take
            return None
        self.calls += 1
        return out

    def _lora_pass(self, plan: Any, adapters: list, inputs: dict) -> tuple[Any, Any]:
        from serving.onnx_adapters import LoraWeights

        # Keyed by content digest: a resident adapter is never packed again, a new version always is.
        by_digest = {a.digest: a for a in adapters if _adapts_backbone(a)}

        def load(digest: str) -> Any:
            a = by_digest[digest]
            return LoraWeights.from_paths(a.lora, a.ia3_in, a.ia3_out)

        stack, slots = self.slots.assign(list(by_digest), load)
        slot_of = dict(zip(by_digest, slots, strict=True))
        # Plan slot -> graph slot; the bare base (BASE_SLOT, -1) and head-only adapters get the identity slot.
        graph_slot = {s: slot_of[a.digest] for s, a in enumerate(adapters) if a.digest in slot_of}
        index = np.array([graph_slot.get(s, stack.no_adapter_slot) for s in plan.slot_of_position()])
        return self.lora.hidden_and_pooler(inputs, stack, index)


def _adapts_backbone(adapter: Any) -> bool:
    return bool(adapter.lora or adapter.ia3_in or adapter.ia3_out)
