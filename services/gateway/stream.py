"""StreamAssembler: token deltas of n samples, in any order, possibly repeated -> the exact
OpenAI stream (SSE chunks) or the final response.

Per sample it keeps `next` = the output index of the next token it may emit:

    delta.index <  next, ends <= next   duplicate (a redelivered event): dropped
    delta.index <  next < end           overlap: the known prefix is cut off (ids mode), or
                                        StreamError (text mode: text cannot be cut)
    delta.index == next                 emitted, then any held deltas that now follow on
    delta.index >  next                 held (a gap); `gap_wait()` says how long the oldest
                                        gap has waited so the caller can give up / re-drive
    after finish_reason                 anything more for that sample is dropped

Text comes either with the deltas (text mode) or from `text_fn(seq_index, token_ids,
finished)`, called on the tokens in order (ids mode: the gateway's own detokenizer, which
makes the text independent of how tokens were batched into events). Not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from services.gateway import responses as R


class StreamError(Exception):
    """The token events cannot be assembled (overlap in text mode, too many held deltas)."""


@dataclass(frozen=True)
class SeqDelta:
    """New tokens of sample `seq_index`, the first at output index `index`."""

    seq_index: int
    index: int
    token_ids: tuple[int, ...]
    text: str = ""
    finish_reason: str | None = None
    logprobs: tuple[dict, ...] | None = None  # one entry per token, see responses.py
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_event(cls, ev, text: str = "") -> SeqDelta:
        """From a shared.protocol.messages.TokenEvent."""
        return cls(ev.seq_index, ev.index, tuple(ev.token_ids), text, ev.finish_reason,
                   tuple(ev.logprobs) if ev.logprobs is not None else None,
                   ev.prompt_tokens, ev.cached_tokens)


@dataclass
class _Seq:
    next: int = 0
    pending: dict[int, SeqDelta] = field(default_factory=dict)
    gap_since: float | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    text_len: int = 0
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)  # chat items / legacy objects, in order


class StreamAssembler:
    def __init__(self, kind: str, *, n: int, model: str, stream: bool,
                 include_usage: bool = False, logprobs: bool = False,
                 decode_token: Callable[[int], str] | None = None,
                 text_fn: Callable[[int, list[int], bool], str] | None = None,
                 request_id: str | None = None, created: int | None = None,
                 max_pending: int = 4096, clock: Callable[[], float] = time.monotonic):
        if logprobs and decode_token is None:
            raise ValueError("decode_token: required when logprobs are returned")
        self.kind, self.model, self.stream = kind, model, stream
        self.include_usage = include_usage and stream
        self.logprobs, self.decode_token, self.text_fn = logprobs, decode_token, text_fn
        self.id = request_id or R.new_id(kind)
        self.created = created if created is not None else R.now()
        self.max_pending, self.clock = max_pending, clock
        self.seqs = [_Seq() for _ in range(n)]
        self.prompt_tokens = self.cached_tokens = 0
        self.duplicates = 0  # deltas (or parts of them) dropped as already seen

    @classmethod
    def for_request(cls, parsed, **kwargs) -> StreamAssembler:
        """From a ParsedRequest (kind, n, model, stream, include_usage, logprobs)."""
        return cls(parsed.kind, n=parsed.params.n, model=parsed.model, stream=parsed.stream,
                   include_usage=parsed.include_usage, logprobs=parsed.params.logprobs, **kwargs)

    # --- state ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Every sample has its finish_reason."""
        return all(s.finish_reason is not None for s in self.seqs)

    def gap_wait(self, now: float | None = None) -> float:
        """Seconds the oldest held gap has waited (0.0 when nothing is held)."""
        since = [s.gap_since for s in self.seqs if s.gap_since is not None]
        return (self.clock() if now is None else now) - min(since) if since else 0.0

    def expected(self) -> dict[int, int]:
        """seq_index -> next output index, for unfinished samples (what a re-drive resumes)."""
        return {i: s.next for i, s in enumerate(self.seqs) if s.finish_reason is None}

    @property
    def usage(self) -> R.Usage:
        return R.Usage(self.prompt_tokens, sum(s.num_tokens for s in self.seqs), self.cached_tokens)

    def set_prompt(self, prompt_tokens: int, cached_tokens: int = 0) -> None:
        """Usage's prompt side (the gateway knows the expanded prompt length); the larger of
        this and what the deltas report wins."""
        self.prompt_tokens = max(self.prompt_tokens, prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, cached_tokens)

    # --- input ---------------------------------------------------------------------------
    def start(self) -> list[str]:
        """The stream's first chunks: chat's role chunk for every choice (none otherwise)."""
        if not (self.stream and self.kind == "chat"):
            return []
        return [R.sse(self._chunk(i, text="", role=True)) for i in range(len(self.seqs))]

    def push(self, d: SeqDelta) -> list[str]:
        """Take one delta; returns the SSE chunks it makes ready, in order (always [] when not
        streaming: the text accumulates for response()). Raises StreamError (see module doc)
        and IndexError for a seq_index outside [0, n)."""
        if not 0 <= d.seq_index < len(self.seqs):
            raise IndexError(f"seq_index {d.seq_index} outside [0, {len(self.seqs)})")
        self.set_prompt(d.prompt_tokens, d.cached_tokens)
        s = self.seqs[d.seq_index]
        if d.index in s.pending:
            self.duplicates += 1
            return []
        d = self._admit(s, d)
        if d is None:
            return []
        if d.index > s.next:
            if len(s.pending) >= self.max_pending:
                raise StreamError(f"sample {d.seq_index}: more than {self.max_pending} events "
                                  f"held behind the gap at {s.next}")
            s.pending[d.index] = d
            s.gap_since = s.gap_since if s.gap_since is not None else self.clock()
            return []
        out = self._emit(s, d)
        while s.finish_reason is None:  # held deltas that now follow on (or turned stale)
            ready = min((i for i in s.pending if i <= s.next), default=None)
            if ready is None:
                break
            held = self._admit(s, s.pending.pop(ready))
            out += self._emit(s, held) if held is not None else []
        if s.finish_reason is not None:
            s.pending.clear()
        s.gap_since = self.clock() if s.pending else None  # progress restarts the wait
        return out

    def _admit(self, s: _Seq, d: SeqDelta) -> SeqDelta | None:
        """None for a duplicate; the part after s.next for an overlap; `d` otherwise."""
        if s.finish_reason is not None or (d.index < s.next and d.index + len(d.token_ids) <= s.next):
            self.duplicates += 1
            return None
        if d.index < s.next:
            if self.text_fn is None:
                raise StreamError(f"sample {d.seq_index}: event at {d.index} overlaps emitted "
                                  f"tokens up to {s.next}")
            cut = s.next - d.index
            self.duplicates += 1
            lps = d.logprobs[cut:] if d.logprobs is not None else None
            d = replace(d, index=s.next, token_ids=d.token_ids[cut:], logprobs=lps)
        return d

    def _emit(self, s: _Seq, d: SeqDelta) -> list[str]:
        finished = d.finish_reason is not None
        text = self.text_fn(d.seq_index, list(d.token_ids), finished) if self.text_fn else d.text
        lp = None
        if self.logprobs and d.token_ids:
            entries = d.logprobs or [{} for _ in d.token_ids]
            if self.kind == "chat":
                lp = R.chat_logprob_content(d.token_ids, entries, self.decode_token)
            else:
                lp = R.completion_logprobs(d.token_ids, entries, self.decode_token, s.text_len)
            s.logprobs.append(lp)
        s.next += len(d.token_ids)
        s.num_tokens += len(d.token_ids)
        s.text.append(text)
        s.text_len += len(text)
        s.finish_reason = d.finish_reason
        if not self.stream or not (text or finished or lp):
            return []
        wire_lp = {"content": lp} if lp is not None and self.kind == "chat" else lp
        if self.kind == "chat" and self.logprobs and wire_lp is None:
            wire_lp = {"content": []}
        return [R.sse(self._chunk(d.seq_index, text=text, finish_reason=d.finish_reason,
                                  logprobs=wire_lp))]

    def _chunk(self, index: int, **kw) -> dict:
        return R.chunk(self.kind, id=self.id, created=self.created, model=self.model, index=index,
                       include_usage=self.include_usage, **kw)

    # --- output --------------------------------------------------------------------------
    def finish(self) -> list[str]:
        """The stream's last chunks: the usage chunk when include_usage, then [DONE]."""
        out = []
        if self.include_usage:
            out.append(R.sse(R.usage_chunk(self.kind, id=self.id, created=self.created,
                                           model=self.model, usage=self.usage)))
        return out + [R.SSE_DONE]

    def error(self, status: int, message: str, param: str | None = None,
              code: str | None = None) -> list[str]:
        """The stream's last chunks after a failure: error event, [DONE]."""
        return R.sse_error(status, message, param, code)

    def response(self) -> dict:
        """The non-streaming response from everything emitted so far."""
        choices = []
        for i, s in enumerate(self.seqs):
            lp = None
            if self.logprobs and self.kind == "chat":
                lp = {"content": [item for part in s.logprobs for item in part]}
            elif self.logprobs:
                lp = R.merge_completion_logprobs(s.logprobs) or R.completion_logprobs(
                    [], [], str, 0)
            choices.append(R.Choice(i, "".join(s.text), s.finish_reason, lp))
        build = R.chat_completion if self.kind == "chat" else R.text_completion
        return build(id=self.id, created=self.created, model=self.model, choices=choices,
                     usage=self.usage)
