"""LLaVA: a transformers vision tower and projector in front of our paged Llama / Qwen2 decoder.

    pixel_values [N, 3, H, W] -> vision tower (CLIP / SigLIP, transformers)
        -> hidden_states[vision_feature_layer]      int, or list of ints -> concatenated features
        -> "default" drops the CLS row, "full" keeps it
        -> projector (linear, act, linear)          -> N x [tokens_per_image, text_hidden]

Those per-image rows become `MMInput.embeds`; the model runner writes them into
`inputs_embeds` at the image's placeholder positions. The text half keeps the LlamaForCausalLM
contract (forward / embed_tokens / compute_logits / bind_kv_cache delegate to it), so the
scheduler, runner and KV cache see a plain decoder. Nothing here assumes one token count per
image: `encode_images` returns one tensor per image and callers use each tensor's length.

Checkpoint layouts (both load; the generic loader calls `map_weight_name`):

    legacy (llava-hf 1.5, make_tiny)        transformers >= 4.52          -> ours
    language_model.model.X                  model.language_model.X        -> language_model.model.X
    language_model.lm_head.weight           lm_head.weight                -> language_model.lm_head.weight
    vision_tower[.vision_model].X           model.vision_tower[...].X     -> vision_tower.X
    multi_modal_projector.X                 model.multi_modal_projector.X -> multi_modal_projector.X
"""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import torch
from torch import nn

from shared.engine.models.llama import LlamaForCausalLM
from shared.engine.models.registry import resolve_model_class

# checkpoint prefix -> our prefix; first match wins (longer prefixes first)
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
_TEXT_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_STRATEGIES = ("default", "full")
_META_LOCK = threading.Lock()


@contextlib.contextmanager
def _params_on_meta():
    """Parameters registered inside go to the meta device; buffers (position ids) stay real.
    The loader assigns every parameter afterwards, so nothing is allocated twice."""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    with _META_LOCK:
        nn.Module.register_parameter = to_meta
        try:
            yield
        finally:
            nn.Module.register_parameter = register


def text_model_class(text_config) -> type:
    """Our decoder class for a multimodal config's `text_config` (registry lookup)."""
    archs = list(getattr(text_config, "architectures", None) or [])
    if not archs and getattr(text_config, "model_type", None) in _TEXT_ARCH_BY_TYPE:
        archs = [_TEXT_ARCH_BY_TYPE[text_config.model_type]]
    return resolve_model_class(SimpleNamespace(architectures=archs))


class LlavaForConditionalGeneration(nn.Module):
    """Model contract of LlamaForCausalLM plus `encode_images` and `image_token_id`.

    `tie_word_embeddings` mirrors the text config so the loader passes it to map_weight_name;
    a tied lm_head is no checkpoint tensor (its weight is None until init_runtime ties it)."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = cfg
        text_cfg = cfg.text_config
        self.language_model = lm = text_model_class(text_cfg)(text_cfg)
        self.tie_word_embeddings = lm.tie_word_embeddings
        if lm.tie_word_embeddings:
            lm.lm_head.weight = None
        with torch.device("cpu"), _params_on_meta():
            self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.feature_layer = cfg.vision_feature_layer  # int or list[int], as transformers
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        self._feature_layers = layers
        self.select_strategy = cfg.vision_feature_select_strategy
        if self.select_strategy not in _STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy: {self.select_strategy!r} is not one of "
                             f"{_STRATEGIES}")
        self.image_token_id: int = int(cfg.image_token_id)
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.hidden_size, self.vocab_size = lm.hidden_size, lm.vocab_size
        self.dtype, self.device = torch.float32, torch.device("cpu")

    @classmethod
    def map_weight_name(cls, name: str, tied: bool) -> tuple[str, int, int] | None:
        """Checkpoint name (either layout above) -> (our name, shard index, shard count) or None.
        Text names go through the Llama mapping (q/k/v and gate/up fusion)."""
        src, dst = next(((s, d) for s, d in _PREFIXES if name.startswith(s)), ("", ""))
        if not dst:
            return name, 0, 1  # unknown: the loader reports it as unexpected
        rest = name[len(src):]
        if dst.startswith("vision_tower.") and rest.endswith("position_ids"):
            return None  # a buffer some old CLIP checkpoints saved
        if not dst.startswith("language_model."):
            return dst + rest, 0, 1
        mapped = LlamaForCausalLM.map_weight_name(dst[len("language_model."):] + rest, tied)
        return None if mapped is None else ("language_model." + mapped[0], mapped[1], mapped[2])

    def init_runtime(self, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """After weights are loaded: text runtime (tie, RoPE) and the tower's buffers on `device`."""
        self.language_model.init_runtime(max_len, dtype, device)
        self.vision_tower.to(device)  # parameters are there already; moves the buffers
        self.dtype, self.device = dtype, device

    # --- vision ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values `[N, 3, H, W]` -> N tensors `[tokens_per_image, hidden]` in the model's
        dtype and device (exactly transformers' `get_image_features`)."""
        out = self.vision_tower(pixel_values.to(self.device, self.dtype),
                                output_hidden_states=self.feature_layer, return_dict=True)
        feats = [out.hidden_states[i] for i in self._feature_layers]  # each [N, 1 + patches, vh]
        if self.select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)  # [N, tok, vh * layers]
        return list(self.multi_modal_projector(feats).unbind(0))  # N x [tok, hidden]

    # --- text: the LlamaForCausalLM contract --------------------------------------------
    def bind_kv_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.language_model.bind_kv_cache(layers)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)  # [T, hidden]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
