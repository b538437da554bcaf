"""What every learner hands back for the bundle: file bytes and the manifest fields they imply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Exported:
    """Bundle files (name -> bytes) plus manifest fields such as ``kind``, ``pooling``, ``head``."""

    files: dict[str, bytes]
    manifest_fields: dict[str, Any] = field(default_factory=dict)
