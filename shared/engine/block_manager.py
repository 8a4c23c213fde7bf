"""Paged KV block allocator: pure Python (no torch, no I/O), reference counts, prefix hashes.

Block table and slots, for block_size = 4 and a sequence of 10 tokens:

    token index      0  1  2  3 | 4  5  6  7 | 8  9  .  .
    block_table   [      7      ,     2      ,     9      ]      (physical block ids)
    slot(i)        = block_table[i // 4] * 4 + i % 4      e.g. slot(5) = 2*4 + 1 = 9

The KV cache is `[num_blocks, block_size, ...]`; its flat view `[num_blocks*block_size, ...]`
is indexed by slot. A FULL block i has a chained content hash
`hash_block(hash_{i-1}, tokens of block i, image hashes overlapping it)`, so equal prefixes
get equal names on every process and machine (never Python's `hash()`).

Block states (each block is in exactly one):
    used         ref_count > 0, referenced by that many sequence block tables
    cached-free  ref_count == 0, has a hash, reachable from the hash map; kept in LRU order
                 and evicted (oldest first) only when no plain free block is left
    free         ref_count == 0, no hash

Hashes are registered (`commit`) only once a block is full AND its K/V is computed, so a
prefix hit never points at K/V that does not exist yet. A sequence never writes into a block
another sequence references: hits are limited to blocks before its last token, fork gives the
child its own copy of the parent's partial last block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence


def hash_block(parent_hash: str | None, token_ids: Sequence[int], extra: tuple = ()) -> str:
    """Stable hex hash of one block's content chained to its parent's hash."""
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes.fromhex(parent_hash) if parent_hash else b"\0" * 16)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for item in extra:
        b = str(item).encode()
        h.update(struct.pack("<I", len(b)) + b)
    return h.hexdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: str | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash and self.hash[:8]})"


class BlockManager:
    """Owns which physical block holds what. Sequences are duck-typed: `token_ids`,
    `block_table`, `block_hashes`, `num_computed_tokens`, `num_cached_tokens`,
    `num_committed_blocks`, `mm_inputs` (objects with `hash`, `offset`, `end`)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[str, int] = {}

    # --- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (plain free + cached-free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    def block_hashes(self, seq, num_blocks: int) -> list[str]:
        """Hashes of the first `num_blocks` full blocks of `seq` (cached on seq.block_hashes)."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            start = i * bs
            toks = seq.token_ids[start:start + bs]
            assert len(toks) == bs, f"block {i} of {seq!r} is not full"
            extra = tuple(m.hash for m in seq.mm_inputs if m.offset < start + bs and m.end > start)
            hashes.append(hash_block(hashes[-1] if hashes else None, toks, extra))
        return hashes[:num_blocks]

    def partial_block_hash(self, seq, num_tokens: int) -> str | None:
        """A name for the partial block holding tokens [num_tokens // bs * bs, num_tokens):
        used only to label transfers, never registered in the prefix cache."""
        full, rem = divmod(num_tokens, self.block_size)
        if rem == 0:
            return None
        parent = self.block_hashes(seq, full)[-1] if full else None
        start = full * self.block_size
        extra = tuple(m.hash for m in seq.mm_inputs if m.offset < num_tokens and m.end > start)
        return hash_block(parent, seq.token_ids[start:num_tokens], ("partial",) + extra)

    def missing_blocks(self, block_hashes: Iterable[str]) -> list[int]:
        """Indices of the hashes this manager has no cached block for (what a caller must send)."""
        return [i for i, h in enumerate(block_hashes) if h not in self._hash_to_block]

    def _prefix_hits(self, seq) -> list[int]:
        """Block ids of cached blocks matching seq's leading full blocks, stopping before the
        block holding its last token (that token must be computed to get logits)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self.block_hashes(seq, (len(seq.token_ids) - 1) // self.block_size):
            bid = self._hash_to_block.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def cached_prefix_tokens(self, seq) -> int:
        """How many of seq's leading tokens `allocate` would take from the prefix cache now."""
        return len(self._prefix_hits(seq)) * self.block_size

    def _fits(self, num_new: int, reused: Iterable[int]) -> bool:
        revived = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        return num_new + revived <= self.num_free_blocks

    # --- allocation verbs ----------------------------------------------------------------
    def can_allocate(self, seq) -> bool:
        hits = self._prefix_hits(seq)
        return self._fits(seq.num_blocks_needed(self.block_size) - len(hits), hits)

    def allocate(self, seq) -> int | None:
        """Give seq (no blocks yet) blocks for all its tokens, reusing prefix hits. Sets
        `block_table` and `num_cached_tokens`; returns num_cached_tokens, or None (nothing
        changed) when the free pool is too small."""
        assert not seq.block_table, f"allocate: {seq!r} already has blocks"
        hits = self._prefix_hits(seq)
        num_new = seq.num_blocks_needed(self.block_size) - len(hits)
        if not self._fits(num_new, hits):
            return None
        for bid in hits:
            self._ref(bid)
        seq.block_table = hits + [self._take() for _ in range(num_new)]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)
        return seq.num_cached_tokens

    def can_append(self, seq) -> bool:
        return seq.num_blocks_needed(self.block_size) - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq) -> bool:
        """Grow seq's block table to cover all its tokens (decode growth: 0 or 1 block).
        Returns False (nothing changed) if the free pool is too small."""
        need = seq.num_blocks_needed(self.block_size) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def commit(self, seq) -> None:
        """Register the hashes of seq's blocks that are now full and computed. Idempotent."""
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if n_full <= seq.num_committed_blocks:
            return
        if self.enable_prefix_caching:
            hashes = self.block_hashes(seq, n_full)
            for i in range(seq.num_committed_blocks, n_full):
                block, h = self.blocks[seq.block_table[i]], hashes[i]
                if block.hash is None and h not in self._hash_to_block:
                    block.hash = h
                    self._hash_to_block[h] = block.block_id
        seq.num_committed_blocks = n_full

    def free(self, seq) -> None:
        """Drop seq's references (tail first, so tail blocks are evicted before prefixes).
        No-op for a seq without blocks; a block freed twice raises AssertionError."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            assert block.ref_count > 0, f"double free of block {bid} by {seq!r}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._cached_free[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def fork(self, parent, child) -> list[tuple[int, int]] | None:
        """Give child (no blocks yet) the parent's computed K/V: shared full blocks (ref += 1)
        plus a private copy of the parent's partial last block. Returns the (src, dst) block
        copies the caller must perform on the KV cache, or None (nothing changed) if no block
        is free for that copy. Sets child's counters to the parent's."""
        assert not child.block_table, f"fork: {child!r} already has blocks"
        full, rem = divmod(parent.num_computed_tokens, self.block_size)
        if rem and not self.num_free_blocks:
            return None
        for bid in parent.block_table[:full]:
            self._ref(bid)
        child.block_table = parent.block_table[:full]
        copies = []
        if rem:
            dst = self._take()
            copies.append((parent.block_table[full], dst))
            child.block_table.append(dst)
        child.block_hashes = parent.block_hashes[:full]
        child.num_committed_blocks = min(parent.num_committed_blocks, full)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        return copies

    def allocate_for_import(self, seq, block_hashes: Sequence[str], num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` imported tokens of seq (no blocks yet), reusing any full
        block already cached under its hash. Returns the indices (into block_hashes) of the
        blocks whose K/V the caller must write, or None (nothing changed) if out of blocks."""
        assert not seq.block_table, f"allocate_for_import: {seq!r} already has blocks"
        n_blocks, n_full = -(-num_tokens // self.block_size), num_tokens // self.block_size
        assert len(block_hashes) == n_blocks, "one hash per imported block"
        cached = [self._hash_to_block.get(h) if i < n_full and self.enable_prefix_caching else None
                  for i, h in enumerate(block_hashes)]
        hits = [b for b in cached if b is not None]
        if not self._fits(n_blocks - len(hits), hits):
            return None
        for bid in hits:  # revive hits before taking new blocks, which may evict cached ones
            self._ref(bid)
        missing = [i for i, bid in enumerate(cached) if bid is None]
        seq.block_table = [self._take() if bid is None else bid for bid in cached]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = 0
        return missing

    # --- internals -----------------------------------------------------------------------
    def _take(self) -> int:
        """A fresh block with ref_count 1: plain free first, else evict the LRU cached block."""
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._cached_free.popitem(last=False)
            del self._hash_to_block[self.blocks[bid].hash]
            self.blocks[bid].hash = None
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._cached_free[bid]
        block.ref_count += 1

    # --- invariants ----------------------------------------------------------------------
    def check_integrity(self, live_seqs: Iterable) -> None:
        """Raise AssertionError naming the first broken invariant, given every sequence that
        holds blocks (running, parked, ...)."""
        expected = Counter(b for s in live_seqs for b in s.block_table)
        free, cached = list(self._free), list(self._cached_free)
        assert len(set(free)) == len(free), f"block listed twice in the free list: {free}"
        both = set(free) & set(cached)
        assert not both, f"blocks {sorted(both)} both free and cached-free"
        idle = set(free) | set(cached)
        for b in self.blocks:
            want = expected.get(b.block_id, 0)
            if b.ref_count > 0 and want == 0:
                raise AssertionError(f"leaked block {b.block_id}: ref_count {b.ref_count}, no sequence holds it")
            assert b.ref_count == want, f"block {b.block_id}: ref_count {b.ref_count} but {want} sequence references"
            if b.ref_count > 0:
                assert b.block_id not in idle, f"block {b.block_id} is in use and in a free list"
            else:
                assert b.block_id in idle, f"block {b.block_id} has ref_count 0 but is in no free list"
            if b.hash is not None:
                assert self._hash_to_block.get(b.hash) == b.block_id, f"block {b.block_id}'s hash is not mapped to it"
        for bid in free:
            assert self.blocks[bid].hash is None, f"free block {bid} still has a hash"
        for bid in cached:
            assert self.blocks[bid].hash is not None, f"cached-free block {bid} has no hash"
        for h, bid in self._hash_to_block.items():
            assert self.blocks[bid].hash == h, f"hash map points {h[:8]} at block {bid} holding {self.blocks[bid].hash}"
