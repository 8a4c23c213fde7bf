"""Model implementations (our own decoders over the paged KV cache) and their registry."""

from shared.engine.models.registry import (
    UnsupportedModelError,
    register_architecture,
    resolve_model_class,
    supported_architectures,
)

__all__ = ["UnsupportedModelError", "register_architecture", "resolve_model_class", "supported_architectures"]
