"""outputs.check_stop: streamed text deltas, stop-string hold-back and the flush at finish."""

from __future__ import annotations

import pytest

from shared.engine.outputs import check_stop, make_output_state
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import Sequence, SequenceStatus


@pytest.fixture(scope="module")
def tok(tiny_with_tokenizer):
    from shared.engine.tokenizer import Tokenizer

    return Tokenizer.from_folder(tiny_with_tokenizer)


def _stream(tok, text: str, **params) -> tuple[list[str], Sequence]:
    """Feed `text`'s token ids one by one as outputs; returns the deltas and the sequence."""
    prompt = tok.encode("Hi")
    seq = Sequence("r", 0, prompt, len(prompt), SamplingParams(**params), seed=0)
    seq.out_state = make_output_state(tok, seq)
    deltas = []
    for t in tok.encode(text):
        seq.append_token(t)
        deltas.append(check_stop(seq, t, frozenset(), 10_000))
        if seq.is_finished:
            break
    return deltas, seq


def test_finish_flushes_an_incomplete_character(tok):
    ids = tok.encode("a🙂")  # "a" + four byte-level pieces of the emoji
    deltas, seq = _stream(tok, "a🙂", max_tokens=len(ids) - 1)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "length"
    assert deltas[0] == "a" and not any(deltas[1:-1])
    assert deltas[-1] == tok.decode(ids[1:-1]) and "\ufffd" in deltas[-1]  # not lost


def test_stop_string_prefix_is_held_back_then_cut(tok):
    deltas, seq = _stream(tok, "hello world<|stop|> more", stop=("<|stop|>",), max_tokens=50)
    assert seq.finish_reason == "stop" and "".join(deltas) == "hello world"
    streamed = ""
    for d in deltas:
        streamed += d
        assert not streamed.endswith("<")  # a possible stop-string start is never streamed early
    n = len(tok.encode("hello world<|sto"))
    deltas, _ = _stream(tok, "hello world<|sto", stop=("<|stop|>",), max_tokens=n)
    assert "".join(deltas) == "hello world<|sto"  # finishing releases the held-back text
