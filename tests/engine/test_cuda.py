"""The CUDA path, by configuration only: same engine code, `device="cuda"`. Skipped without a GPU
(CI has none); run on a GPU host with `pytest tests/engine/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch

from shared.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2"])
def test_greedy_on_cuda_matches_transformers(name, make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine(name, device="cuda")
    reqs = {f"r{i}": prompt(n, seed=40 + i) for i, n in enumerate([5, 21, 40])}
    for rid, p in reqs.items():
        e.add_request(rid, p, greedy(16))
    res = drain(e)
    for rid, p in reqs.items():
        assert res[(rid, 0)].tokens == hf_greedy(name, p, 16), rid
    all_free(e)


def test_cuda_logits_match_transformers(make_engine, prompt, check_logits, all_free):
    e = make_engine("qwen2", device="cuda")
    check_logits(e, "qwen2", prompt(19, seed=2), 8)
    all_free(e)


def test_cuda_prefill_hands_kv_to_a_cpu_decoder(make_engine, drain, hf_greedy, prompt, all_free):
    """P on a GPU, D on a CPU: the exported KV crosses devices and decoding continues exactly."""
    pre, dec = make_engine("qwen2", device="cuda"), make_engine("qwen2")
    p = prompt(37, seed=30)
    pre.add_request("r", p, greedy(10), prefill_only=True)
    outs = []
    while not outs:
        outs = pre.step()
    kv = pre.export_kv("r")
    pre.release("r")
    dec.import_kv("r", p, outs[0].new_token_ids, greedy(10), kv, seed=0)
    res = drain(dec)[("r", 0)]
    assert outs[0].new_token_ids + res.tokens == hf_greedy("qwen2", p, 10)
    all_free(pre)
    all_free(dec)


def test_bf16_on_cuda_runs_and_stays_consistent(make_engine, drain, prompt, all_free):
    e = make_engine("llama", device="cuda", dtype="bfloat16")
    ps = [prompt(n, seed=50 + n) for n in (7, 30, 64)]
    for i, p in enumerate(ps):
        e.add_request(f"b{i}", p, greedy(12))
    res = drain(e)
    assert all(len(res[(f"b{i}", 0)].tokens) == 12 for i in range(len(ps)))
    all_free(e)
