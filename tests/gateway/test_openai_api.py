"""openai_api: request bodies -> ParsedRequest, tokenization, context-length checks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.errors import APIError
from services.gateway.openai_api import (
    UNRESOLVED_MAX_TOKENS,
    ImagePart,
    parse_chat,
    parse_completion,
    resolve_max_tokens,
    sampling_params,
    tokenize,
)
from shared.engine.tiny import IMAGE_TOKEN, SPECIAL_TOKENS, _make_tokenizer, chat_template
from shared.engine.tokenizer import Tokenizer

MSGS = [{"role": "user", "content": "Hello"}]
IMG = "data:image/png;base64,AAAA"


def chat(**kw):
    return parse_chat({"model": "m", "messages": MSGS, **kw}, supports_images=True)


def completion(**kw):
    return parse_completion({"model": "m", "prompt": "Hello", **kw})


def raises(fn, param: str | None, status: int = 400, match: str = "") -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    assert info.value.status == status
    assert info.value.param == param, info.value.message
    assert match in info.value.message
    return info.value


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    hf = _make_tokenizer(512, [*SPECIAL_TOKENS, IMAGE_TOKEN], chat_template("llava"), 1024)
    return Tokenizer(hf, image_token=IMAGE_TOKEN)


# --- wrong types name their field ----------------------------------------------------------
COMMON_BAD = [("temperature", "hot"), ("temperature", True), ("top_p", "1"), ("top_k", 1.5),
              ("min_p", []), ("presence_penalty", {}), ("frequency_penalty", "0"),
              ("repetition_penalty", False), ("n", 1.5), ("n", True), ("seed", "1"),
              ("max_tokens", 2.0), ("max_tokens", "10"), ("stop", 5), ("stop", ["a", 1]),
              ("stream", "yes"), ("stream", 1), ("ignore_eos", "no"), ("user", 5),
              ("stream_options", "x"), ("priority", 3), ("min_tokens", "1"),
              ("stop_token_ids", [1, "2"]), ("temperature", float("nan")),
              ("top_p", float("inf"))]


@pytest.mark.parametrize("field,value", COMMON_BAD)
def test_wrong_type_names_field(field, value):
    raises(lambda: chat(**{field: value}), field)
    raises(lambda: completion(**{field: value}), field)


@pytest.mark.parametrize("field,value", [("logprobs", 1), ("top_logprobs", True),
                                         ("max_completion_tokens", "5"), ("tools", {}),
                                         ("tools", [1]), ("response_format", "json"),
                                         ("add_generation_prompt", "y")])
def test_chat_wrong_types(field, value):
    raises(lambda: chat(**{field: value}), field)


@pytest.mark.parametrize("field,value", [("logprobs", True), ("logprobs", 1.0), ("echo", "no"),
                                         ("best_of", "2"), ("suffix", 1)])
def test_completion_wrong_types(field, value):
    raises(lambda: completion(**{field: value}), field)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("temperature", 101), ("top_p", 0),
                                         ("top_k", -5), ("n", 0), ("n", 1000), ("seed", -1),
                                         ("presence_penalty", 3), ("repetition_penalty", 0),
                                         ("max_tokens", 0), ("min_p", 2), ("stop", [""]),
                                         ("stop", ["x"] * 17), ("top_logprobs", 3),
                                         ("max_completion_tokens", -1), ("priority", "urgent")])
def test_out_of_range_names_field(field, value):
    raises(lambda: chat(**{field: value}), field)


def test_completion_logprobs_range_is_named_logprobs():
    raises(lambda: completion(logprobs=21), "logprobs", match="logprobs")
    raises(lambda: completion(logprobs=-1), "logprobs")


@pytest.mark.parametrize("messages,match", [
    (None, "required"), ({}, "array"), ([], "at least one"), (["hi"], "messages[0]"),
    ([{"content": "x"}], "role"), ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user"}], "content"), ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "audio"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}], "url"),
    ([{"role": "user", "content": [{"type": "image_url",
                                    "image_url": {"url": IMG, "detail": "max"}}]}], "detail"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": IMG}]}], "user"),
    ([{"role": "user", "content": "x", "name": 3}], "name"),
])
def test_bad_messages(messages, match):
    raises(lambda: parse_chat({"model": "m", "messages": messages}, supports_images=True),
           "messages", match=match)


def test_missing_model_and_prompt():
    raises(lambda: parse_chat({"messages": MSGS}, supports_images=False), "model")
    raises(lambda: parse_completion({"model": "m"}), "prompt", match="required")
    raises(lambda: parse_completion({"model": "m", "prompt": []}), "prompt")
    raises(lambda: parse_completion({"model": "m", "prompt": [1, "a"]}), "prompt")
    raises(lambda: parse_completion({"model": "m", "prompt": [True]}), "prompt")
    raises(lambda: parse_completion({"model": "m", "prompt": ["a", "b"]}), "prompt",
           match="2 prompts")
    raises(lambda: parse_chat([1], supports_images=False), None)


# --- accepted bodies ------------------------------------------------------------------------
def test_defaults_and_unknown_fields_ignored():
    p = chat(frobnicate=1, metadata={"a": 1}, store=False, temperature=None)
    assert p.kind == "chat" and p.model == "m" and not p.stream and not p.include_usage
    assert p.max_tokens is None and p.params.max_tokens == UNRESOLVED_MAX_TOKENS
    assert p.params.temperature == 1.0 and p.params.n == 1
    assert p.messages == ({"role": "user", "content": "Hello"},)


def test_sampling_fields_map():
    p = chat(temperature=0, top_p=0.5, top_k=40, min_p=0.1, presence_penalty=0.5,
             frequency_penalty=-0.5, repetition_penalty=1.1, seed=7, n=3, ignore_eos=True,
             max_tokens=9, logprobs=True, top_logprobs=4, user="u", min_tokens=2,
             stop_token_ids=[5], priority="offline")
    sp = p.params
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (0.0, 0.5, 40, 0.1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (sp.seed, sp.n, sp.ignore_eos, sp.max_tokens, sp.min_tokens) == (7, 3, True, 9, 2)
    assert (sp.logprobs, sp.top_logprobs, sp.stop_token_ids) == (True, 4, (5,))
    assert p.user == "u" and p.priority == "offline" and p.max_tokens == 9


def test_max_completion_tokens_wins():
    assert chat(max_tokens=5, max_completion_tokens=7).max_tokens == 7
    assert chat(max_tokens=5, max_completion_tokens=None).params.max_tokens == 5


def test_stop_str_or_list():
    assert chat(stop="END").params.stop == ("END",)
    assert chat(stop=["a", "b"]).params.stop == ("a", "b")
    assert chat(stop=None).params.stop == ()


def test_stream_options():
    p = chat(stream=True, stream_options={"include_usage": True})
    assert p.stream and p.include_usage
    assert not chat(stream=True, stream_options={}).include_usage
    raises(lambda: chat(stream_options={"include_usage": True}), "stream_options")
    raises(lambda: chat(stream=True, stream_options={"include_usage": 1}), "stream_options")


def test_developer_role_and_assistant_tool_calls():
    p = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"}]}, supports_images=False)
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "tool"]
    assert p.messages[2] == {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert p.messages[3]["tool_call_id"] == "1"


def test_image_parts():
    content = [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": IMG}},
               {"type": "image_url", "image_url": "data:image/jpeg;base64,BBBB"},
               {"type": "image_url", "image_url": {"url": IMG, "detail": "low"}}]
    p = parse_chat({"model": "m", "messages": [{"role": "user", "content": content}]},
                   supports_images=True)
    assert p.images == (ImagePart(IMG), ImagePart("data:image/jpeg;base64,BBBB"),
                        ImagePart(IMG, "low"))
    assert p.messages[0]["content"][1] == {"type": "image_url",
                                           "image_url": {"url": IMG, "detail": "auto"}}
    raises(lambda: parse_chat({"model": "m", "messages": [{"role": "user", "content": content}]},
                              supports_images=False), "messages", match="does not accept images")


def test_completion_prompts_and_logprobs():
    assert completion().prompt == "Hello"
    assert parse_completion({"model": "m", "prompt": ["Hi"]}).prompt == "Hi"
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompt == (1, 2)
    assert parse_completion({"model": "m", "prompt": [[3, 4]]}).prompt == (3, 4)
    sp = completion(logprobs=3).params
    assert sp.logprobs and sp.top_logprobs == 3
    sp = completion(logprobs=0).params
    assert sp.logprobs and sp.top_logprobs == 0
    assert not completion().params.logprobs
    assert completion(echo=False, best_of=1, suffix="").prompt == "Hello"
    raises(lambda: completion(echo=True), "echo")
    raises(lambda: completion(best_of=3), "best_of")
    raises(lambda: completion(suffix="x"), "suffix")


def test_unsupported_chat_features():
    raises(lambda: chat(tool_choice="required"), "tool_choice")
    raises(lambda: chat(response_format={"type": "json_object"}), "response_format")
    raises(lambda: chat(logit_bias={"1": 5}), "logit_bias")
    assert chat(tool_choice="auto", tools=[{"type": "function"}], logit_bias={}).tools


# --- context length -------------------------------------------------------------------------
def test_resolve_max_tokens():
    assert resolve_max_tokens(chat(), 10, 100) == 90
    assert resolve_max_tokens(chat(max_tokens=90), 10, 100) == 90
    e = raises(lambda: resolve_max_tokens(chat(max_tokens=91), 10, 100), "messages",
               match="maximum context length is 100 tokens")
    assert e.code == "context_length_exceeded" and "91 > 100 - 10" in e.message
    e = raises(lambda: resolve_max_tokens(chat(), 100, 100), "messages", match="100 input tokens")
    assert e.code == "context_length_exceeded"
    raises(lambda: resolve_max_tokens(completion(), 120, 100), "prompt")
    assert sampling_params(chat(), 10, 100).max_tokens == 90
    raises(lambda: sampling_params(chat(min_tokens=50), 60, 100), "min_tokens")


# --- tokenization ----------------------------------------------------------------------------
def test_tokenize_chat_matches_transformers(tok):
    p = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": "Hello there"}]},
                   supports_images=False)
    ids, images = tokenize(p, tok, 1024)
    expected = tok.hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        add_generation_prompt=True, tokenize=False)
    assert ids == tok.hf(expected, add_special_tokens=False)["input_ids"] and images == []


def test_tokenize_images_in_order(tok):
    content = [{"type": "image_url", "image_url": IMG}, {"type": "text", "text": "and"},
               {"type": "image_url", "image_url": "data:image/png;base64,BBBB"}]
    p = parse_chat({"model": "m", "messages": [{"role": "user", "content": content}]},
                   supports_images=True)
    ids, images = tokenize(p, tok, 1024)
    assert ids.count(tok.image_token_id) == 2
    assert [i.url for i in images] == [IMG, "data:image/png;base64,BBBB"]
    typed = parse_chat({"model": "m", "messages": [{"role": "user", "content": "<image> hi"}]},
                       supports_images=True)
    raises(lambda: tokenize(typed, tok, 1024), "messages", match="image placeholders")


def test_tokenize_completion(tok):
    ids, _ = tokenize(completion(prompt="The quick brown fox"), tok, 1024)
    assert ids == tok.hf("The quick brown fox")["input_ids"]  # add_special_tokens=True
    assert tokenize(completion(prompt=[5, 6, 7]), tok, 1024)[0] == [5, 6, 7]
    raises(lambda: tokenize(completion(prompt=[5, 512]), tok, 1024), "prompt", match="512")
    raises(lambda: tokenize(completion(prompt=""), tok, 1024), "prompt", match="empty")
    e = raises(lambda: tokenize(completion(prompt="The quick brown fox", max_tokens=10), tok, 8),
               "prompt")
    assert e.code == "context_length_exceeded"


# --- property: the parser raises nothing but APIError ----------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_keys = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens",
                         "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "stream",
                         "stream_options", "logprobs", "top_logprobs", "echo", "best_of", "tools",
                         "tool_choice", "response_format", "priority", "stop_token_ids",
                         "min_tokens", "logit_bias", "suffix", "user", "ignore_eos"])
_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                              optional={"text": _json, "image_url": _json})
_good_part = (st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=6))
              | st.just({"type": "image_url", "image_url": IMG}))
_role = st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"])
_msg = (st.fixed_dictionaries({"role": _role, "content": st.text(max_size=8)
                               | st.lists(_good_part, max_size=3)})
        | st.fixed_dictionaries({}, optional={"role": _role | _json, "name": _json,
                                              "content": st.lists(_part, max_size=3) | _json,
                                              "tool_calls": _json}))
_body = st.fixed_dictionaries({"model": st.just("m") | _json},
                              optional={"messages": st.lists(_msg, max_size=3) | _json,
                                        "prompt": _json}) | st.dictionaries(_keys, _json)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, extra=st.dictionaries(_keys, _json, max_size=4), images=st.booleans())
def test_parser_raises_only_api_errors(body, extra, images):
    body = {**body, **extra}
    for parse in (lambda: parse_chat(body, supports_images=images),
                  lambda: parse_completion(body)):
        try:
            p = parse()
        except APIError as e:
            assert e.status == 400 and isinstance(e.message, str)
        else:
            assert p.params.max_tokens >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_msg, min_size=1, max_size=3), tools=_json, prompt=_json)
def test_tokenize_raises_only_api_errors(tok, messages, tools, prompt):
    for body, kind in (({"model": "m", "messages": messages, "tools": tools}, "chat"),
                       ({"model": "m", "prompt": prompt}, "completion")):
        try:
            p = (parse_chat(body, supports_images=True) if kind == "chat" else parse_completion(body))
            ids, _ = tokenize(p, tok, 64)
        except APIError as e:
            assert e.status == 400
        else:
            assert 0 < len(ids) < 64
