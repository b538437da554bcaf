"""Multi-tenant inference engine: one shared backbone, every tenant's adapter in one batched forward.

Public API: :class:`Engine`, :class:`EngineSettings`, :class:`InferenceItem`, :class:`InferenceResult`.
"""

from serving.engine.engine import Engine
from serving.engine.items import InferenceItem, InferenceResult
from serving.engine.settings import EngineSettings

__all__ = ["Engine", "EngineSettings", "InferenceItem", "InferenceResult"]
