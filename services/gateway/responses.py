"""OpenAI response objects and SSE chunks (stream.py's StreamAssembler builds them from
per-sequence token deltas).

    chat:        chat.completion  | chat.completion.chunk*  (role chunk, deltas, finish)
    completions: text_completion  | text_completion*        (deltas, finish)
    both:        [usage chunk with choices: []] when stream_options.include_usage, "[DONE]"
    mid-stream failure: data: {"error": {...}} then "[DONE]" (as vLLM does)

Logprob entries (TokenEvent.logprobs / SeqDelta.logprobs, one per token, same order as the
token ids): {"logprob": float | None, "top": [[token_id, logprob], ...] | None}.
`decode_token(id) -> str` names a token in the logprob objects.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import error_object

SSE_DONE = "data: [DONE]\n\n"
_FLOOR = -9999.0  # JSON has no -inf; vLLM's floor


def new_id(kind: str) -> str:
    """"chatcmpl-<hex>" for chat, "cmpl-<hex>" for completions."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def sse(obj: Any) -> str:
    """One SSE event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, param: str | None = None,
              code: str | None = None) -> list[str]:
    """The end of a stream that failed after its headers went out: error event, [DONE]."""
    return [sse(error_object(status, message, param, code)), SSE_DONE]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def logprob_entries(logprobs: Sequence[float | None] | None,
                    top_logprobs: Sequence[Sequence[tuple[int, float]] | None] | None,
                    n: int) -> list[dict] | None:
    """Engine output (RequestOutput.logprobs / .top_logprobs for n tokens) -> wire entries."""
    if logprobs is None:
        return None
    tops = list(top_logprobs) if top_logprobs is not None else [None] * n
    return [{"logprob": lp, "top": [list(t) for t in top] if top else None}
            for lp, top in zip(logprobs, tops, strict=False)]


def _lp(v: float | None) -> float:
    return _FLOOR if v is None or math.isnan(v) else max(float(v), _FLOOR)


def _token(decode_token: Callable[[int], str], tid: int, lp: float | None) -> dict:
    tok = decode_token(tid)
    return {"token": tok, "logprob": _lp(lp), "bytes": list(tok.encode("utf-8", "replace"))}


def chat_logprob_content(token_ids: Sequence[int], entries: Sequence[dict],
                         decode_token: Callable[[int], str]) -> list[dict]:
    """Entries for `token_ids` -> OpenAI chat `logprobs.content` items (ChatCompletionTokenLogprob)."""
    out = []
    for tid, e in zip(token_ids, entries, strict=False):
        item = _token(decode_token, tid, e.get("logprob"))
        item["top_logprobs"] = [_token(decode_token, int(t), lp) for t, lp in (e.get("top") or [])]
        out.append(item)
    return out


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict],
                        decode_token: Callable[[int], str], text_offset: int) -> dict:
    """Entries -> the legacy completions logprobs object; `text_offset` is where the first
    token's text starts in the choice's text. top_logprobs dicts include the sampled token."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, e in zip(token_ids, entries, strict=False):
        tok = decode_token(tid)
        top = {decode_token(int(t)): _lp(lp) for t, lp in (e.get("top") or [])}
        top.setdefault(tok, _lp(e.get("logprob")))
        out["tokens"].append(tok)
        out["token_logprobs"].append(_lp(e.get("logprob")))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(tok)
    return out


def merge_completion_logprobs(parts: Sequence[dict]) -> dict | None:
    """Concatenate legacy logprobs objects (chunks of one choice, in order)."""
    if not parts:
        return None
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


@dataclass
class Choice:
    """One finished sample of a non-streaming response."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None  # chat: {"content": [...]}; completion: the legacy object


def chat_completion(*, id: str, created: int, model: str, choices: Sequence[Choice],
                    usage: Usage) -> dict:
    """A `chat.completion` object."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "finish_reason": c.finish_reason, "logprobs": c.logprobs,
                         "message": {"role": "assistant", "content": c.text}} for c in choices],
            "usage": usage.to_dict()}


def text_completion(*, id: str, created: int, model: str, choices: Sequence[Choice],
                    usage: Usage) -> dict:
    """A `text_completion` object."""
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage.to_dict()}


def chunk(kind: str, *, id: str, created: int, model: str, index: int, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, logprobs: dict | None = None,
          include_usage: bool = False) -> dict:
    """One streaming chunk for choice `index` (chat: `delta` with optional role/content;
    completion: `text`). With include_usage it carries "usage": null, as OpenAI's do."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": id, "object": obj, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(kind: str, *, id: str, created: int, model: str, usage: Usage) -> dict:
    """The last chunk before [DONE] when include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage.to_dict()}


def now() -> int:
    return int(time.time())
