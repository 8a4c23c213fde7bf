"""responses + stream: the real `openai` client must accept what we produce; the assembler
must turn duplicated / reordered token events into exactly one in-order stream."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionTokenLogprob

from services.gateway.errors import error_middleware, error_object
from services.gateway.openai_api import parse_request
from services.gateway.responses import SSE_DONE, Usage, chunk, logprob_entries
from services.gateway.stream import SeqDelta, StreamAssembler, StreamError

WORDS = {10: "Hello", 11: " world", 12: "!"}
IDS = list(WORDS)
TEXT = "Hello world!"


def decode_token(tid: int) -> str:
    return WORDS.get(tid, f"<{tid}>")


def canned(n: int, logprobs: bool) -> list[SeqDelta]:
    """Every sample says "Hello world!" one token per event, ending with "stop"; delivered
    interleaved across samples, shuffled, with duplicates (as redelivery would)."""
    out = []
    for seq in range(n):
        for i, tid in enumerate(IDS):
            lp = ({"logprob": -0.5 * (i + 1), "top": [[tid, -0.5 * (i + 1)], [99, -3.0]]},)
            out.append(SeqDelta(seq, i, (tid,), WORDS[tid], "stop" if i == len(IDS) - 1 else None,
                                lp if logprobs else None, prompt_tokens=7, cached_tokens=2))
    rng = random.Random(n)
    out += rng.sample(out, 3)
    rng.shuffle(out)
    return out


async def handle(request: web.Request) -> web.StreamResponse:
    kind = "chat" if request.path.endswith("chat/completions") else "completion"
    parsed = parse_request(kind, await request.json(), supports_images=True)
    asm = StreamAssembler.for_request(parsed, decode_token=decode_token)
    if not parsed.stream:
        for d in canned(parsed.params.n, parsed.params.logprobs):
            asm.push(d)
        return web.json_response(asm.response())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    pieces = asm.start()
    for d in canned(parsed.params.n, parsed.params.logprobs):
        pieces += asm.push(d)
        if parsed.user == "fail" and asm.seqs[0].num_tokens >= 1:
            pieces += asm.error(500, "worker lost", code="internal_error")
            break
    else:
        pieces += asm.finish()
    for piece in pieces:
        await resp.write(piece.encode())
    await resp.write_eof()
    return resp


@pytest.fixture(scope="module")
def client():
    """The throwaway app on 127.0.0.1, in its own thread and loop (the client is sync)."""
    loop = asyncio.new_event_loop()
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app)
    started = threading.Event()
    port: list[int] = []

    async def serve():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(site._server.sockets[0].getsockname()[1])
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert started.wait(10)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port[0]}/v1", api_key="x", max_retries=0)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


MSGS = [{"role": "user", "content": "hi"}]


# --- the real openai client -----------------------------------------------------------------
def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=5)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "m"
    (c,) = r.choices
    assert (c.index, c.message.role, c.message.content, c.finish_reason) == (0, "assistant", TEXT, "stop")
    assert c.logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 3, 10)
    assert r.usage.prompt_tokens_details.cached_tokens == 2


def test_completion_non_streaming_with_logprobs(client):
    r = client.completions.create(model="m", prompt="hi", n=2, logprobs=1)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert [c.text for c in r.choices] == [TEXT, TEXT] and r.usage.completion_tokens == 6
    lp = r.choices[1].logprobs
    assert lp.tokens == ["Hello", " world", "!"] and lp.token_logprobs == [-0.5, -1.0, -1.5]
    assert lp.text_offset == [0, 5, 11]
    assert lp.top_logprobs[0] == {"Hello": -0.5, "<99>": -3.0}


def test_chat_streaming_with_usage(client):
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == TEXT
    assert [c.choices[0].finish_reason for c in body][-1] == "stop"
    assert all(c.usage is None for c in body)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10


def test_chat_streaming_n2_interleaves_by_index(client):
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, stream=True, n=2))
    text = {0: "", 1: ""}
    roles, finish = set(), {}
    for c in chunks:
        (ch,) = c.choices
        text[ch.index] += ch.delta.content or ""
        roles |= {ch.index} if ch.delta.role == "assistant" else set()
        finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert text == {0: TEXT, 1: TEXT} and roles == {0, 1} and finish == {0: "stop", 1: "stop"}
    assert chunks[-1].usage is None


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="m", messages=MSGS, logprobs=True, top_logprobs=2)
    items = r.choices[0].logprobs.content
    assert all(isinstance(i, ChatCompletionTokenLogprob) for i in items)
    assert [i.token for i in items] == ["Hello", " world", "!"]
    assert items[0].logprob == -0.5 and items[0].bytes == list(b"Hello")
    assert [t.token for t in items[1].top_logprobs] == [" world", "<99>"]
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, stream=True,
                                                 logprobs=True, top_logprobs=2))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs
                for i in c.choices[0].logprobs.content or []]
    assert [i.token for i in streamed] == ["Hello", " world", "!"]


def test_completion_streaming(client):
    chunks = list(client.completions.create(model="m", prompt="hi", stream=True, logprobs=0,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 5, 11] and chunks[-1].usage.completion_tokens == 3


def test_error_mid_stream(client):
    stream = client.chat.completions.create(model="m", messages=MSGS, stream=True, user="fail")
    got = []
    with pytest.raises(openai.APIError, match="worker lost"):
        for c in stream:
            got.append(c)
    assert got and got[0].choices[0].delta.role == "assistant"


def test_bad_request_through_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=MSGS, temperature="hot")
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="prompts"):
        client.completions.create(model="m", prompt=["a", "b"])


# --- StreamAssembler ------------------------------------------------------------------------
def deltas(text: str, seq: int = 0, finish: str = "stop") -> list[SeqDelta]:
    return [SeqDelta(seq, i, (100 + i,), ch, finish if i == len(text) - 1 else None)
            for i, ch in enumerate(text)]


def payloads(chunks: list[str]) -> list[dict]:
    return [json.loads(c[6:]) for c in chunks if c != SSE_DONE]


def test_duplicates_dropped():
    asm = StreamAssembler("chat", n=1, model="m", stream=True)
    a, b, c = deltas("abc")
    assert len(asm.push(a)) == 1 and asm.push(a) == [] and asm.duplicates == 1
    asm.push(c)
    assert asm.push(c) == [] and asm.duplicates == 2  # a held duplicate too
    out = payloads(asm.push(b))
    assert [p["choices"][0]["delta"]["content"] for p in out] == ["b", "c"]
    assert asm.done and asm.push(c) == [] and asm.expected() == {}


def test_out_of_order_and_gap_wait():
    t = [100.0]
    asm = StreamAssembler("completion", n=2, model="m", stream=False, clock=lambda: t[0])
    d0, d1 = deltas("hello", 0), deltas("abc", 1, "length")
    for d in [d0[4], d0[2], d1[2], d0[3]]:
        assert asm.push(d) == []
    assert asm.gap_wait() == 0.0 and asm.expected() == {0: 0, 1: 0}
    t[0] = 102.5
    assert asm.gap_wait() == 2.5
    for d in [d0[0], d0[1], d1[0]]:
        asm.push(d)
    assert asm.expected() == {1: 1} and asm.gap_wait() == 0.0  # progress restarts the wait
    asm.push(d1[1])
    assert asm.gap_wait() == 0.0 and asm.done
    r = asm.response()
    assert [(c["text"], c["finish_reason"]) for c in r["choices"]] == [("hello", "stop"),
                                                                      ("abc", "length")]
    assert r["usage"]["completion_tokens"] == 8


def test_overlap_trimmed_in_ids_mode_error_in_text_mode():
    seen: list[int] = []

    def text_fn(seq, ids, finished):
        seen.extend(ids)
        return "".join(chr(ord("a") + t) for t in ids)

    asm = StreamAssembler("chat", n=1, model="m", stream=False, text_fn=text_fn)
    asm.push(SeqDelta(0, 0, (0, 1)))
    asm.push(SeqDelta(0, 3, (3,)))
    asm.push(SeqDelta(0, 1, (1, 2, 3, 4), finish_reason="stop"))  # re-driven, re-batched
    assert seen == [0, 1, 2, 3, 4] and asm.response()["choices"][0]["message"]["content"] == "abcde"
    text_mode = StreamAssembler("chat", n=1, model="m", stream=False)
    text_mode.push(SeqDelta(0, 0, (0, 1), "ab"))
    with pytest.raises(StreamError, match="overlaps"):
        text_mode.push(SeqDelta(0, 1, (1, 2), "bc"))


def test_bounds():
    asm = StreamAssembler("chat", n=1, model="m", stream=True, max_pending=2)
    asm.push(SeqDelta(0, 5, (1,)))
    asm.push(SeqDelta(0, 6, (1,)))
    with pytest.raises(StreamError, match="held"):
        asm.push(SeqDelta(0, 7, (1,)))
    with pytest.raises(IndexError):
        asm.push(SeqDelta(1, 0, (1,)))
    with pytest.raises(ValueError, match="decode_token"):
        StreamAssembler("chat", n=1, model="m", stream=True, logprobs=True)


def test_stream_shape_and_error_chunks():
    asm = StreamAssembler("chat", n=1, model="m", stream=True, include_usage=True,
                          request_id="chatcmpl-1", created=5)
    out = payloads(asm.start())
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[0]["usage"] is None and out[0]["created"] == 5
    assert asm.push(SeqDelta(0, 0, (1,), "")) == []  # held-back text: nothing to send yet
    (last,) = payloads(asm.push(SeqDelta(0, 1, (2,), "x", "stop", prompt_tokens=4)))
    assert last["choices"][0] == {"index": 0, "delta": {"content": "x"}, "logprobs": None,
                                  "finish_reason": "stop"}
    tail = asm.finish()
    assert tail[-1] == SSE_DONE and payloads(tail)[0]["usage"]["total_tokens"] == 6
    err = asm.error(400, "bad image", param="messages")
    assert payloads(err) == [error_object(400, "bad image", "messages")] and err[-1] == SSE_DONE
    assert payloads(err)[0]["error"]["type"] == "invalid_request_error"


def test_builders():
    assert Usage(3, 4, 1).to_dict() == {"prompt_tokens": 3, "completion_tokens": 4,
                                        "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}}
    c = chunk("completion", id="cmpl-1", created=1, model="m", index=2, text="hi")
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "hi" and "usage" not in c
    assert logprob_entries([-1.0, None], [[(3, -1.0)], None], 2) == [
        {"logprob": -1.0, "top": [[3, -1.0]]}, {"logprob": None, "top": None}]
    assert logprob_entries(None, None, 2) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=12), st.randoms(),
       st.integers(1, 3), st.integers(0, 6))
def test_any_delivery_order_gives_the_same_stream(words, rnd, n, n_dups):
    """Shuffled, duplicated events for n samples stream exactly the words, in order."""
    events = [SeqDelta(s, i, (i,), w, "stop" if i == len(words) - 1 else None)
              for s in range(n) for i, w in enumerate(words)]
    events += [rnd.choice(events) for _ in range(n_dups)]
    rnd.shuffle(events)
    asm = StreamAssembler("chat", n=n, model="m", stream=True)
    streamed = {s: [] for s in range(n)}
    for e in events:
        for p in payloads(asm.push(e)):
            (ch,) = p["choices"]
            streamed[ch["index"]].append(ch["delta"]["content"])
    assert streamed == {s: words for s in range(n)} and asm.done
    assert asm.duplicates == n_dups and asm.gap_wait() == 0.0
