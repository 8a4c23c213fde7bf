"""The in-process inference engine: model code, paged KV cache, scheduler, sampler.

Import the engine lazily from here (`from shared.engine import LLMEngine`) or from its module;
importing `shared.engine` alone stays cheap (no torch).
"""

from __future__ import annotations

_LAZY = {
    "EngineConfig": "shared.engine.config",
    "LLMEngine": "shared.engine.engine",
    "RequestOutput": "shared.engine.outputs",
    "KVExport": "shared.engine.kv_handoff",
    "ImageFeatures": "shared.engine.multimodal",
    "MMInput": "shared.engine.sequence",
    "SamplingParams": "shared.engine.sampling_params",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shared.engine' has no attribute {name!r}")
