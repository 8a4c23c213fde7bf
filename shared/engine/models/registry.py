"""HF `architectures[0]` -> our model class.

A model class follows the contract documented on `LlamaForCausalLM` (flat-batch forward,
paged KV cache binding, `map_weight_name` for checkpoint names, KV geometry attributes).

Multimodal models wrap a language model built from `config.text_config` and add
`encode_images(pixel_values, **processor_outputs) -> list of [n_tokens_i, hidden]` and
`image_token_id`. LLaVA (`models/llava.py`) is the first. Qwen2-VL / Qwen2.5-VL slot in as:

  - vision: a dynamic-resolution tower fed the processor's flattened patches plus
    `image_grid_thw`; it returns one tensor per image whose length (t * h * w / merge**2)
    varies per image. The engine's image path (`multimodal.py`) already takes every length
    from the returned tensors, so `<|image_pad|>` expansion and MMInput ranges need nothing new.
  - positions: M-RoPE needs `[3, T]` positions (temporal, height, width) instead of `[T]`.
    The model gets a `positions(seq, start, end)` hook that the runner calls when present
    (a sequence's rope deltas are computed once from its MMInput ranges and grids and kept
    with its mm inputs); the text model swaps `self.rotary` for a sectioned M-RoPE table
    (see `models/llama.py`). Masks, slots and the KV cache never read positions.
  - decode positions continue from the last M-RoPE position + 1 (the stored rope delta),
    not from the token index, so the hook covers decode steps too.
  - weights: `model.visual.*` -> vision tower, `model.language_model.*` / `lm_head.*` -> text.
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
    "LlavaForConditionalGeneration": "shared.engine.models.llava:LlavaForConditionalGeneration",
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
