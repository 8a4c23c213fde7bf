"""Tokenizer.from_folder against transformers on a small offline-trained byte-level BPE."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shared.engine.errors import InvalidRequestError
from shared.engine.tokenizer import Tokenizer
from tests.engine.corpus import CODE, MULTILINGUAL

CORPUS = [*MULTILINGUAL, CODE] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PARTS = (  # inspects content parts itself (LLaVA / Qwen2-VL style)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if tools %}TOOLS:{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STRICT = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m['role'] == "
                        "'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Grüße 🙂"},
     {"role": "assistant", "content": "你好"}, {"role": "user", "content": "again?\nyes"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "<|im_end|> literal"}],
]


def train_bpe(vocab_size: int = 600) -> RawTokenizer:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw


def make_folder(out: Path, template: str | None = CHATML, **configs: dict) -> Path:
    hf = PreTrainedTokenizerFast(tokenizer_object=train_bpe(), eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=template)
    hf.save_pretrained(out)
    for name, data in configs.items():
        (out / f"{name}.json").write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tok"), generation_config={"eos_token_id": [2, 0]},
                       config={"eos_token_id": 2, "image_token_index": 3})


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def ref(folder) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def test_loads_without_network(folder, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert Tokenizer.from_folder(str(folder)).vocab_size > 256


def test_special_ids(tok, ref):
    assert tok.eos_token_ids == [2, 0]  # tokenizer eos, then generation_config's other one
    assert tok.pad_token_id == 0 and tok.bos_token_id is None
    assert tok.vocab_size == len(ref)
    assert (tok.image_token, tok.image_token_id) == ("<image>", 3)


@pytest.mark.parametrize("text", [c[:60] for c in CORPUS[:6]] + ["", " leading", "x<|im_end|>y"])
def test_encode_decode_round_trip(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text.replace("<|im_end|>", "")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, ref, conv, gen):
    want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(conv, add_generation_prompt=gen) == want
    assert tok.encode_chat(conv, add_generation_prompt=gen) == tok.encode(want)


def test_parts_template_passes_parts_and_tools(tmp_path):
    folder = make_folder(tmp_path, PARTS)
    tok, ref = Tokenizer.from_folder(folder), PreTrainedTokenizerFast.from_pretrained(str(folder))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    got = tok.apply_chat_template(conv, tools=tools)
    assert got == ref.apply_chat_template(conv, tools=tools, tokenize=False,
                                          add_generation_prompt=True)
    assert "<image>What?" in got and 'TOOLS:[{"type": "function"' in got


def test_string_template_flattens_parts(tok, ref):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    flat = [{"role": "user", "content": "<image>\nHi"}]
    assert tok.apply_chat_template(conv) == ref.apply_chat_template(
        flat, tokenize=False, add_generation_prompt=True)


def test_images_without_image_token_rejected(tmp_path):
    tok = Tokenizer.from_folder(make_folder(tmp_path))
    assert tok.image_token is None and tok.image_token_id is None
    with pytest.raises(InvalidRequestError, match="images"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])


def test_template_errors_are_request_errors(tmp_path):
    tok = Tokenizer.from_folder(make_folder(tmp_path, STRICT))
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


def test_no_chat_template(tmp_path):
    tok = Tokenizer.from_folder(make_folder(tmp_path, None))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_template_from_chat_template_json(tmp_path):
    folder = make_folder(tmp_path, None, chat_template={"chat_template": CHATML},
                         processor_config={"image_token": "<image>"})
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")
    assert (tok.image_token, tok.image_token_id) == ("<image>", 3)


def test_missing_folder_or_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_folder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
