"""The ONE shared backbone: loading it from a registered base folder, wrapping it, and feeding it.

Every ``nn.Linear`` is wrapped by :class:`MultiTenantLinear` (LoRA/IA3 per row) and every encoder
block by :class:`LayerSwitch` (partial fine-tunes). Tenants never get their own copy of it; only the
``full`` kind builds a dedicated model (see :func:`build_full_model`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_store import model_families
from adapters_store.base_models import BaseModelEntry, resolve_source
from adapters_store.errors import LoraplexError, ServiceUnavailable, ValidationError
from adapters_store.model_families import Modality, pool_features, run_backbone
from serving.engine.lora_layers import LayerSwitch, MultiTenantLinear, wrap_layers, wrap_linears


@dataclass
class Backbone:
    """The loaded base model and what adapters are validated against."""

    entry: BaseModelEntry
    model: nn.Module
    modality: Modality
    preprocessor: Any  # tokenizer (text); image processor (image) or feature extractor (audio), or None
    linears: dict[str, MultiTenantLinear]  # module path (as in the base's weight names) -> wrapper
    layers: list[LayerSwitch]  # encoder blocks; [] when the architecture has none to switch
    layer_factory: Callable[[int], nn.Module] | None
    feature_dim: int
    layer_prefix: str = "encoder.layer."  # in-memory path of block N is f"{layer_prefix}{N}"
    to_memory: Callable[[str], str] = str  # checkpoint weight name -> in-memory name
    # A fast tokenizer is not safe to call from two threads at once (each call sets its truncation and
    # padding); a full fine-tune's pass prepares its rows while a shared batch may be preparing its own.
    preprocess_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def prefix(self) -> str:
        """The task-model prefix of weight names (``bert.``), stripped from adapter keys."""
        return f"{self.entry.model_type}."

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sampling_rate(self) -> int:
        """Audio bases: the rate waveforms must be given at (the feature extractor's, else 16 kHz)."""
        return int(getattr(self.preprocessor, "sampling_rate", 16000))


def load_backbone(entry: BaseModelEntry) -> Backbone:
    """Load the base's HF folder once, in eval mode, and wrap it for mixed batches."""
    from transformers import AutoConfig, AutoModel

    try:
        folder = resolve_source(entry)
    except LoraplexError as e:
        raise ServiceUnavailable(e.message) from None
    config = AutoConfig.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, config=config).eval()
    modality = model_families.family(config).modality  # the table training reads too
    layer_prefix, encoder_layers = _encoder_layers(model)
    factory = _layer_factory(type(encoder_layers[0]), model.config) if encoder_layers is not None else None
    linears = wrap_linears(model)  # before wrap_layers, so paths stay the base's weight names
    layers = wrap_layers(encoder_layers) if encoder_layers is not None else []
    return Backbone(
        entry=entry,
        model=model,
        modality=modality,
        preprocessor=_preprocessor(folder, modality),
        linears=linears,
        layers=layers,
        layer_factory=factory,
        feature_dim=model_families.feature_dim(config),
        layer_prefix=layer_prefix,
        to_memory=checkpoint_to_memory(model),
    )


def _encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    """(in-memory path prefix, blocks): BERT keeps ``encoder.layer``; transformers 5 ViT has ``layers``;
    Wav2Vec2 has ``encoder.layers`` (training fine-tunes its top blocks too)."""
    encoder = getattr(model, "encoder", None)
    for prefix, layers in (("encoder.layer.", getattr(encoder, "layer", None)),
                           ("layers.", getattr(model, "layers", None)),
                           ("encoder.layers.", getattr(encoder, "layers", None))):  # fmt: skip
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return prefix, layers
    return "encoder.layer.", None


def checkpoint_to_memory(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint weight name -> the model's in-memory name. Bundles hold checkpoint names (what the
    registry validates against), but transformers 5 renames some modules at load and back on save (ViT:
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``). The renamings are
    the ones ``from_pretrained`` applies; a fusing converter (none for the bases served here) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return str

    def rename(key: str) -> str:
        new, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            raise ValidationError(f"weight {key!r} is stored fused in memory; this engine cannot serve it")
        return new

    return rename


def _layer_factory(cls: type[nn.Module], config: Any) -> Callable[[int], nn.Module]:
    takes_idx = "layer_idx" in inspect.signature(cls.__init__).parameters

    def make(index: int) -> nn.Module:
        return (cls(config, layer_idx=index) if takes_idx else cls(config)).eval()

    return make


def _preprocessor(folder: Path, modality: Modality) -> Any:
    if modality == "audio":
        from transformers import AutoFeatureExtractor

        try:
            return AutoFeatureExtractor.from_pretrained(folder)
        except (OSError, ValueError):
            return None
    if modality == "text":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder)
    return None


def build_full_model(backbone: Backbone, state: dict[str, torch.Tensor]) -> nn.Module:
    """A dedicated, unwrapped copy of the base architecture holding a full fine-tune's weights."""
    from transformers import AutoModel

    # Built on the meta device and handed the tenant's tensors as its parameters: no random init of a
    # whole backbone and no second copy of its ~90 MB, CPU that a cold load would take from the warm
    # tenants' batches running meanwhile.
    with torch.device("meta"):
        model = AutoModel.from_config(backbone.model.config)
    state = {backbone.to_memory(k): t for k, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValidationError(
            f"full fine-tune does not match the base: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    base_buffers = dict(backbone.model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # constant buffers (position ids...) are the base's: copy them from it
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            persistent = leaf not in module._non_persistent_buffers_set
            module.register_buffer(leaf, base_buffers[name].clone(), persistent=persistent)
    return model.eval()


def encode_texts(
    backbone: Backbone, texts: Sequence[str], lengths: int | Sequence[int]
) -> dict[str, torch.Tensor]:
    """Tokenise each text truncated to its own length (its bundle's, see adapters_store/preparation.py),
    never past the base's position table, and pad the batch to its longest row."""
    limit = max_positions(backbone)
    sizes = [lengths] * len(texts) if isinstance(lengths, int) else list(lengths)
    sizes = [min(n, limit) for n in sizes]
    tok = backbone.preprocessor
    if len(set(sizes)) <= 1:  # the common case: one call, as fast as before
        n = sizes[0] if sizes else limit
        return tok(list(texts), padding=True, truncation=True, max_length=n, return_tensors="pt")
    rows: list[dict[str, Any]] = [{}] * len(texts)
    for n in sorted(set(sizes)):
        idx = [i for i, m in enumerate(sizes) if m == n]
        enc = tok([texts[i] for i in idx], truncation=True, max_length=n)
        for j, i in enumerate(idx):
            rows[i] = {key: values[j] for key, values in enc.items()}
    return tok.pad(rows, padding=True, return_tensors="pt")


def max_positions(backbone: Backbone) -> int:
    """Tokens a row may have: the base's position embeddings (RoBERTa-style models reserve 2)."""
    return model_families.token_limit(backbone.model.config)


def encode_images(backbone: Backbone, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """HWC uint8 images -> ``pixel_values``; with no image processor, ImageNet normalisation, no resize."""
    if backbone.preprocessor is not None:
        return {
            "pixel_values": backbone.preprocessor(images=list(images), return_tensors="pt")["pixel_values"]
        }
    return {"pixel_values": torch.from_numpy(model_families.normalize_pixels(images))}


def encode_audio(backbone: Backbone, waves: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Waveforms -> ``input_values``, exactly as training prepares them (adapters_store.model_families).
    No attention mask, so the engine only batches waveforms of one length together (padding would
    change the mean)."""
    return model_families.audio_inputs(backbone.preprocessor, waves, backbone.sampling_rate)


def run_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last hidden state, pooler output or None) of an HF base model (CLIP: its image tower)."""
    return run_backbone(model, inputs)


def pool(
    hidden: torch.Tensor, mask: torch.Tensor | None, pooler: torch.Tensor | None, how: str
) -> torch.Tensor:
    """Reduce per-token (or per-pixel) features to one vector per row, as training did."""
    return pool_features(hidden, mask, pooler, how)
