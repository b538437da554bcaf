"""Fixed probe inputs the exports are validated on: seeded random shapes plus a real-text probe set.

The shape probes cover batch 1..32 and short to long sequences with ragged padding; the text probe
set (real sentences, short and ~128-token) is what the int8 cosine gate is measured on, because
quantization error depends on realistic activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.onnx_export.specs import ArchitectureSpec

Feed = dict[str, np.ndarray]
_SEED = 1234

PROBE_SENTENCES: tuple[str, ...] = (
    "How do I reset my password?",
    "The invoice for March is missing a line item.",
    "I want to cancel my subscription today.",
    "Shipping took three weeks and the box arrived damaged.",
    "Can you recommend a good Italian restaurant nearby?",
    "Error 504 when uploading files larger than two gigabytes.",
    "My card was charged twice for the same order.",
    "What are your opening hours on public holidays?",
    "The new release fixed the memory leak in the scheduler.",
    "Please move my appointment to next Thursday afternoon.",
    "Is the stadium reachable by train from the city centre?",
    "The soup was cold but the service was friendly.",
    "Our team needs admin rights on the staging cluster.",
    "Refund requests take five to seven business days.",
    "The patient reported mild headaches after the second dose.",
    "Quarterly revenue grew by twelve percent year over year.",
    "Thanks, that solved it!",
    "no",
    "Where is my parcel? Tracking has not updated since Monday.",
    "Could you explain the difference between the two plans?",
    "The printer on the third floor keeps jamming.",
    "I love the new dark mode, great work.",
    "Warranty does not cover water damage, unfortunately.",
    "Which documents do I need to open a business account?",
    "The train was delayed by forty minutes because of signal failure.",
    "Set the thermostat to twenty-one degrees at night.",
    "A short poem about autumn leaves and quiet rivers.",
    "Login fails with 'invalid token' on the mobile app only.",
    "We are planning a team offsite in the mountains in June.",
    "The contract renewal date is the first of next month.",
    "Can I pay in instalments without extra fees?",
    "Bonjour, je voudrais changer mon adresse de livraison.",
)


def shape_probes(spec: ArchitectureSpec, config: Any) -> list[Feed]:
    """Seeded random inputs at the spec's batch sizes (and, for text, short and long sequences)."""
    rng = np.random.default_rng(_SEED)
    if spec.modality == "image":
        return [_image_feed(rng, config, b) for b in spec.probe_batches]
    max_len = int(getattr(config, "max_position_embeddings", 512))
    pairs = [(b, min(s, max_len)) for b in spec.probe_batches for s in spec.probe_seq_lens]
    return [_text_feed(rng, config, b, s) for b, s in pairs if b * s <= spec.probe_max_tokens]


def _text_feed(rng: np.random.Generator, config: Any, batch: int, seq: int) -> Feed:
    vocab = int(config.vocab_size)
    ids = rng.integers(min(1000, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # at least one row spans the whole sequence
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    pad = int(getattr(config, "pad_token_id", 0) or 0)
    return {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask}


def _image_feed(rng: np.random.Generator, config: Any, batch: int) -> Feed:
    size = int(config.image_size)
    pixels = rng.standard_normal((batch, int(config.num_channels), size, size)).astype(np.float32)
    return {"pixel_values": pixels}


def text_probe_set(folder: str | Path, config: Any) -> list[Feed]:
    """The fixed real-text probes: 32 short sentences, and 8 texts of about 128 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    max_len = min(128, int(getattr(config, "max_position_embeddings", 512)))
    long_texts = [" ".join(PROBE_SENTENCES[i:] + PROBE_SENTENCES[:i]) for i in range(0, 32, 4)]
    feeds = []
    for texts in (list(PROBE_SENTENCES), long_texts):
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
        feeds.append(
            {
                "input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64),
            }
        )
    return feeds


def quality_probes(spec: ArchitectureSpec, folder: str | Path, config: Any) -> list[Feed]:
    """Probes for the int8 gate: real text where a tokenizer ships with the base, else seeded images."""
    if spec.modality == "text":
        return text_probe_set(folder, config)
    rng = np.random.default_rng(_SEED + 1)
    return [_image_feed(rng, config, 32)]
