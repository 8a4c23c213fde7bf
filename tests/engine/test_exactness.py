"""The engine against the oracle (transformers, float32), in every scheduling mode."""

from __future__ import annotations

import pytest
import torch

from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import MMInput


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2"])
def test_greedy_matches_transformers(name, make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine(name)
    p = prompt(21, seed=1)
    e.add_request("a", p, greedy(24))
    res = drain(e)
    assert res[("a", 0)].tokens == hf_greedy(name, p, 24)
    assert res[("a", 0)].finish_reason == "length"
    all_free(e)


@pytest.mark.parametrize("name", ["llama", "llama3", "yarn", "qwen2"])
def test_logits_match_transformers(name, make_engine, prompt, check_logits, all_free):
    e = make_engine(name)
    check_logits(e, name, prompt(19, seed=2), 12)
    all_free(e)


def test_mixed_batch_with_late_arrivals(make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("qwen2")
    reqs = {f"r{i}": (prompt(n, seed=10 + i), m) for i, (n, m) in
            enumerate([(3, 20), (17, 5), (33, 12), (50, 30), (8, 9)])}
    items = list(reqs.items())
    for rid, (p, m) in items[:2]:
        e.add_request(rid, p, greedy(m))
    res = drain(e, steps=3)  # decodes in flight when the others arrive
    for rid, (p, m) in items[2:]:
        e.add_request(rid, p, greedy(m))
    res = drain(e, results=res)
    for rid, (p, m) in items:
        assert res[(rid, 0)].tokens == hf_greedy("qwen2", p, m), rid
    all_free(e)


def test_chunked_prefill(make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("llama3", max_num_batched_tokens=16)
    reqs = {"long": (prompt(70, seed=3), 10), "mid": (prompt(40, seed=4), 6), "short": (prompt(9, seed=5), 12)}
    for rid, (p, m) in reqs.items():
        e.add_request(rid, p, greedy(m))
    res = drain(e)
    for rid, (p, m) in reqs.items():
        assert res[(rid, 0)].tokens == hf_greedy("llama3", p, m), rid
    all_free(e)


def test_prefix_cache_hit(make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("llama")
    shared = prompt(32, seed=6)
    a, b = shared + prompt(5, seed=7), shared + prompt(9, seed=8)
    e.add_request("a", a, greedy(8))
    assert drain(e)[("a", 0)].num_cached_tokens == 0
    e.add_request("b", b, greedy(8))
    res = drain(e)[("b", 0)]
    assert res.num_cached_tokens == 32
    assert res.tokens == hf_greedy("llama", b, 8)
    all_free(e)
    assert e.stats()["cached_free_blocks"] > 0


def test_preemption_and_resume(make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("llama", num_kv_blocks=12)  # 192 token slots for ~280 tokens of demand
    reqs = {f"r{i}": (prompt(20 + 3 * i, seed=20 + i), 45) for i in range(4)}
    for rid, (p, m) in reqs.items():
        e.add_request(rid, p, greedy(m))
    res = drain(e)
    assert e.scheduler.num_preemptions > 0
    for rid, (p, m) in reqs.items():
        assert res[(rid, 0)].tokens == hf_greedy("llama", p, m), rid
    all_free(e)


def _prefill(engine, rid, p, params):
    engine.add_request(rid, p, params, prefill_only=True)
    outs = []
    while not outs:
        outs = engine.step()
        engine.check_integrity()
    assert not engine.has_unfinished()
    return outs


def test_prefill_export_import_decode(make_engine, drain, hf_greedy, prompt, all_free):
    pre, dec = make_engine("qwen2", max_num_batched_tokens=16), make_engine("qwen2")
    p = prompt(37, seed=30)
    (first,) = _prefill(pre, "r", p, greedy(10))
    assert not first.finished and first.token_index == 0
    kv = pre.export_kv("r")
    assert kv.num_tokens == 37 and len(kv.block_hashes) == 3 and tuple(kv.k.shape) == (4, 3, 16, 2, 16)
    pre.release("r")
    all_free(pre)
    assert dec.missing_blocks(kv.block_hashes) == [0, 1, 2]
    dec.import_kv("r", p, first.new_token_ids, greedy(10), kv, seed=0)
    res = drain(dec)[("r", 0)]
    assert res.outputs[0].token_index == 1
    assert first.new_token_ids + res.tokens == hf_greedy("qwen2", p, 10)
    # A second prompt sharing 2 blocks: only the missing block travels.
    p2 = p[:32] + prompt(11, seed=31)
    (first2,) = _prefill(pre, "r2", p2, greedy(6))
    hashes = pre.export_kv("r2", block_indices=[]).block_hashes
    missing = dec.missing_blocks(hashes)
    assert missing == [2]
    dec.import_kv("r2", p2, first2.new_token_ids, greedy(6), pre.export_kv("r2", missing), seed=0)
    pre.release("r2")
    res2 = drain(dec)[("r2", 0)]
    assert res2.num_cached_tokens == 32
    assert first2.new_token_ids + res2.tokens == hf_greedy("qwen2", p2, 6)
    all_free(pre)
    all_free(dec)


def test_import_without_kv_recomputes(make_engine, drain, hf_greedy, prompt, all_free):
    pre, dec = make_engine("llama"), make_engine("llama")
    p = prompt(23, seed=40)
    (first,) = _prefill(pre, "r", p, greedy(9))
    pre.release("r")
    dec.import_kv("r", p, first.new_token_ids, greedy(9), None, seed=0)
    res = drain(dec)[("r", 0)]
    assert first.new_token_ids + res.tokens == hf_greedy("llama", p, 9)
    all_free(pre)
    all_free(dec)


def test_n2_seeded_samples_reproducible(make_engine, drain, prompt, all_free):
    params = SamplingParams(n=2, temperature=1.5, max_tokens=12, seed=123, ignore_eos=True)
    p = prompt(21, seed=50)
    alone = make_engine("llama")
    alone.add_request("s", p, params)
    a = drain(alone)
    assert a[("s", 0)].tokens != a[("s", 1)].tokens
    all_free(alone)
    busy = make_engine("llama", max_num_batched_tokens=16)  # chunked, batched with others
    busy.add_request("x", prompt(30, seed=51), greedy(20))
    busy.add_request("s", p, params)
    busy.add_request("y", prompt(12, seed=52), SamplingParams(temperature=0.8, max_tokens=15, seed=1))
    b = drain(busy)
    assert [b[("s", i)].tokens for i in (0, 1)] == [a[("s", i)].tokens for i in (0, 1)]
    all_free(busy)
    # The same through the P -> D hand-off.
    pre, dec = make_engine("llama"), make_engine("llama")
    firsts = _prefill(pre, "s", p, params)
    assert [o.seq_index for o in firsts] == [0, 1]
    dec.import_kv("s", p, [o.new_token_ids[0] for o in firsts], params, pre.export_kv("s"), seed=123)
    pre.release("s")
    c = drain(dec)
    for i in (0, 1):
        assert firsts[i].new_token_ids + c[("s", i)].tokens == a[("s", i)].tokens
    all_free(pre)
    all_free(dec)


def test_multimodal_embeds_injection_across_chunks(tiny, make_engine, drain, hf_greedy, prompt, all_free):
    e = make_engine("llama", max_num_batched_tokens=16)
    p = prompt(40, seed=60)
    with torch.no_grad():  # "image" rows = the tokens' own embeddings: output must not change
        emb = tiny.hf("llama").get_input_embeddings()(torch.tensor(p[10:30]))
    e.add_request("mm", p, greedy(8), mm_inputs=[MMInput("img0", 10, 20, emb)])
    assert drain(e)[("mm", 0)].tokens == hf_greedy("llama", p, 8)
    all_free(e)


def test_bfloat16_runs(make_engine, drain, prompt, all_free):
    e = make_engine("qwen2", dtype="bfloat16", max_num_batched_tokens=16)
    for i in range(3):
        e.add_request(f"r{i}", prompt(20 + i, seed=70 + i), greedy(6))
    res = drain(e)
    assert all(len(r.tokens) == 6 for r in res.values())
    all_free(e)


def test_random_mix_under_pressure_matches_roomy_run(make_engine, drain, prompt, all_free):
    """Prefix sharing, chunking, preemption, aborts, n>1 and offline work on a tiny cache give
    the same greedy tokens as a roomy engine, with integrity checked after every step."""
    import random

    rng = random.Random(7)
    base = prompt(48, seed=80)
    reqs = {}
    for i in range(14):
        shared = base[: rng.choice([0, 16, 20, 32, 48])]
        p = shared + prompt(rng.randint(1, 30), seed=100 + i)
        n = rng.choice([1, 1, 2])
        reqs[f"q{i}"] = (p, SamplingParams(n=n, temperature=0.0, max_tokens=rng.randint(1, 25), ignore_eos=True),
                         rng.choice(["online", "offline"]))
    roomy = make_engine("llama", num_kv_blocks=256)
    for rid, (p, sp, prio) in reqs.items():
        roomy.add_request(rid, p, sp, priority=prio)
    want = drain(roomy)
    all_free(roomy)
    tight = make_engine("llama", num_kv_blocks=9, max_num_batched_tokens=24, max_num_seqs=6)
    aborted = {"q3", "q9"}
    got = {}
    for k, (rid, (p, sp, prio)) in enumerate(reqs.items()):
        tight.add_request(rid, p, sp, priority=prio)
        got = drain(tight, steps=3, results=got)
        if k == 8:
            for a in aborted:
                tight.abort(a)
            tight.preempt_offline(2)
    got = drain(tight, results=got)
    assert tight.scheduler.num_preemptions > 0
    for key, r in want.items():
        if key[0] in aborted:
            continue
        assert got[key].tokens == r.tokens, key
    all_free(tight)
