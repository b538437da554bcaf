"""Fixed probe inputs the exports are validated on: seeded random shapes plus a real-text probe set.

The shape probes cover batch 1..32 and short to long sequences with ragged padding; the text probe
set (real sentences, short and ~128-token) is what the int8 cosine gate is measured on, because
quantization error depends on realistic activations. The int8 export calibrates its activation
rescaling on a second, disjoint set (``CALIBRATION_SENTENCES``), so the gate never grades the texts the
scales were fitted to.
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


CALIBRATION_SENTENCES: tuple[str, ...] = (
    "Where can I download last year's tax statement?",
    "The elevator in building B has been out of order since Friday.",
    "Please add two more seats to the booking for Saturday.",
    "Our nightly backup job failed with a timeout again.",
    "The hiking trail was muddy, but the view from the top was worth it.",
    "How long does it take to get a replacement card?",
    "The dashboard shows the wrong currency for European customers.",
    "I would like to upgrade to the premium plan.",
    "Symptoms improved within three days of starting the treatment.",
    "Sales dropped slightly in the northern region this quarter.",
    "Is breakfast included in the room rate?",
    "yes please",
    "The API returns 429 errors during the morning peak.",
    "My order number is 58213 and it still shows as pending.",
    "The museum is closed on Mondays except in August.",
    "Can someone review the pull request before the release?",
    "The cake recipe needs less sugar than the package suggests.",
    "Our flight was cancelled and nobody told us why.",
    "Please send the signed contract back by Wednesday.",
    "The battery drains quickly after the latest update.",
    "What is the maximum weight for checked luggage?",
    "The lecture on climate models was surprisingly accessible.",
    "Two of the five servers report high disk latency.",
    "I forgot my username, can you help?",
    "The kids loved the aquarium, especially the sharks.",
    "Interest rates are expected to stay flat until spring.",
    "Guten Tag, ich habe eine Frage zu meiner Rechnung.",
    "The form rejects postcodes that start with a zero.",
    "Volunteers cleaned the beach on Sunday morning.",
    "Do you ship to Canada, and how much does it cost?",
    "The meeting notes are attached; action items are at the end.",
    "Great support, the issue was fixed in ten minutes.",
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


def text_probe_set(
    folder: str | Path, config: Any, sentences: tuple[str, ...] = PROBE_SENTENCES
) -> list[Feed]:
    """The fixed real-text probes: 32 short sentences, and 8 texts of about 128 tokens made of them
    (``sentences``: the probe set by default, or ``CALIBRATION_SENTENCES``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    max_len = min(128, int(getattr(config, "max_position_embeddings", 512)))
    n = len(sentences)
    long_texts = [" ".join(sentences[i:] + sentences[:i]) for i in range(0, n, max(1, n // 8))]
    feeds = []
    for texts in (list(sentences), long_texts):
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
