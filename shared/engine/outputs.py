"""What the engine hands back per step, and the per-sequence text / stop state behind it.

    token sampled -> check_stop(seq, tok): detokenize, stop strings / stop ids / eos / length
                  -> new text (a stop string is cut; text that may still become one is held
                     back; at finish the detokenizer's held-back tail is flushed)
                  -> make_output(...) -> RequestOutput (a delta, never the whole state)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.engine.sequence import Sequence, SequenceStatus


@dataclass
class RequestOutput:
    """What one sequence produced in one step (a delta, never the whole state)."""

    request_id: str
    seq_index: int
    new_token_ids: list[int]
    new_text: str                  # "" without a tokenizer; stop strings cut, held back while partial
    finished: bool
    finish_reason: str | None      # "stop" | "length" | "abort"
    token_index: int               # output index of new_token_ids[0] (for dedupe / gap checks)
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[float | None] | None = None                      # when params.logprobs
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # when params.top_logprobs


class OutputState:
    """Per-sequence text state: incremental detokenizer, stop matcher, chars emitted."""

    __slots__ = ("detok", "matcher", "emitted")

    def __init__(self, detok=None, matcher=None):
        self.detok, self.matcher, self.emitted = detok, matcher, 0


def make_output_state(tokenizer, seq: Sequence) -> OutputState:
    """A fresh text state for `seq` (empty without a tokenizer: ids only, no stop strings)."""
    if tokenizer is None:
        return OutputState()
    from shared.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

    p = seq.params
    detok = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, skip_special_tokens=p.skip_special_tokens)
    return OutputState(detok, StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None)


def check_stop(seq: Sequence, tok: int, eos_token_ids: frozenset[int], max_model_len: int) -> str:
    """Stop conditions for the token just appended: marks `seq` FINISHED with its reason and
    returns the new text to stream. Text that may still become a stop string is held back
    until it cannot (`StopStringMatcher.holdback`); a finishing sequence flushes the
    detokenizer's held-back tail into its last delta."""
    p, st, n_out = seq.params, seq.out_state, seq.num_output_tokens
    can_stop, reason, cut = n_out >= p.min_tokens, None, None
    if st.detok is not None:
        delta = st.detok.add(tok)
        if st.matcher is not None and can_stop:
            cut = st.matcher.check(st.detok.text, len(delta))
    if cut is not None:
        reason = "stop"
    elif can_stop and ((tok in eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids):
        reason = "stop"
    elif n_out >= p.max_tokens or len(seq.token_ids) >= max_model_len:
        reason = "length"
    if reason is not None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
    if st.detok is None:
        return ""
    if reason is not None and cut is None:
        tail = st.detok.flush()  # an incomplete character at the end is emitted, not lost
        if st.matcher is not None and can_stop:
            cut = st.matcher.check(st.detok.text, len(tail))
    text = st.detok.text if cut is None else st.detok.text[:cut]
    limit = len(text)
    if reason is None and st.matcher is not None:
        limit -= st.matcher.holdback(text)
    new, st.emitted = text[st.emitted:limit], max(st.emitted, limit)
    return new


def make_output(seq: Sequence, toks: list[int], text: str, lp, top) -> RequestOutput:
    """The delta for `toks` just appended to `seq` (`toks` empty: a final abort output)."""
    p = seq.params
    return RequestOutput(
        seq.request_id, seq.seq_index, toks, text, seq.is_finished, seq.finish_reason,
        seq.num_output_tokens - len(toks), seq.num_prompt_tokens, seq.num_cached_tokens,
        [lp] * bool(toks) if p.logprobs else None, [top] * bool(toks) if p.top_logprobs else None)


def load_tokenizer(folder: str):
    """The folder's Tokenizer when it has tokenizer.json, else None (the engine runs on ids)."""
    if not (Path(folder) / "tokenizer.json").is_file():
        return None
    from shared.engine.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def eos_token_ids(tokenizer, hf_config, folder: str) -> frozenset[int]:
    """The tokenizer's EOS ids, else those of config.json (top level and text_config) and
    generation_config.json."""
    if tokenizer is not None and tokenizer.eos_token_ids:
        return frozenset(tokenizer.eos_token_ids)
    ids: set[int] = set()
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    cands = [getattr(hf_config, "eos_token_id", None), getattr(text_config, "eos_token_id", None)]
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        cands.append(json.loads(gen.read_text()).get("eos_token_id"))
    for eos in cands:
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)
