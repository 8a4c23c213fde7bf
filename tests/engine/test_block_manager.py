"""BlockManager with exact block ids: allocation, prefix hits, LRU eviction, fork, import, integrity."""

from __future__ import annotations

import pytest

from shared.engine.block_manager import BlockManager, hash_block
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import MMInput, Sequence

P = SamplingParams()


def seq(tokens, rid="r", idx=0, mm=()) -> Sequence:
    return Sequence(rid, idx, list(tokens), len(tokens), P, 0, mm_inputs=list(mm))


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Allocate if needed, pretend the forward ran over all of s's tokens, then commit."""
    if not s.block_table:
        assert bm.allocate(s) is not None
    s.num_computed_tokens = len(s.token_ids)
    bm.commit(s)
    return s


def test_hash_is_stable_and_chained():
    # Literal values: the same on every process and machine (never Python's hash()).
    assert hash_block(None, [1, 2, 3]) == "a73229ba37cecda3c76c2edbbaf17cda"
    h1 = hash_block(None, [1, 2, 3])
    assert hash_block(h1, [4, 5, 6], ("img",)) == "d68061382bea6c20a6822172907ef66a"
    assert hash_block(h1, [4, 5, 6]) != hash_block(None, [4, 5, 6])
    assert hash_block(h1, [4, 5, 6], ("a",)) != hash_block(h1, [4, 5, 6], ("b",))


def test_allocate_fresh_then_prefix_hit():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.allocate(a) == 0
    assert a.block_table == [0, 1, 2]
    computed(bm, a)
    assert [b.hash is not None for b in bm.blocks[:3]] == [True, True, False]
    # Shares two full blocks, then diverges.
    b = seq(list(range(8)) + [100, 101])
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 8
    assert b.block_table == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4
    bm.check_integrity([a, b])


def test_hit_never_covers_the_last_token():
    bm = BlockManager(8, 4)
    computed(bm, a := seq(range(8)))
    assert a.block_table == [0, 1]
    # Same 8 tokens: the last token must be recomputed, so only block 0 is a hit.
    c = seq(range(8))
    assert bm.allocate(c) == 4
    assert c.block_table == [0, 2]
    # Partial hit: first block equal, second differs.
    d = seq([0, 1, 2, 3, 50, 51, 52, 53, 60])
    assert bm.allocate(d) == 4
    assert d.block_table == [0, 3, 4]
    bm.check_integrity([a, c, d])


def test_lru_eviction_order_and_revival():
    bm = BlockManager(4, 2)
    a = computed(bm, seq([1, 2, 3, 4, 5]))
    assert a.block_table == [0, 1, 2]
    bm.free(a)  # tail first: 2 (no hash) -> free list; 1, 0 -> cached-free in that LRU order
    assert list(bm._free) == [3, 2]
    assert list(bm._cached_free) == [1, 0]
    assert bm.num_free_blocks == 4
    b = seq([9, 9, 9, 9, 9])
    assert bm.allocate(b) == 0
    assert b.block_table == [3, 2, 1]  # plain free blocks first, then the LRU cached block
    assert bm.blocks[1].hash is None and bm.blocks[0].hash is not None
    c = seq([1, 2, 7])
    # Block 0 is a hit (cached-free, revived) but the second block has nowhere to come from.
    assert not bm.can_allocate(c)
    assert bm.allocate(c) is None and c.block_table == []
    bm.check_integrity([b])
    bm.free(b)  # b never computed: its blocks go back to the plain free list, tail first
    assert list(bm._free) == [1, 2, 3]
    assert bm.allocate(c) == 2
    assert c.block_table == [0, 1]
    bm.check_integrity([c])


def test_append_slot_grows_by_one_block_when_full():
    bm = BlockManager(3, 4)
    s = seq(range(4))
    bm.allocate(s)
    assert s.block_table == [0]
    s.append_token(9)
    assert bm.can_append(s)
    assert bm.append_slot(s) and s.block_table == [0, 1]
    s.append_token(10)
    assert bm.append_slot(s) and s.block_table == [0, 1]  # room left in block 1
    full = seq(range(100, 104), rid="x")
    bm.allocate(full)
    for t in range(4):
        s.append_token(t)
    assert not bm.can_append(s) and not bm.append_slot(s)
    bm.check_integrity([s, full])


def test_commit_registers_only_computed_full_blocks():
    bm = BlockManager(4, 4)
    s = seq(range(10))
    bm.allocate(s)
    s.num_computed_tokens = 6  # chunk 1 of a chunked prefill
    bm.commit(s)
    assert [b.hash is not None for b in bm.blocks[:3]] == [True, False, False]
    assert bm.cached_prefix_tokens(seq(range(10))) == 4
    s.num_computed_tokens = 10
    bm.commit(s)
    assert [b.hash is not None for b in bm.blocks[:3]] == [True, True, False]


def test_fork_shares_full_blocks_and_copies_partial():
    bm = BlockManager(8, 4)
    parent = computed(bm, seq(range(6)))
    child = seq(range(6), idx=1)
    assert bm.fork(parent, child) == [(1, 2)]
    assert child.block_table == [0, 2]
    assert child.num_computed_tokens == 6
    assert [bm.blocks[i].ref_count for i in range(3)] == [2, 1, 1]
    even = computed(bm, seq(range(20, 28), rid="e"))
    kid = seq(range(20, 28), rid="e", idx=1)
    assert bm.fork(even, kid) == [] and kid.block_table == even.block_table
    bm.check_integrity([parent, child, even, kid])
    bm.free(parent)
    bm.free(child)
    bm.free(even)
    bm.free(kid)
    bm.check_integrity([])
    assert bm.num_free_blocks == 8


def test_fork_without_free_block_returns_none():
    bm = BlockManager(2, 4)
    parent = computed(bm, seq(range(6)))
    child = seq(range(6), idx=1)
    assert bm.fork(parent, child) is None
    assert child.block_table == [] and bm.blocks[0].ref_count == 1


def test_allocate_for_import_reuses_cached_blocks():
    src = BlockManager(8, 4)
    s = computed(src, seq(range(10)))
    hashes = src.block_hashes(s, 2) + [src.partial_block_hash(s, 10)]
    dst = BlockManager(8, 4)
    computed(dst, seq(list(range(4)) + [77, 78, 79, 80, 81], rid="other"))  # shares block 0 only
    assert dst.missing_blocks(hashes) == [1, 2]
    t = seq(range(10), rid="imp")
    assert dst.allocate_for_import(t, hashes, 10) == [1, 2]
    assert t.block_table == [0, 3, 4]
    assert t.num_cached_tokens == 4
    assert BlockManager(1, 4).allocate_for_import(seq(range(10)), hashes, 10) is None


def test_mm_hash_enters_overlapping_blocks_only():
    bm = BlockManager(8, 4)
    a = seq(range(12), mm=[MMInput("imgA", 5, 2)])
    b = seq(range(12), mm=[MMInput("imgB", 5, 2)])
    ha, hb = bm.block_hashes(a, 3), bm.block_hashes(b, 3)
    assert ha[0] == hb[0] and ha[1] != hb[1] and ha[2] != hb[2]


def test_prefix_caching_disabled():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = computed(bm, seq(range(10)))
    assert all(b.hash is None for b in bm.blocks)
    assert bm.allocate(seq(range(10))) == 0
    bm.free(a)
    assert list(bm._free)[-3:] == [2, 1, 0]


def test_integrity_violations_are_detected():
    bm = BlockManager(6, 4)
    a = computed(bm, seq(range(6)))
    bm.check_integrity([a])
    with pytest.raises(AssertionError, match="leaked block 0"):
        bm.check_integrity([])
    bm.blocks[5].ref_count = 1
    bm._free.remove(5)
    with pytest.raises(AssertionError, match="leaked block 5"):
        bm.check_integrity([a])
    bm.blocks[5].ref_count = 0
    bm._free.append(5)
    bm.blocks[1].ref_count = 2
    with pytest.raises(AssertionError, match="block 1: ref_count 2 but 1"):
        bm.check_integrity([a])
    bm.blocks[1].ref_count = 1
    bm._free.append(0)
    with pytest.raises(AssertionError, match="in use and in a free list"):
        bm.check_integrity([a])
    bm._free.pop()
    h = bm.blocks[0].hash
    bm._hash_to_block[h] = 1
    with pytest.raises(AssertionError, match="hash"):
        bm.check_integrity([a])
    bm._hash_to_block[h] = 0
    bm.check_integrity([a])
    stale = list(a.block_table)
    bm.free(a)
    a.block_table = stale
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)
