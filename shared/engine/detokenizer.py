"""Streaming text out of token ids: incremental detokenization and stop-string matching.

IncrementalDetokenizer follows vLLM / TGI: decode the window `ids[prefix:read]` (text already
emitted) and `ids[prefix:]`, and emit the difference once it does not end in U+FFFD (a UTF-8
character still split across byte-level tokens). Starting the window a few tokens back keeps
context-dependent decoding right (SentencePiece's leading-space rule, merges that change the
previous token's text).
"""

from __future__ import annotations

from collections.abc import Sequence

_PROMPT_CONTEXT = 5  # prompt tokens decoded as context for the first output token
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns output token ids into text one id at a time; `tokenizer` needs only
    `decode(ids, skip_special_tokens=...)` (our Tokenizer, a transformers tokenizer, or a
    `tokenizers.Tokenizer`).

    Invariant: every `add()` result and then `flush()`, concatenated, is `text`; for byte-level
    BPE that is exactly `decode(output_ids)` (other tokenizers keep the leading space that the
    prompt context implies). Not thread-safe; one instance per sequence.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # window start: decoded as context only
        self._read = len(self._ids)  # end of the text already emitted
        self._prefix_text = self._decode(self._ids)  # text of ids[prefix:read]
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one id; return the newly stable text ("" while held back). Mutates `text`."""
        self._ids.append(int(token_id))
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character is still incomplete
        new = full[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        self.text += new
        return new

    def flush(self) -> str:
        """At finish: emit whatever is still held back (an incomplete character shows as
        U+FFFD). A second call returns ""."""
        if self._read == len(self._ids):
            return ""
        full = self._decode(self._ids[self._prefix:])
        new = full[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        self.text += new
        return new


class StopStringMatcher:
    """Finds stop strings in growing output text.

    A match ends generation at the stop string that *completes first* (smallest end; among
    those the longest), which is what a token-by-token stream would see, so the result does
    not depend on how the text was chunked. Stateless between calls.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool):
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self.include = include_stop_str_in_output
        self._longest = max((len(s) for s in self.stops), default=0)

    def check(self, text: str, num_new_chars: int) -> int | None:
        """Length to cut `text` to if a stop string ends inside its last `num_new_chars`
        characters (the text before them must have been checked already), else None."""
        if not self.stops or num_new_chars <= 0:
            return None
        n = len(text)
        best: tuple[int, int] | None = None  # (end, start) of the winning match
        for s in self.stops:
            start = text.find(s, max(0, n - num_new_chars - len(s) + 1))
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is None:
            return None
        return best[0] if self.include else best[1]

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` may still become part of a stop string and
        so must not be streamed yet. 0 when stop strings are kept in the output (a match then
        only cuts text that arrives with it)."""
        if self.include or not self.stops:
            return 0
        tail = text[-(self._longest - 1):] if self._longest > 1 else ""
        for k in range(len(tail), 0, -1):
            suffix = tail[-k:]
            if any(len(s) > k and s.startswith(suffix) for s in self.stops):
                return k
        return 0
