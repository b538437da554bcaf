"""How a row is prepared for ONE bundle: the single rule training records and serving reads.

A text bundle is served with the token length it was trained and validated with, so the manifest's
metrics describe what is served. Training writes ``manifest.max_seq_len``; the engine tokenises each
row with :func:`text_length` of its bundle. Bundles that record no length (a pushed PEFT folder, an
HTTP upload) and bare-base rows get the server's default. The server's limit (``LORAPLEX_MAX_TOKENS``)
and the base's position table stay hard caps: a bundle trained longer than the cap is served truncated
at the cap. Images and audio have no per-bundle option: they are prepared by the base's processor
alone (and never truncated), on both sides.

Kept free of torch and transformers, so both packages (and a later base-model table) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_TEXT_LENGTH, MAX_TEXT_LENGTH = 4, 8192  # the bounds TrainConfig.max_seq_len enforces


@dataclass(frozen=True)
class RowPreparation:
    """What one bundle asks of its rows. ``max_seq_len``: tokens kept per text (None: not recorded)."""

    max_seq_len: int | None = None

    @classmethod
    def of(cls, manifest: Any) -> RowPreparation:
        """The bundle's recorded preparation. Bundles trained before ``max_seq_len`` was a manifest
        field carry it only in ``metadata.train_config``; they are served the way they were trained too."""
        recorded = getattr(manifest, "max_seq_len", None)
        if recorded is None:
            config = (getattr(manifest, "metadata", None) or {}).get("train_config")
            legacy = config.get("max_seq_len") if isinstance(config, dict) else None
            recorded = legacy if _valid_length(legacy) else None
        return cls(max_seq_len=recorded)

    def text_length(self, limit: int) -> int:
        """Tokens a text row of this bundle keeps: the recorded length, else ``limit`` (the server's
        token limit), never past ``limit``."""
        return limit if self.max_seq_len is None else min(self.max_seq_len, limit)


def _valid_length(value: Any) -> bool:
    return type(value) is int and MIN_TEXT_LENGTH <= value <= MAX_TEXT_LENGTH
