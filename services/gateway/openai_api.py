"""OpenAI request bodies -> `ParsedRequest`: types checked, parameters validated, nothing run.

    body (dict from JSON) --parse_chat / parse_completion--> ParsedRequest (frozen)
        --tokenize(parsed, tokenizer, max_model_len)--> (prompt ids, image parts in order)
        --sampling_params(parsed, prompt_len, max_model_len)--> SamplingParams (max_tokens set)

OpenAI semantics: unknown fields are ignored, `null` means "default", a wrong type is a 400
naming the field, `bool` is never a number. Every failure is an `APIError`; nothing else
escapes `parse_*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from services.gateway.errors import APIError
from shared.engine.errors import InvalidRequestError
from shared.engine.sampling_params import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
DETAILS = ("auto", "low", "high")
# SamplingParams.max_tokens until the prompt length is known (= "up to the context limit").
UNRESOLVED_MAX_TOKENS = 2**31 - 1
_CONTEXT = "context_length_exceeded"


@dataclass(frozen=True)
class ImagePart:
    url: str
    detail: str = "auto"


@dataclass(frozen=True)
class ParsedRequest:
    """One validated request. `messages` (chat) hold normalized dicts: role in ROLES, content
    a str or a list of {"type": "text", "text"} / {"type": "image_url", "image_url": {"url",
    "detail"}} parts. `prompt` (completion) is a str or token ids. `max_tokens` is None when
    the client gave none; `params.max_tokens` is then UNRESOLVED_MAX_TOKENS until
    `sampling_params()` resolves it against the prompt length."""

    kind: Literal["chat", "completion"]
    model: str
    params: SamplingParams
    max_tokens: int | None = None
    messages: tuple[dict, ...] = ()
    prompt: str | tuple[int, ...] | None = None
    images: tuple[ImagePart, ...] = ()
    stream: bool = False
    include_usage: bool = False
    tools: tuple[dict, ...] = ()
    add_generation_prompt: bool = True
    user: str | None = None
    priority: Literal["online", "offline"] = "online"

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def _bad(param: str | None, msg: str) -> APIError:
    return APIError(400, msg, param=param)


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _opt(body: dict, name: str, kind: str) -> Any:
    """body[name] checked against `kind` (bool/int/number/str/list/dict); None when absent."""
    v = body.get(name)
    if v is None:
        return None
    ok = {"bool": isinstance(v, bool),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": isinstance(v, str), "list": isinstance(v, list), "dict": isinstance(v, dict)}[kind]
    if not ok:
        article = "an" if kind[0] in "ai" else "a"
        raise _bad(name, f"'{name}' must be {article} {kind}, got {_tname(v)}")
    if kind == "number":
        if not math.isfinite(v):
            raise _bad(name, f"'{name}' must be a finite number, got {v!r}")
        return float(v)
    return v


def _positive(body: dict, name: str) -> int | None:
    v = _opt(body, name, "int")
    if v is not None and v < 1:
        raise _bad(name, f"'{name}' must be at least 1, got {v}")
    return v


def _image_part(i: int, part: dict) -> dict:
    raw = part.get("image_url")
    where = f"messages[{i}].content"
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"]:
        raise _bad("messages", f"{where}: an image_url part needs image_url.url (a string)")
    detail = raw.get("detail") or "auto"
    if detail not in DETAILS:
        raise _bad("messages", f"{where}: image_url.detail must be one of {DETAILS}")
    return {"type": "image_url", "image_url": {"url": raw["url"], "detail": detail}}


def _content(i: int, role: str, content: Any) -> str | list[dict]:
    if content is None and role == "assistant":  # assistant turns that only call tools
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("messages", f"messages[{i}].content must be a string or an array of "
                               f"content parts, got {_tname(content)}")
    parts: list[dict] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            parts.append(_image_part(i, part))
        elif kind in ("text", "image_url"):
            what = "needs a string 'text'" if kind == "text" else "is only allowed in user messages"
            raise _bad("messages", f"messages[{i}].content: a {kind} part {what}")
        else:
            raise _bad("messages", f"messages[{i}].content: unsupported content part type {kind!r}")
    return parts


def _message(i: int, m: Any) -> dict:
    if not isinstance(m, dict):
        raise _bad("messages", f"messages[{i}] must be an object, got {_tname(m)}")
    role = m.get("role")
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise _bad("messages", f"messages[{i}].role must be one of {ROLES + ('developer',)}, "
                               f"got {role!r}")
    out: dict[str, Any] = {"role": role, "content": _content(i, role, m.get("content"))}
    for key, kind in (("name", str), ("tool_call_id", str), ("tool_calls", list)):
        if m.get(key) is not None:
            if not isinstance(m[key], kind):
                raise _bad("messages", f"messages[{i}].{key} has the wrong type")
            out[key] = m[key]
    return out


def _sampling(body: dict, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
              rename: dict[str, str]) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise _bad("stop", f"'stop' must be a string or an array of strings, got {_tname(stop)}")
    stop_ids = _opt(body, "stop_token_ids", "list") or []
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise _bad("stop_token_ids", "'stop_token_ids' must be an array of integers")
    kwargs: dict[str, Any] = {"max_tokens": max_tokens or UNRESOLVED_MAX_TOKENS,
                              "logprobs": logprobs, "top_logprobs": top_logprobs,
                              "stop": tuple(stop or ()), "stop_token_ids": tuple(stop_ids)}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        kwargs[name] = _opt(body, name, "number")
    for name in ("n", "top_k", "seed", "min_tokens"):
        kwargs[name] = _opt(body, name, "int")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        kwargs[name] = _opt(body, name, "bool")
    try:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except InvalidRequestError as e:
        param = rename.get(e.param or "", e.param)
        raise APIError(400, str(e).replace(e.param or "", param or "", 1), param=param) from e


def _common(body: dict) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "'model' is required and must be a string")
    stream = bool(_opt(body, "stream", "bool"))
    options = _opt(body, "stream_options", "dict")
    if options is not None and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad("stream_options", "'stream_options.include_usage' must be a boolean")
    priority = _opt(body, "priority", "str") or "online"
    if priority not in ("online", "offline"):
        raise _bad("priority", f"'priority' must be 'online' or 'offline', got {priority!r}")
    if _opt(body, "logit_bias", "dict"):
        raise _bad("logit_bias", "'logit_bias' is not supported")
    return {"model": model, "stream": stream, "include_usage": bool(include_usage),
            "user": _opt(body, "user", "str"), "priority": priority}


def parse_chat(body: dict, *, supports_images: bool) -> ParsedRequest:
    """POST /v1/chat/completions body -> ParsedRequest. Raises APIError(400) naming the field."""
    if not isinstance(body, dict):
        raise _bad(None, "request body must be a JSON object")
    common = _common(body)
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise _bad("messages", f"'messages' is required and must be an array, got {_tname(raw)}")
    if not raw:
        raise _bad("messages", "'messages' must contain at least one message")
    messages = tuple(_message(i, m) for i, m in enumerate(raw))
    images = tuple(ImagePart(p["image_url"]["url"], p["image_url"]["detail"])
                   for m in messages if isinstance(m["content"], list)
                   for p in m["content"] if p["type"] == "image_url")
    if images and not supports_images:
        raise _bad("messages", f"model {common['model']!r} does not accept images")
    tools = _opt(body, "tools", "list") or []
    if not all(isinstance(t, dict) for t in tools):
        raise _bad("tools", "'tools' must be an array of objects")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise _bad("tool_choice", "only tool_choice 'none' and 'auto' are supported")
    fmt = _opt(body, "response_format", "dict")
    if fmt is not None and fmt.get("type") != "text":
        raise _bad("response_format", "only response_format {'type': 'text'} is supported")
    max_tokens = _positive(body, "max_tokens")
    mct = _positive(body, "max_completion_tokens")
    params = _sampling(body, max_tokens=mct or max_tokens,
                       logprobs=bool(_opt(body, "logprobs", "bool")),
                       top_logprobs=_opt(body, "top_logprobs", "int") or 0, rename={})
    add_gen = _opt(body, "add_generation_prompt", "bool")
    return ParsedRequest(kind="chat", params=params, max_tokens=mct or max_tokens,
                         messages=messages, images=images, tools=tuple(tools),
                         add_generation_prompt=True if add_gen is None else add_gen, **common)


def _prompt(raw: Any) -> str | tuple[int, ...]:
    def ids(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(raw, str):
        return raw
    if ids(raw) and raw:
        return tuple(raw)
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, str) or ids(p) for p in raw):
        raise _bad("prompt", f"{len(raw)} prompts in one request are not supported: "
                             "send one request per prompt (use 'n' for several samples)")
    if isinstance(raw, list) and len(raw) == 1 and (isinstance(raw[0], str) or ids(raw[0])):
        return _prompt(raw[0])
    raise _bad("prompt", "'prompt' is required: a string, an array of token ids, or an array "
                         f"holding one of those, got {_tname(raw)}")


def parse_completion(body: dict) -> ParsedRequest:
    """POST /v1/completions body -> ParsedRequest. Raises APIError(400) naming the field."""
    if not isinstance(body, dict):
        raise _bad(None, "request body must be a JSON object")
    common = _common(body)
    prompt = _prompt(body.get("prompt"))
    if _opt(body, "echo", "bool"):
        raise _bad("echo", "'echo' is not supported")
    if _opt(body, "suffix", "str"):
        raise _bad("suffix", "'suffix' is not supported")
    best_of, n = _opt(body, "best_of", "int"), _opt(body, "n", "int") or 1
    if best_of is not None and best_of != n:
        raise _bad("best_of", "'best_of' other than 'n' is not supported")
    top = _opt(body, "logprobs", "int")
    max_tokens = _positive(body, "max_tokens")
    params = _sampling(body, max_tokens=max_tokens, logprobs=top is not None,
                       top_logprobs=top or 0, rename={"top_logprobs": "logprobs"})
    return ParsedRequest(kind="completion", params=params, max_tokens=max_tokens,
                         prompt=prompt, **common)


def parse_request(kind: str, body: dict, *, supports_images: bool) -> ParsedRequest:
    """`kind` "chat" or "completion" -> parse_chat / parse_completion."""
    if kind == "chat":
        return parse_chat(body, supports_images=supports_images)
    return parse_completion(body)


def resolve_max_tokens(parsed: ParsedRequest, prompt_len: int, max_model_len: int) -> int:
    """The request's max_tokens for a prompt of `prompt_len` tokens: the client's value, or
    everything left of the context. Raises APIError(400, code="context_length_exceeded")
    when the prompt leaves no room or prompt_len + max_tokens > max_model_len (vLLM's words)."""
    param = parsed.prompt_param
    if prompt_len >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, your request has {prompt_len} input tokens. Please reduce "
                            f"the length of the input {param}.", param=param, code=_CONTEXT)
    if parsed.max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + parsed.max_tokens > max_model_len:
        raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: "
                            f"{parsed.max_tokens}. This model's maximum context length is "
                            f"{max_model_len} tokens and your request has {prompt_len} input "
                            f"tokens ({parsed.max_tokens} > {max_model_len} - {prompt_len}).",
                       param=param, code=_CONTEXT)
    return parsed.max_tokens


def sampling_params(parsed: ParsedRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """parsed.params with max_tokens resolved (see resolve_max_tokens). Raises APIError(400)."""
    max_tokens = resolve_max_tokens(parsed, prompt_len, max_model_len)
    try:
        return replace(parsed.params, max_tokens=max_tokens)
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=e.param) from e


def _template_message(m: dict) -> dict:
    if not isinstance(m["content"], list):
        return m
    parts = [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]
    return {**m, "content": parts}


def tokenize(parsed: ParsedRequest, tokenizer, max_model_len: int) -> tuple[list[int], list[ImagePart]]:
    """Prompt token ids (chat: the template rendered as transformers does, then encoded without
    added special tokens; completion text: encoded with add_special_tokens=True, as vLLM does;
    completion ids: range-checked) and the image parts in prompt order. Each image stays ONE
    `tokenizer.image_token` here: expand it once the encoder says how many tokens it takes,
    and call resolve_max_tokens again with the expanded length. Raises APIError(400)."""
    param = parsed.prompt_param
    if parsed.kind == "chat":
        messages = [_template_message(m) for m in parsed.messages]
        try:
            ids = tokenizer.encode_chat(messages, tools=list(parsed.tools) or None,
                                        add_generation_prompt=parsed.add_generation_prompt)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param or param) from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", param=param) from e
        image_id = getattr(tokenizer, "image_token_id", None)
        if image_id is not None and sum(t == image_id for t in ids) != len(parsed.images):
            raise APIError(400, f"the prompt has {sum(t == image_id for t in ids)} image "
                                f"placeholders for {len(parsed.images)} images (do not type "
                                f"{tokenizer.image_token!r} in text)", param=param)
    elif isinstance(parsed.prompt, str):
        ids = tokenizer.encode(parsed.prompt, add_special_tokens=True)
    else:
        ids = list(parsed.prompt or ())
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of vocabulary (size "
                                f"{tokenizer.vocab_size})", param=param)
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    resolve_max_tokens(parsed, len(ids), max_model_len)
    return ids, list(parsed.images)
