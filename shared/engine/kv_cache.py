"""Paged KV cache tensors on the configured device.

One tensor `[num_layers, 2 (k/v), num_blocks, num_kv_heads, block_size, head_dim]`: blocks are
head-major inside, so one KV head of one block ("head-block") is a contiguous
`[block_size, head_dim]` tile. Per layer the model sees two flat views:

    rows   [num_blocks * n_kv * block_size, hd]   row(slot s, head h) =
           ((s // bs) * n_kv + h) * bs + s % bs   -- where new K/V are written
    tiles  [num_blocks * n_kv, bs, hd]            tile(block b, head h) = b * n_kv + h
                                                  -- what attention gathers: gathering
           tiles [B, n_kv, nb] gives K as [B, n_kv, nb*bs, hd], ready for batched matmul.

Zero-initialised so padding positions gathered (and masked) by attention are finite. The
wire / export layout is `[num_layers, nb, block_size, n_kv, head_dim]`, independent of this.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        # [L, 2, num_blocks, n_kv, bs, hd]
        self.kv = torch.zeros(num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim,
                              dtype=dtype, device=device)
        self.layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(num_layers)]  # [nb, n_kv, bs, hd]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (fork of a partial block)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each `[num_layers, len(block_ids), block_size, n_kv, hd]` (a copy)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        sel = self.kv.index_select(2, idx)  # [L, 2, nb, n_kv, bs, hd]
        return sel[:, 0].transpose(2, 3).contiguous(), sel[:, 1].transpose(2, 3).contiguous()

    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write `[num_layers, len(block_ids), block_size, n_kv, hd]` K and V into blocks."""
        if not block_ids:
            return
        want = (self.num_layers, len(block_ids), self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"kv block shape {tuple(k.shape)} / {tuple(v.shape)}, expected {want}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for i, t in enumerate((k, v)):
            self.kv[:, i].index_copy_(1, idx, t.to(device=self.device, dtype=self.dtype).transpose(2, 3))
