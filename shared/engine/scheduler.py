"""Continuous batching with chunked prefill, prefix-cache admission and preemption by recompute.

No torch. One `schedule()` call plans one forward step under two limits: a token budget
(`max_num_batched_tokens`) and a sequence count (`max_num_seqs`). Order of service:

  1. running decodes (1 token each); a decode that cannot get a KV slot preempts a victim:
     the lowest-priority, most recently admitted running sequence (itself if none other);
  2. running sequences still prefilling continue with the next chunk;
  3. waiting sequences are admitted (online before offline, preempted ones first in their
     class) with a prefix-cache lookup; an online sequence that does not fit preempts
     running offline sequences.

Preemption by recompute frees the sequence's blocks and resets `num_computed_tokens` to 0;
its generated tokens stay in `token_ids`, so on resume it re-prefills prompt + outputs and
continues with the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.engine.block_manager import BlockManager
from shared.engine.sequence import OFFLINE, ONLINE, Sequence, SequenceStatus

_RANK = {ONLINE: 0, OFFLINE: 1}


@dataclass
class SchedulerOutput:
    """What one step computes: `seqs[i]` gets `num_new_tokens[i]` tokens starting at its
    `num_computed_tokens`; `sample[i]` is True when that reaches the end of its known tokens
    (the step samples its next token). Decodes come first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def _add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.sample.append(seq.num_computed_tokens + n == len(seq.token_ids))

    def _remove(self, seq: Sequence) -> int:
        i = self.seqs.index(seq)
        del self.seqs[i], self.sample[i]
        return self.num_new_tokens.pop(i)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: dict[str, deque[Sequence]] = {ONLINE: deque(), OFFLINE: deque()}
        self.running: list[Sequence] = []  # admission order: most recent last
        self.num_preemptions = 0

    # --- queue management ----------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (no blocks) at the back of its priority class."""
        seq.status = SequenceStatus.WAITING
        self.waiting[seq.priority].append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence that already holds blocks for its computed tokens (fork, import)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of the queues and free its blocks. No-op for a seq not queued."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            q = self.waiting[seq.priority]
            if seq in q:
                q.remove(seq)
        self.bm.free(seq)

    def park(self, seq: Sequence) -> None:
        """Stop scheduling seq but keep its blocks pinned (prefill-only hand-off)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PARKED

    def preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: free blocks, forget computed K/V, requeue at the front."""
        self.running.remove(seq)
        self.bm.free(seq)
        self.num_preemptions += 1
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting[seq.priority].appendleft(seq)

    def preempt_offline(self, max_seqs: int | None = None) -> list[Sequence]:
        """Preempt running offline sequences, most recently admitted first. Returns them."""
        victims = [s for s in reversed(self.running) if s.priority == OFFLINE][:max_seqs]
        for s in victims:
            self.preempt(s)
        return victims

    # --- the step plan -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. decodes
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0 or len(out.seqs) >= self.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted as a victim below
                continue
            while not self.bm.append_slot(seq):
                victim = self._victim(seq)
                if victim is None:
                    self.preempt(seq)
                    out.preempted.append(seq)
                    break
                budget += self._preempt_scheduled(victim, out)
            else:
                out._add(seq, 1)
                budget -= 1

        # 2. running prefills (chunked)
        for seq in self.running:
            n = seq.num_uncomputed_tokens
            if n <= 1 or budget == 0 or len(out.seqs) >= self.max_num_seqs:
                continue
            if n > budget and not self.enable_chunked_prefill:
                continue
            out._add(seq, min(n, budget))
            budget -= min(n, budget)

        # 3. admissions
        while budget > 0 and len(out.seqs) < self.max_num_seqs and len(self.running) < self.max_num_seqs:
            q = self.waiting[ONLINE] or self.waiting[OFFLINE]
            if not q:
                break
            seq = q[0]
            if not self.enable_chunked_prefill and len(seq.token_ids) - self.bm.cached_prefix_tokens(seq) > budget:
                break
            num_cached = self.bm.allocate(seq)
            while num_cached is None and seq.priority == ONLINE:
                victim = next((s for s in reversed(self.running) if s.priority == OFFLINE), None)
                if victim is None:
                    break
                budget += self._preempt_scheduled(victim, out)
                num_cached = self.bm.allocate(seq)
            if num_cached is None:
                break
            q.popleft()
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            out._add(seq, n)
            budget -= n
        return out

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: advance computed counters and offer newly full blocks to the
        prefix cache. Call once per executed SchedulerOutput, before appending tokens."""
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.bm.commit(seq)

    # --- helpers -------------------------------------------------------------------------
    def _victim(self, seq: Sequence) -> Sequence | None:
        """Lowest priority, then most recently admitted; never one of higher priority than seq."""
        best, best_key = None, None
        for i, s in enumerate(self.running):
            if s is seq or _RANK[s.priority] < _RANK[seq.priority]:
                continue
            key = (_RANK[s.priority], i)
            if best_key is None or key > best_key:
                best, best_key = s, key
        return best

    def _preempt_scheduled(self, victim: Sequence, out: SchedulerOutput) -> int:
        """Preempt victim; if it was already in this step's plan, drop it and return its tokens."""
        n = out._remove(victim) if victim in out.seqs else 0
        self.preempt(victim)
        out.preempted.append(victim)
        return n
