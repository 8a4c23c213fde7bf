"""HF `architectures[0]` -> our model class.

A model class follows the contract documented on `LlamaForCausalLM` (flat-batch forward,
paged KV cache binding, `map_weight_name` for checkpoint names, KV geometry attributes).
Multimodal models register here too: their class wraps a language model built from
`config.text_config` and adds the vision tower; see the commented entries.
"""

from __future__ import annotations

import importlib

from shared.engine.errors import InvalidRequestError


class UnsupportedModelError(InvalidRequestError):
    """The model folder names an architecture this engine has no implementation for."""

    code = "unsupported_model"


_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "shared.engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "shared.engine.models.llama:Qwen2ForCausalLM",
    # "LlavaForConditionalGeneration": "shared.engine.models.llava:LlavaForConditionalGeneration",
    # "Qwen2VLForConditionalGeneration": "shared.engine.models.qwen2_vl:Qwen2VLForConditionalGeneration",
}


def register_architecture(name: str, target: str) -> None:
    """Add (or replace) an architecture: `target` is "module.path:ClassName"."""
    _ARCHITECTURES[name] = target


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def resolve_model_class(hf_config) -> type:
    """The class for `hf_config.architectures[0]`; UnsupportedModelError names unknown ones."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise UnsupportedModelError("config.json has no 'architectures' entry", param="model")
    target = _ARCHITECTURES.get(archs[0])
    if target is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs[0]!r} (supported: {', '.join(supported_architectures())})",
            param="model")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
