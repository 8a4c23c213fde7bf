"""Paged attention over a flat token batch (KV cache layout: see kv_cache.py).

The flat batch is `[T]` tokens: first `num_decodes` rows are 1-token queries (decodes, or a
1-token prefill chunk), then one contiguous segment per multi-token prefill chunk. Metadata is
built once per step by the model runner and reused by every layer:

  write_rows    [T * n_kv]        cache row of (token t, kv head h), t-major: where new K/V go
  decode_tiles  [B * n_kv * nb]   head-block tiles of each decode row's context, (b, h, j)
                                  order, padded with tile 0 -> K as [B, n_kv, nb * bs, hd]
  decode_bias   [B, 1, 1, nb*bs]  0 for positions <= the query's, -inf beyond (model dtype)
  prefills      per segment: row start, q_len, context tiles [n_kv * nb] and length (None
                when the chunk starts at position 0), causal bool mask [q_len, ctx] or None

Decode attention is batched matmuls grouped by KV head (SDPA with one query is slow on CPU);
the tile gather yields K/V directly in the layout bmm wants, so no per-layer copies beyond it.
Prefill attention is SDPA per segment, GQA via `enable_gqa`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    start: int
    q_len: int
    ctx_tiles: torch.Tensor | None = None  # [n_kv * nb] long; None: context == this chunk
    ctx_len: int = 0
    mask: torch.Tensor | None = None       # [q_len, ctx_len] bool, True = attend; None: causal


@dataclass
class AttentionMetadata:
    write_rows: torch.Tensor                  # [T * n_kv] long
    num_decodes: int = 0
    decode_tiles: torch.Tensor | None = None  # [B * n_kv * nb] long
    decode_bias: torch.Tensor | None = None   # [B, 1, 1, nb * bs]
    prefills: list[PrefillSegment] = field(default_factory=list)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q `[T, n_h, hd]`, k/v `[T, n_kv, hd]` (RoPE applied) -> `[T, n_h, hd]`.

    Mutates the cache (`[num_blocks, n_kv, bs, hd]` each): writes k/v first, so every query
    sees its own token's key."""
    k_cache, v_cache = cache
    _, n_kv, bs, hd = k_cache.shape
    k_cache.view(-1, hd).index_copy_(0, meta.write_rows, k.reshape(-1, hd))
    v_cache.view(-1, hd).index_copy_(0, meta.write_rows, v.reshape(-1, hd))
    k_tiles, v_tiles = k_cache.view(-1, bs, hd), v_cache.view(-1, bs, hd)  # [nb * n_kv, bs, hd]
    nd = meta.num_decodes
    if not meta.prefills:
        return _decode(q, k_tiles, v_tiles, meta, scale, n_kv)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], k_tiles, v_tiles, meta, scale, n_kv)
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.q_len)
        if seg.ctx_tiles is None:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [n_kv, q, hd]
        else:  # [n_kv, ctx, hd]
            ks = k_tiles.index_select(0, seg.ctx_tiles).view(n_kv, -1, hd)[:, :seg.ctx_len]
            vs = v_tiles.index_select(0, seg.ctx_tiles).view(n_kv, -1, hd)[:, :seg.ctx_len]
        if seg.mask is None and q.dtype != torch.float32:
            # 3-D or enable_gqa inputs send CPU SDPA to the unfused math path (~50% of a bf16
            # prefill); 4-D with K/V heads repeated runs the causal flash kernel instead.
            g = q.shape[1] // n_kv
            ks, vs = ks.repeat_interleave(g, dim=0), vs.repeat_interleave(g, dim=0)  # [n_h, ctx, hd]
        # 4-D [1, heads, len, hd]: the CPU flash kernel only takes batched 4-D inputs
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], ks[None], vs[None], attn_mask=seg.mask,
                                           is_causal=seg.mask is None, scale=scale,
                                           enable_gqa=ks.shape[0] != q.shape[1])
        out[rows] = o[0].transpose(0, 1)  # [q, n_h, hd]
    return out


# Below this many decode rows, reduced-dtype (bf16/fp16) decode attention runs in float32:
# tiny bf16 batched matmuls cost more per call than the upcast (1.8x faster at B = 1).
F32_DECODE_MAX_ROWS = 16


def _decode(q: torch.Tensor, k_tiles: torch.Tensor, v_tiles: torch.Tensor,
            meta: AttentionMetadata, scale: float, n_kv: int) -> torch.Tensor:
    """1-query rows: q `[B, n_h, hd]` -> `[B, n_h, hd]`."""
    b, n_h, hd = q.shape
    ctx = meta.decode_bias.shape[-1]
    ks = k_tiles.index_select(0, meta.decode_tiles).view(b, n_kv, ctx, hd)
    vs = v_tiles.index_select(0, meta.decode_tiles).view(b, n_kv, ctx, hd)
    qg = (q * scale).view(b, n_kv, n_h // n_kv, hd)  # [B, n_kv, g, hd]
    if q.dtype != torch.float32 and b <= F32_DECODE_MAX_ROWS:
        qg, ks, vs = qg.float(), ks.float(), vs.float()
    scores = torch.matmul(qg, ks.transpose(-1, -2)) + meta.decode_bias  # [B, n_kv, g, ctx]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vs.dtype)
    return torch.matmul(probs, vs).view(b, n_h, hd).to(q.dtype)  # [B, n_kv, g, ctx] @ [B, n_kv, ctx, hd]
