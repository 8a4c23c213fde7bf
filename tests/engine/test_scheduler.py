"""Scheduler with exact plans: decode-first, chunked prefill, budgets, preemption, priorities."""

from __future__ import annotations

from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import OFFLINE, ONLINE, Sequence, SequenceStatus

P = SamplingParams()


def seq(rid: str, n: int, priority: str = ONLINE, base: int = 0) -> Sequence:
    return Sequence(rid, 0, [base + i for i in range(n)], n, P, 0, priority=priority)


def plan(out) -> list[tuple[str, int, bool]]:
    return [(s.request_id, n, smp) for s, n, smp in zip(out.seqs, out.num_new_tokens, out.sample, strict=True)]


def step(sched: Scheduler, token: int = 7):
    """schedule -> (forward) -> update -> append a token to sampling seqs."""
    out = sched.schedule()
    sched.update(out)
    for s, smp in zip(out.seqs, out.sample, strict=True):
        if smp:
            s.append_token(token)
    return out


def make(num_blocks=16, bs=4, max_seqs=8, budget=8, chunked=True, caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, bs, caching), max_seqs, budget, chunked)


def test_chunked_prefill_then_decode():
    s = make(budget=8)
    a = seq("a", 20)
    s.add(a)
    assert plan(step(s)) == [("a", 8, False)]
    assert plan(step(s)) == [("a", 8, False)]
    assert plan(step(s)) == [("a", 4, True)]
    assert a.token_ids[-1] == 7 and a.num_computed_tokens == 20 and not a.is_prefill
    assert plan(step(s)) == [("a", 1, True)]
    assert a.block_table == [0, 1, 2, 3, 4, 5]  # 22 tokens -> 6 blocks of 4


def test_decode_first_then_running_prefill_then_admission():
    s = make(budget=8)
    a, b = seq("a", 3), seq("b", 3, base=10)
    s.add(a)
    s.add(b)
    assert plan(step(s)) == [("a", 3, True), ("b", 3, True)]
    c, d = seq("c", 10, base=20), seq("d", 5, base=40)
    s.add(c)
    s.add(d)
    assert plan(step(s)) == [("a", 1, True), ("b", 1, True), ("c", 6, False)]
    assert plan(step(s)) == [("a", 1, True), ("b", 1, True), ("c", 4, True), ("d", 2, False)]
    assert plan(step(s)) == [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 3, True)]


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2, budget=64)
    for r in "abc":
        s.add(seq(r, 4, base=ord(r) * 10))
    assert plan(step(s)) == [("a", 4, True), ("b", 4, True)]
    assert s.num_waiting == 1


def test_no_chunking_admits_whole_prompts_only():
    s = make(budget=8, chunked=False)
    s.add(seq("a", 6))
    s.add(seq("b", 6, base=50))
    assert plan(step(s)) == [("a", 6, True)]
    assert plan(step(s)) == [("a", 1, True), ("b", 6, True)]


def test_prefix_hit_at_admission_skips_cached_tokens():
    s = make(budget=64)
    a = seq("a", 9)
    s.add(a)
    step(s)
    b = seq("b", 10)  # same first 9 tokens: blocks 0, 1 are hits
    s.add(b)
    out = step(s)
    assert plan(out) == [("a", 1, True), ("b", 2, True)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]


def test_decode_preempts_most_recent_by_recompute():
    s = make(num_blocks=4, bs=4, budget=64)
    a, b = seq("a", 4), seq("b", 4, base=10)
    s.add(a)
    s.add(b)
    step(s)  # a: [0], b: [1]; both got a 5th token
    assert (a.block_table, b.block_table) == ([0], [1])
    c = seq("c", 5, base=20)
    s.add(c)
    out = step(s)  # a, b grow into 2 and 3; c has no room and waits
    assert plan(out) == [("a", 1, True), ("b", 1, True)] and s.num_waiting == 1
    for _ in range(3):
        step(s)
    # a and b hold 8 tokens each, full; the next decode needs a block each, none free.
    out = step(s)
    assert plan(out) == [("a", 1, True)]
    assert out.preempted == [b]
    assert b.status is SequenceStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_table == []
    assert b.token_ids == [10, 11, 12, 13, 7, 7, 7, 7, 7]  # generated tokens are kept
    assert s.waiting[ONLINE][0] is b  # front of the queue, ahead of c
    assert s.num_preemptions == 1


def test_preempted_sequence_resumes_with_full_reprefill():
    s = make(num_blocks=2, bs=4, budget=64, caching=False)
    a, b = seq("a", 3), seq("b", 3, base=10)
    s.add(a)
    s.add(b)
    step(s)  # 4 tokens each, 3 computed
    step(s)  # 5 tokens each, 4 computed
    out = step(s)  # both need a second block, none free: b (newest) goes
    assert out.preempted == [b] and plan(out) == [("a", 1, True)]
    s.remove(a)  # a finishes
    out = step(s)
    assert plan(out) == [("b", 5, True)]  # prompt (3) + 2 generated tokens re-prefilled
    assert b.num_computed_tokens == 5 and len(b.token_ids) == 6


def test_offline_is_preempted_before_online():
    s = make(num_blocks=2, bs=4, budget=64)
    on, off = seq("on", 4), seq("off", 4, OFFLINE, base=10)
    s.add(off)
    s.add(on)
    out = step(s)
    assert plan(out) == [("on", 4, True), ("off", 4, True)]  # online admitted first
    out = step(s)  # both need a second block; none free: the offline one goes
    assert plan(out) == [("on", 1, True)] and out.preempted == [off]
    assert s.waiting[OFFLINE][0] is off


def test_offline_never_preempts_online():
    s = make(num_blocks=2, bs=4, budget=64)
    off, on = seq("off", 4, OFFLINE), seq("on", 2, base=10)
    s.add(off)
    s.add(on)
    step(s)  # online first: on: [0], off: [1] (full)
    out = step(s)  # off needs a block; the only other running seq is online: off yields
    assert plan(out) == [("on", 1, True)] and out.preempted == [off]
    assert on.block_table == [0]


def test_online_admission_preempts_running_offline():
    s = make(num_blocks=3, bs=4, budget=64)
    off = seq("off", 9, OFFLINE)
    s.add(off)
    step(s)
    assert off.block_table == [0, 1, 2]
    on = seq("on", 4, base=100)
    s.add(on)
    out = step(s)
    assert out.preempted == [off]
    assert plan(out) == [("on", 4, True)]


def test_preempt_offline_api():
    s = make(budget=64)
    a, b, c = seq("a", 3, OFFLINE), seq("b", 3, base=10), seq("c", 3, OFFLINE, base=20)
    for x in (a, b, c):
        s.add(x)
    step(s)
    assert s.preempt_offline() == [c, a]
    assert [x.request_id for x in s.running] == ["b"]
    assert list(s.waiting[OFFLINE]) == [a, c]
