"""Incremental detokenization (byte-level BPE, SentencePiece-style spaces) and stop strings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from shared.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tests.engine.corpus import MULTILINGUAL

CORPUS = MULTILINGUAL * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED = st.one_of(st.sampled_from(list("ab ,.\nüé你世🙂👍\U0001F3FDßñ")),
                  st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"))
TEXT = st.text(MIXED, max_size=40)


def _train(pre, dec, vocab: int = 700) -> RawTokenizer:
    raw = RawTokenizer(models.BPE(unk_token="<unk>" if pre is not None else None))
    raw.pre_tokenizer, raw.decoder = pre, dec
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS + ["<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        if isinstance(pre, pre_tokenizers.ByteLevel) else []))
    return raw


BYTE_BPE = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())
SP_BPE = _train(pre_tokenizers.Metaspace(prepend_scheme="first"),
                decoders.Metaspace(prepend_scheme="first"))


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids] + [detok.flush()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=TEXT, text=TEXT)
def test_byte_level_stream_equals_decode(prompt, text):
    ids = BYTE_BPE.encode(text).ids
    detok = IncrementalDetokenizer(BYTE_BPE, BYTE_BPE.encode(prompt).ids)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == detok.text == BYTE_BPE.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never a half character
    assert detok.flush() == ""


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, BYTE_BPE.get_vocab_size() - 1), max_size=30),
       skip=st.booleans())
def test_any_id_sequence_stream_equals_decode(ids, skip):
    detok = IncrementalDetokenizer(BYTE_BPE, [], skip_special_tokens=skip)
    assert "".join(_stream(detok, ids)) == BYTE_BPE.decode(ids, skip_special_tokens=skip)


def test_multibyte_character_held_until_complete():
    ids = BYTE_BPE.encode("a🙂").ids
    emoji = [BYTE_BPE.token_to_id(t) for t in ("ðŁ", "Ļ", "Ĥ")]  # 🙂 split into byte tokens
    assert all(t is not None for t in emoji)
    detok = IncrementalDetokenizer(BYTE_BPE, [])
    assert detok.add(ids[0]) == "a"
    assert [detok.add(t) for t in emoji] == ["", "", "🙂"]
    detok.add(emoji[0])
    assert detok.text == "a🙂" and detok.flush() == "\ufffd"  # an unfinished one at the end


def test_special_tokens_skipped_or_kept():
    ids = BYTE_BPE.encode("hi<|im_end|>").ids
    assert "".join(_stream(IncrementalDetokenizer(BYTE_BPE, []), ids)) == "hi"
    kept = IncrementalDetokenizer(BYTE_BPE, [], skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) == "hi<|im_end|>"


@pytest.mark.parametrize("prompt, output", [("Hello", " world. The lazy dog"),
                                            ("The quick", " brown fox jumps")])
def test_leading_space_kept_with_prompt_context(prompt, output):
    p_ids = SP_BPE.encode(prompt).ids
    o_ids = SP_BPE.encode(prompt + output).ids[len(p_ids):]
    assert SP_BPE.decode(o_ids) == output.lstrip()  # alone, the first space is lost ...
    detok = IncrementalDetokenizer(SP_BPE, p_ids)
    assert "".join(_stream(detok, o_ids)) == output  # ... the prompt context keeps it


# --- stop strings ----------------------------------------------------------------------------


def _feed(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, str]:
    """Stream chunks like the engine: (final text, text emitted before the end)."""
    text = emitted = ""
    for c in chunks:
        text += c
        cut = matcher.check(text, len(c))
        if cut is not None:
            return text[:cut], emitted
        safe = len(text) - matcher.holdback(text)
        assert safe >= len(emitted)  # the safe prefix never shrinks
        emitted = text[:safe]
    return text, emitted


def _reference(text: str, stops: list[str], include: bool) -> str:
    for end in range(1, len(text) + 1):  # first completed stop; the longest at that end
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end] if include else text[: end - len(s)]
    return text


def test_stop_spanning_tokens():
    m = StopStringMatcher(["lo Wo"], include_stop_str_in_output=False)
    assert _feed(m, ["Hel", "lo W", "orld"]) == ("Hel", "Hel")
    m = StopStringMatcher(["lo Wo"], include_stop_str_in_output=True)
    assert _feed(m, ["Hel", "lo W", "orld"])[0] == "Hello Wo"


def test_first_completed_stop_wins():
    m = StopStringMatcher(["abcd", "bc", "zz"], include_stop_str_in_output=False)
    assert m.check("xxabcd", 6) == 3  # "bc" completes before "abcd"
    m = StopStringMatcher(["c", "abc"], include_stop_str_in_output=False)
    assert m.check("xabc", 4) == 1  # same end: the longer one cuts more
    m = StopStringMatcher(["END", "STOP"], include_stop_str_in_output=True)
    assert m.check("a STOP b END", 12) == 6
    assert m.check("no match", 8) is None
    assert m.check("old END, new", 5) is None  # only matches ending in the new chars count


def test_holdback():
    m = StopStringMatcher(["<|end|>", "###"], include_stop_str_in_output=False)
    assert m.holdback("hello <|en") == 4 and m.holdback("x ##") == 2
    assert m.holdback("hello") == 0 and m.holdback("") == 0 and m.holdback("<") == 1
    assert StopStringMatcher(["###"], True).holdback("x ##") == 0
    assert StopStringMatcher([], False).holdback("abc") == 0


@settings(max_examples=400, deadline=None)
@given(text=st.text("abc", max_size=30),
       stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8), include=st.booleans())
def test_streaming_equals_non_streaming(text, stops, cuts, include):
    m = StopStringMatcher(stops, include)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    final, emitted = _feed(m, chunks)
    whole = m.check(text, len(text))
    assert final == (text if whole is None else text[:whole]) == _reference(text, stops, include)
    assert final.startswith(emitted)  # nothing streamed was later taken back
