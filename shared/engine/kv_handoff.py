"""Prompt K/V hand-off between engines (P -> D), named by chained block hashes.

    prompt of P tokens, block_size B:   blocks 0 .. P//B - 1 are full (cacheable hashes),
                                        block P//B is partial when P % B (a "partial" hash,
                                        never registered in the prefix cache)
    export: read those blocks' K/V      import: reuse blocks cached under the same hash,
                                                write the others from the export

Image hashes are part of the block hashes, so an import only matches the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.engine.block_manager import BlockManager
from shared.engine.kv_cache import KVCache
from shared.engine.sequence import Sequence


@dataclass
class KVExport:
    """K/V of a prompt, named by block hashes. `k`, `v`: `[num_layers, nb, block_size, n_kv,
    head_dim]` for the blocks listed in `block_indices` (None: all of block_hashes, in order).
    The last hash names a partial block when num_tokens % block_size != 0 (never cached)."""

    block_hashes: list[str]
    num_tokens: int
    block_size: int
    k: torch.Tensor
    v: torch.Tensor
    block_indices: list[int] | None = None


def prompt_block_hashes(bm: BlockManager, seq: Sequence) -> list[str]:
    """Hashes of the prompt's full blocks, plus the partial block's when there is one."""
    n = seq.num_prompt_tokens
    hashes = bm.block_hashes(seq, n // bm.block_size)
    partial = bm.partial_block_hash(seq, n)
    return hashes + ([partial] if partial else [])


def read_kv(bm: BlockManager, kv_cache: KVCache, seq: Sequence,
            block_indices: list[int] | None) -> KVExport:
    """Copy the prompt blocks `block_indices` (None: all) of `seq`, whose prompt is computed."""
    hashes = prompt_block_hashes(bm, seq)
    idx = list(range(len(hashes))) if block_indices is None else list(block_indices)
    k, v = kv_cache.read_blocks([seq.block_table[i] for i in idx])
    return KVExport(hashes, seq.num_prompt_tokens, bm.block_size, k, v,
                    None if block_indices is None else idx)


def kv_matches(bm: BlockManager, seq: Sequence, kv: KVExport) -> bool:
    """True when `kv` names exactly `seq`'s prompt blocks (tokens, images, block size)."""
    return (kv.block_size == bm.block_size and kv.num_tokens == seq.num_prompt_tokens
            and list(kv.block_hashes) == prompt_block_hashes(bm, seq))


def write_imported(bm: BlockManager, kv_cache: KVCache, seq: Sequence, kv: KVExport) -> bool:
    """Give `seq` (no blocks yet) its prompt blocks: cached ones reused, the others written
    from `kv`. False (nothing held) when blocks are short or `kv` lacks a needed block."""
    missing = bm.allocate_for_import(seq, kv.block_hashes, kv.num_tokens)
    if missing is None:
        return False
    have = {b: j for j, b in enumerate(kv.block_indices if kv.block_indices is not None
                                       else range(len(kv.block_hashes)))}
    if any(i not in have for i in missing):  # evicted here since missing_blocks was asked
        bm.free(seq)
        return False
    sel = torch.tensor([have[i] for i in missing], dtype=torch.long)
    kv_cache.write_blocks([seq.block_table[i] for i in missing],
                          kv.k.index_select(1, sel), kv.v.index_select(1, sel))
    return True
