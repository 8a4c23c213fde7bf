"""LLMEngine API contracts: typed errors, abort / release, stop conditions, logprobs, config."""

from __future__ import annotations

import json
import shutil

import pytest

from shared.engine import EngineConfig, LLMEngine
from shared.engine.errors import (
    InvalidRequestError,
    OutOfBlocksError,
    PromptTooLongError,
    UnknownRequestError,
)
from shared.engine.loader import ModelLoadError
from shared.engine.models import UnsupportedModelError
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import OFFLINE

G = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_request_validation_errors(make_engine, prompt):
    e = make_engine("llama", max_model_len=64)
    cases = [
        (dict(prompt_token_ids=[]), InvalidRequestError, "prompt"),
        (dict(prompt_token_ids=[1, 512]), InvalidRequestError, "prompt"),
        (dict(prompt_token_ids=[1, -1]), InvalidRequestError, "prompt"),
        (dict(prompt_token_ids=[1, 2.0]), InvalidRequestError, "prompt"),
        (dict(prompt_token_ids=prompt(60), params=SamplingParams(max_tokens=5)), PromptTooLongError, "prompt"),
        (dict(params={"max_tokens": 3}), InvalidRequestError, "params"),
        (dict(priority="urgent"), InvalidRequestError, "priority"),
        (dict(params=SamplingParams(stop=("x",))), InvalidRequestError, "stop"),
        (dict(request_id=""), InvalidRequestError, "request_id"),
    ]
    for i, (kw, exc, param) in enumerate(cases):
        args = dict(request_id=f"bad{i}", prompt_token_ids=[1, 2, 3], params=G) | kw
        with pytest.raises(exc) as info:
            e.add_request(args.pop("request_id"), args.pop("prompt_token_ids"), args.pop("params"), **args)
        assert info.value.param == param, (kw, info.value)
    assert not e.has_unfinished()
    e.check_integrity()
    e.add_request("ok", [1, 2, 3], G)
    with pytest.raises(InvalidRequestError) as info:
        e.add_request("ok", [1, 2, 3], G)
    assert info.value.param == "request_id"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=-1.0)
    assert info.value.param == "temperature"


def test_prompt_that_cannot_fit_the_cache(make_engine):
    e = make_engine("llama", num_kv_blocks=2)
    with pytest.raises(OutOfBlocksError):
        e.add_request("big", list(range(20, 50)), SamplingParams(max_tokens=10))
    e.add_request("fits", list(range(20, 30)), SamplingParams(max_tokens=10))


def test_abort_frees_blocks_and_is_idempotent(make_engine, drain, prompt, all_free):
    e = make_engine("llama", max_num_batched_tokens=16)
    e.add_request("a", prompt(30, seed=1), G)
    e.add_request("b", prompt(20, seed=2), G)
    e.add_request("w", prompt(20, seed=3), G)  # still waiting after one step
    e.step()
    used = e.num_kv_blocks - e.num_free_blocks
    assert used > 0
    (out,) = e.abort("a")
    assert out.finished and out.finish_reason == "abort" and out.new_token_ids == []
    e.check_integrity()
    assert e.num_kv_blocks - e.num_free_blocks < used
    assert e.abort("a") == [] and e.abort("nope") == []
    assert [o.finish_reason for o in e.abort("w")] == ["abort"]
    res = drain(e)
    assert set(res) == {("b", 0)} and len(res[("b", 0)].tokens) == 8
    assert e.abort("b") == []
    all_free(e)


def test_abort_and_release_parked(make_engine, all_free, prompt):
    e = make_engine("llama")
    e.add_request("p", prompt(20), G, prefill_only=True)
    (first,) = e.step()
    assert not first.finished and e.stats()["parked"] == 1 and not e.has_unfinished()
    assert e.num_free_blocks == e.num_kv_blocks - 2
    e.release("p")
    e.release("p")
    all_free(e)
    e.add_request("q", prompt(20), G, prefill_only=True)
    e.step()
    assert [o.finish_reason for o in e.abort("q")] == ["abort"]  # parked = not finished
    all_free(e)


def test_stop_token_ids_min_tokens_and_eos(make_engine, drain, hf_greedy, prompt, all_free):
    p = prompt(15, seed=4)
    ref = hf_greedy("llama_eos", p, 12)
    e = make_engine("llama_eos")
    assert e.eos_token_ids == {7}
    e.add_request("s", p, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(ref[2],)))
    r = drain(e)[("s", 0)]
    assert r.tokens == ref[:3] and r.finish_reason == "stop"
    e.eos_token_ids = frozenset({ref[3]})  # make a token of the greedy path the eos
    e.add_request("eos", p, SamplingParams(temperature=0.0, max_tokens=12))
    e.add_request("ign", p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    res = drain(e)
    assert res[("eos", 0)].tokens == ref[:4] and res[("eos", 0)].finish_reason == "stop"
    assert res[("ign", 0)].tokens == ref and res[("ign", 0)].finish_reason == "length"
    e.add_request("min", p, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, stop_token_ids=(ref[2],)))
    r = drain(e)[("min", 0)]
    assert len(r.tokens) >= 5 and r.tokens[:2] == ref[:2]
    all_free(e)


def test_logprobs_and_stats(make_engine, drain, prompt):
    e = make_engine("qwen2")
    e.add_request("lp", prompt(10), SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=2))
    e.add_request("no", prompt(12), SamplingParams(temperature=0.0, max_tokens=3))
    res = drain(e)
    for o in res[("lp", 0)].outputs:
        assert len(o.logprobs) == 1 and o.logprobs[0] <= 0.0
        (top,) = o.top_logprobs
        assert len(top) == 2 and top[0][0] == o.new_token_ids[0]
    assert all(o.logprobs is None and o.top_logprobs is None for o in res[("no", 0)].outputs)
    st = e.stats()
    assert {"running", "waiting", "parked", "free_blocks", "num_blocks", "last_step_s"} <= set(st)
    assert st["last_step_s"] > 0


def test_offline_priority_and_preempt_offline(make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("llama")
    p = prompt(18, seed=9)
    e.add_request("off", p, G, priority=OFFLINE)
    res = drain(e, steps=2)
    assert e.preempt_offline() == 1 and e.stats()["waiting"] == 1
    res = drain(e, results=res)
    assert res[("off", 0)].tokens == hf_greedy("llama", p, 8)  # resumed by recompute
    all_free(e)


def test_stage_api_errors(make_engine, prompt):
    pre, dec = make_engine("llama"), make_engine("llama")
    with pytest.raises(UnknownRequestError):
        pre.export_kv("nope")
    p = prompt(20)
    pre.add_request("r", p, G, prefill_only=True)
    (first,) = pre.step()
    kv = pre.export_kv("r")
    with pytest.raises(InvalidRequestError) as info:
        dec.import_kv("r", p[:-1] + [p[-1] ^ 1], first.new_token_ids, G, kv, seed=0)
    assert info.value.param == "kv"
    with pytest.raises(InvalidRequestError) as info:
        dec.import_kv("r", p, first.new_token_ids * 2, G, kv, seed=0)
    assert info.value.param == "first_token_ids"
    dec.check_integrity()
    assert not dec.has_unfinished()


def test_config_and_model_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        EngineConfig(model="x", device="tpu")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="x", block_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=tiny.path("llama"), max_model_len=4096, num_kv_blocks=8), tokenizer=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine(EngineConfig(model=tiny.path("llama"), enable_chunked_prefill=False, num_kv_blocks=8,
                               max_num_batched_tokens=256), tokenizer=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "missing")), tokenizer=False)
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(tiny.path("llama") + "/config.json", folder / "config.json")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=8), tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM"):
        LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=8), tokenizer=False)


def test_text_streaming_and_stop_strings(tiny_with_tokenizer, drain, all_free):
    e = LLMEngine(EngineConfig(model=tiny_with_tokenizer, num_kv_blocks=64, num_threads=2))
    assert e.tokenizer is not None and e.eos_token_ids
    tok = e.tokenizer
    p = tok.encode("hello world, the quick brown fox")
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    e.add_request("plain", p, SamplingParams(**params))
    r = drain(e)[("plain", 0)]
    text = "".join(o.new_text for o in r.outputs)
    assert text == tok.decode(r.tokens) and len(text) > 12
    stop = text[6:9]
    at = text.find(stop)
    e.add_request("cut", p, SamplingParams(stop=(stop,), **params))
    e.add_request("keep", p, SamplingParams(stop=(stop,), include_stop_str_in_output=True, **params))
    res = drain(e)
    for rid, want in (("cut", text[:at]), ("keep", text[:at + len(stop)])):
        outs = res[(rid, 0)].outputs
        assert "".join(o.new_text for o in outs) == want, rid
        assert outs[-1].finish_reason == "stop"
    all_free(e)
