"""Llama / Qwen2 decoder over a flat token batch with a paged KV cache.

Differences from the HF modules are layout only: q/k/v and gate/up projections are fused
(concatenated at load time), and the forward takes a flat `[T]` batch of tokens from many
sequences plus `AttentionMetadata` instead of padded `[B, L]` tensors. Qwen2 = Llama with
q/k/v biases (and usually tied embeddings).

Positions: `forward` only turns `positions` into per-token `(cos, sin)` via `self.rotary`.
For M-RoPE (Qwen2-VL), positions become `[3, T]` and a subclass swaps `self.rotary` for one
that builds `[T, head_dim]` cos/sin from the three position rows by section; nothing else in
the model or the attention metadata depends on `positions` (masks and slots use sequence
offsets, not positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.attention import AttentionMetadata, paged_attention

# HF projection name -> (our fused module, shard index, number of shards)
_STACKED = {
    "q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
    "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2),
}


class RotaryEmbedding:
    """cos/sin table per position, from the HF config's rope parameters, so every rope type
    (default, linear, dynamic, yarn, llama3, longrope) matches transformers exactly.

    Stored as cos `[max_len, hd]` and a sign-folded sin `[max_len, hd]` (first half negated)
    so that `rotate_half(x) * sin == x.roll(hd/2, -1) * sin_folded`.
    Dynamic NTK equals the default table up to max_position_embeddings, which bounds our
    max_model_len; longrope uses its short factors (positions below the original length)."""

    def __init__(self, hf_config, max_len: int, dtype: torch.dtype, device: torch.device):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type") or (getattr(hf_config, "rope_scaling", None) or {}).get(
            "rope_type", "default")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        if inv_freq.numel() * 2 != head_dim:
            raise NotImplementedError("partial rotary embeddings are not supported")
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq.float()  # [L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        half = head_dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin = sin.to(device=device, dtype=dtype)
        self.half = half

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]` -> cos, sin `[T, 1, hd]` (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[T, heads, hd]` -> rotated x (same shape)."""
        return x * cos + x.roll(self.half, dims=-1) * sin


class Linear(nn.Linear):
    """nn.Linear with a GEMV path: one row in a reduced dtype (bf16/fp16) goes through
    `torch.mv`, ~1.2-1.4x faster than the GEMM kernel at M = 1 on AVX-512 BF16 CPUs.
    float32 always takes F.linear (the exactness oracle uses the same kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.dim() == 2 and x.dtype != torch.float32:
            out = torch.mv(self.weight, x[0]).unsqueeze(0)  # [1, N]
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype); the fused op is
        # bit-identical in float32, other dtypes keep HF's rounding before the weight.
        if x.dtype == torch.float32:
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * torch.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool):
        super().__init__()
        self.n_h, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_h
        self.scale = self.hd ** -0.5
        bias = getattr(cfg, "attention_bias", False)
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_h + 2 * self.n_kv) * self.hd, bias=qkv_bias or bias)
        self.o_proj = Linear(self.n_h * self.hd, cfg.hidden_size, bias=bias)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the runner

    def forward(self, h: torch.Tensor, rotary: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = h.shape[0]
        qkv = self.qkv_proj(h)  # [T, (n_h + 2 n_kv) * hd]
        split = (self.n_h + self.n_kv) * self.hd
        qk = rotary.apply(qkv[:, :split].view(t, self.n_h + self.n_kv, self.hd), cos, sin)
        q, k = qk[:, :self.n_h], qk[:, self.n_h:]  # [T, n_h, hd], [T, n_kv, hd]
        v = qkv[:, split:].view(t, self.n_kv, self.hd)  # [T, n_kv, hd]
        o = paged_attention(q, k, v, self.kv_cache, meta, self.scale)  # [T, n_h, hd]
        return self.o_proj(o.reshape(t, self.n_h * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(h)  # [T, 2I]
        return self.down_proj(F.silu(gu[:, :self.inter]).mul_(gu[:, self.inter:]))  # [T, I] -> [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h, rotary, cos, sin, meta):
        h = h + self.self_attn(self.input_layernorm(h), rotary, cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg, qkv_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, qkv_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Model contract (what loader / model runner rely on; multimodal models follow it too):
    `init_runtime(max_len, dtype, device)`, `bind_kv_cache(layers)`, `embed_tokens(ids)`,
    `forward(input_ids, positions, meta, inputs_embeds=None)`, `compute_logits(hidden)`,
    `map_weight_name(hf_name)`, and the KV geometry attributes below."""

    qkv_bias = False

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.qkv_bias)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.rotary: RotaryEmbedding | None = None

    @classmethod
    def map_weight_name(cls, name: str, tied: bool) -> tuple[str, int, int] | None:
        """HF checkpoint name -> (our parameter name, shard index, shard count), None = skip."""
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _STACKED:
            fused, idx, count = _STACKED[parts[-2]]
            return ".".join(parts[:-2] + [fused, parts[-1]]), idx, count
        return name, 0, 1

    def init_runtime(self, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """After weights are loaded: tie embeddings, build the RoPE table on `device`."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(self.config, max_len, dtype, device)

    def bind_kv_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, cache in zip(self.model.layers, layers, strict=True):
            layer.self_attn.kv_cache = cache

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [T, hidden]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids `[T]`, positions `[T]` -> final-normed hidden states `[T, hidden]`.
        Writes each token's K/V into the bound cache at `meta.slot_mapping`."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(positions)  # [T, 1, hd]
        for layer in self.model.layers:
            h = layer(h, self.rotary, cos, sin, meta)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[R, hidden]` -> logits `[R, vocab]` float32 (lm_head may be quantized)."""
        return self.lm_head(hidden).float()


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
