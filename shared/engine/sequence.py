"""The one request-state object. Phase (prefill / decode) is derived from explicit counters.

A `Sequence` is one sample of a request (`n > 1` gives n sequences sharing a request id). It
is plain data: token ids, counters, block table, params and seed are enough to rebuild it on
another worker (the block table is local and is rebuilt by allocation / import there).

Counters, for `token_ids = prompt + outputs`:

    token_ids            [t0 t1 ... t(P-1) | o0 o1 ... o(k-1)]     len = P + k
    num_computed_tokens  tokens whose K/V is in this worker's cache (prefix hits included)
    num_cached_tokens    of those, how many came from the prefix cache at the last admission

The next forward computes tokens [num_computed_tokens, len) (or a chunk of them); the token
at index len-1 has no K/V yet in steady decode, so a decode step is a 1-token "prefill".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from shared.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not admitted yet: no blocks
    RUNNING = "running"      # admitted: holds blocks, scheduled each step
    PREEMPTED = "preempted"  # evicted by recompute: no blocks, back in the waiting queue
    PARKED = "parked"        # prefill-only done: blocks pinned until export / release
    FINISHED = "finished"    # done: no blocks


ONLINE, OFFLINE = "online", "offline"
PRIORITIES = (ONLINE, OFFLINE)


@dataclass
class MMInput:
    """Precomputed multimodal embeddings occupying token positions [offset, offset + length).

    `hash` names the content (image bytes hash) and enters the prefix-cache hashes of every
    block it overlaps; `embeds` is `[length, hidden]` on the engine's device and dtype.
    """

    hash: str
    offset: int
    length: int
    embeds: Any = None  # torch.Tensor [length, hidden]; Any keeps this module torch-free

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)
class Sequence:
    request_id: str
    seq_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    priority: str = ONLINE
    arrival_time: float = field(default_factory=time.monotonic)
    mm_inputs: list[MMInput] = field(default_factory=list)
    prefill_only: bool = False
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained content hashes of the FULL blocks of token_ids (prefix of the list is valid
    # forever: token ids only grow). Filled lazily by the block manager.
    block_hashes: list[str] = field(default_factory=list)
    # How many leading blocks of block_table this sequence has offered to the prefix cache.
    num_committed_blocks: int = 0
    # Output-side state owned by the engine (detokenizer, stop matcher, emitted text). Not
    # part of the plain-data state: rebuilt from token ids on another worker.
    out_state: Any = None

    # --- derived phase -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token lacks K/V (prompt, or re-prefill after preemption)."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        n = len(self.token_ids) if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    # --- SamplingRow protocol (what the Sampler reads) ------------------------------------
    @property
    def sample_index(self) -> int:
        return self.seq_index

    @property
    def output_index(self) -> int:
        return self.num_output_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.seq_index} {self.status.value} "
                f"len={len(self.token_ids)} prompt={self.num_prompt_tokens} "
                f"computed={self.num_computed_tokens} blocks={self.block_table})")


@dataclass(eq=False)
class RequestGroup:
    """The n sequences of one request. Sequences 1..n-1 are forked from sequence 0 when its
    prefill samples (they share its full prompt blocks); until then they wait in `unforked`."""

    request_id: str
    seqs: list[Sequence]
    unforked: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
