"""Sampler: exact greedy / filtering / penalties / logprobs, and per-row reproducibility."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shared.engine.sampler import (
    Sampler,
    SamplerOutput,
    _argmax,
    _cutoff,
    _cutoff_sorted,
    _topk,
    _weights,
    row_uniform,
)
from shared.engine.sampling_params import SamplingParams


@dataclass
class Row:
    params: SamplingParams
    seed: int = 0
    sample_index: int = 0
    output_index: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


GREEDY = SamplingParams(temperature=0.0)


def _random_params(rnd: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rnd.choice([0.0, 0.5, 1.0, 1.3]), top_p=rnd.choice([1.0, 0.9, 0.5]),
        top_k=rnd.choice([-1, 1, 5, 50]), min_p=rnd.choice([0.0, 0.05]),
        repetition_penalty=rnd.choice([1.0, 1.2]), presence_penalty=rnd.choice([0.0, 0.5]),
        frequency_penalty=rnd.choice([0.0, -0.3]), logprobs=rnd.random() < 0.3)


def _random_row(rnd: random.Random, V: int) -> Row:
    return Row(_random_params(rnd), seed=rnd.randrange(2**63), sample_index=rnd.randrange(4),
               output_index=rnd.randrange(100),
               prompt_token_ids=[rnd.randrange(V) for _ in range(rnd.randrange(20))],
               output_token_ids=[rnd.randrange(V) for _ in range(rnd.randrange(10))])


def test_greedy_is_first_argmax_and_logits_untouched():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g)
    logits[2, 100] = logits[2, 40000] = 50.0  # tie: the first index wins, as torch.argmax
    before = logits.clone()
    out = Sampler(49152, [0])(logits, [Row(GREEDY)] * 6)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist() and out.token_ids[2] == 100
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6
    assert torch.equal(logits, before)


@pytest.mark.parametrize("V", [49152, 32064, 1000, 37, 128])
def test_blocked_argmax_matches_torch(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-3, 4, (9, V), generator=g).float()  # many ties
    assert torch.equal(_argmax(x), x.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 500, generator=g)
    rows = [Row(SamplingParams(top_k=1), seed=i) for i in range(8)]
    rows += [Row(SamplingParams(top_p=1e-6, temperature=1.5), seed=i) for i in range(8)]
    assert Sampler(500, [])(logits, rows).token_ids == logits.argmax(-1).tolist()


def _hf_filter(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = TemperatureLogitsWarper(p.temperature)(None, x.clone())
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    return x


@pytest.mark.parametrize("V", [300, 5000])
def test_filter_keeps_exactly_what_hf_warpers_keep(V):
    g = torch.Generator().manual_seed(V)
    rnd = random.Random(V)
    params = [SamplingParams(temperature=rnd.choice([0.3, 1.0, 2.0]), top_k=rnd.choice([-1, 3, 40]),
                             top_p=rnd.choice([1.0, 0.999, 0.95, 0.6, 0.1]),
                             min_p=rnd.choice([0.0, 0.01, 0.3])) for _ in range(40)]
    x = torch.randn(40, V, generator=g) * rnd.choice([1.0, 3.0])
    w = _weights(x, params)
    for i, p in enumerate(params):
        ref = _hf_filter(x[i : i + 1], p)[0]
        assert torch.equal(w[i] > 0, torch.isfinite(ref)), p
        assert torch.allclose(w[i] / w[i].sum(), torch.softmax(ref, -1), atol=1e-6)


def _support(sampler, logits, params, n=300) -> set[int]:
    rows = [Row(params, seed=7, output_index=i) for i in range(n)]
    return set(sampler(logits.expand(n, -1), rows).token_ids)


def test_top_k_top_p_min_p_supports():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    s = Sampler(4, [])
    assert _support(s, logits, SamplingParams()) == {0, 1, 2, 3}
    assert _support(s, logits, SamplingParams(top_k=2)) == {0, 1}
    assert _support(s, logits, SamplingParams(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert _support(s, logits, SamplingParams(min_p=0.2)) == {0, 1, 2}  # p >= 0.1
    assert _support(s, logits, SamplingParams(min_p=0.7)) == {0}


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    row = Row(p, prompt_token_ids=[0, 1, 99], output_token_ids=[3, 3, 2])  # 99: out of vocab
    got = Sampler(6, [])._process(logits, [row])
    # seen (prompt+output) -> /2 if > 0 else *2; output counts -> -0.5*count - 0.25*(count>0)
    want = torch.tensor([[1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, -2.0, 1.0]])
    assert torch.allclose(got, want)
    ref = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 3, 3, 2]]), logits.clone())
    assert torch.allclose(Sampler(6, [])._process(
        logits, [Row(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1],
                     output_token_ids=[3, 3, 2])]), ref)


def test_penalties_only_touch_their_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    rows = [Row(GREEDY, output_token_ids=[0]),
            Row(SamplingParams(temperature=0.0, presence_penalty=2.0), output_token_ids=[0])]
    assert Sampler(3, [])(logits, rows).token_ids == [0, 1]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1], max_tokens=5)
    s = Sampler(4, eos_token_ids=[0, 9])
    assert s(logits, [Row(p, output_index=0)]).token_ids == [2]
    assert s(logits, [Row(p, output_index=1)]).token_ids == [2]
    assert s(logits, [Row(p, output_index=2)]).token_ids == [0]
    sampled = SamplingParams(min_tokens=3, stop_token_ids=[1], max_tokens=5)
    rows = [Row(sampled, seed=i, output_index=i % 3) for i in range(500)]
    assert set(s(logits.expand(500, -1), rows).token_ids) == {2, 3}


def test_padded_vocab_columns_never_chosen():
    logits = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    s = Sampler(3, [])
    assert s(logits, [Row(GREEDY)]).token_ids == [2]
    assert _support(s, logits, SamplingParams(), n=200) == {0, 1, 2}


@pytest.mark.parametrize("V", [1000, 4096])
def test_row_draw_independent_of_batch(V):
    rnd = random.Random(3)
    g = torch.Generator().manual_seed(3)
    s = Sampler(V, eos_token_ids=[0])
    rows = [_random_row(rnd, V) for _ in range(48)]
    logits = torch.randn(48, V, generator=g) * 2
    batched = s(logits, rows)
    perm = list(range(48))
    rnd.shuffle(perm)
    shuffled = s(logits[perm], [rows[i] for i in perm])
    for j, i in enumerate(perm):
        alone = s(logits[i : i + 1], [rows[i]])
        assert alone.token_ids[0] == batched.token_ids[i] == shuffled.token_ids[j]
        assert alone.logprobs[0] == pytest.approx(batched.logprobs[i], abs=1e-6) \
            if rows[i].params.logprobs else batched.logprobs[i] is None


def test_draw_varies_with_each_index():
    logits = torch.zeros(1, 64)  # uniform over 64 tokens
    s = Sampler(64, [])
    p = SamplingParams()
    by_out = s(logits.expand(100, -1), [Row(p, seed=5, output_index=i) for i in range(100)])
    by_smp = s(logits.expand(100, -1), [Row(p, seed=5, sample_index=i) for i in range(100)])
    by_seed = s(logits.expand(100, -1), [Row(p, seed=i) for i in range(100)])
    for out in (by_out, by_smp, by_seed):
        assert len(set(out.token_ids)) > 40  # ~63 expected; a constant draw would give 1
    assert row_uniform(1, 0, 0) != row_uniform(0, 1, 0) != row_uniform(0, 0, 1)
    assert 0.0 < row_uniform(2**63 - 1, 127, 10**6) < 1.0


@pytest.mark.parametrize("V", [8, 4096])  # one-level and two-level (block) inverse CDF
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.5, top_k=5)])
def test_empirical_distribution_matches_softmax(params, V):
    g = torch.Generator().manual_seed(4)
    where = torch.arange(8) * (V // 8) + V // 16  # the 8 live tokens, spread over blocks
    logits = torch.full((1, V), -1e4)
    logits[0, where] = torch.randn(8, generator=g)
    n = 8000
    rows = [Row(params, seed=11, output_index=i) for i in range(n)]
    out = torch.tensor(Sampler(V, [])(logits.expand(n, -1), rows).token_ids)
    counts = (out.unsqueeze(1) == where).sum(0).double()
    assert counts.sum() == n  # nothing outside the live tokens
    probs = torch.softmax(_hf_filter(logits[:, where], params)[0], -1).double()
    support = probs > 0
    assert torch.all(counts[~support] == 0)
    expected = probs[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001 (deterministic: fixed hash draws)


def test_batched_sort_cutoff_matches_cpu_path():
    g = torch.Generator().manual_seed(6)
    rnd = random.Random(6)
    ps = [SamplingParams(top_k=rnd.choice([-1, 1, 7, 300]), top_p=rnd.choice([1.0, 0.9, 0.3]))
          for _ in range(32)]
    ps = [p for p in ps if p.top_k != -1 or p.top_p < 1.0]
    x = torch.randn(len(ps), 2048, generator=g) * rnd.choice([1.0, 4.0])
    e = torch.exp(x - x.amax(-1, keepdim=True))
    ks = [p.top_k if p.top_k > 0 else 2048 for p in ps]
    a, b = _cutoff(e, ps), _cutoff_sorted(e, ks, [p.top_p for p in ps])
    assert torch.equal(e >= a.unsqueeze(1), e >= b.unsqueeze(1))


def test_logprobs_are_raw_log_softmax_and_top_sorted():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 200, generator=g)
    rows = [Row(SamplingParams(temperature=0.7, logprobs=True, top_logprobs=5,
                               repetition_penalty=1.5), prompt_token_ids=[1, 2]),
            Row(GREEDY),
            Row(SamplingParams(temperature=0.0, logprobs=True))]
    out = Sampler(200, [])(logits, rows)
    lsm = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(lsm[0, out.token_ids[0]].item(), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.logprobs[2] == pytest.approx(lsm[2].max().item(), abs=1e-6)
    assert out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == lsm[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert all(math.isclose(v, lsm[0, t].item(), abs_tol=1e-6) for t, v in top)


def test_empty_prompt_and_output_with_penalties():
    logits = torch.tensor([[0.0, 1.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=1.0)
    assert Sampler(2, [])(logits, [Row(p)]).token_ids == [1]


@pytest.mark.parametrize("V", [49152, 1024, 300])
def test_blocked_topk_matches_torch(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(5, V, generator=g)
    for k in (1, 5, 20):
        vals, ids = _topk(x, k)
        ref = x.topk(k, dim=-1)
        assert torch.equal(vals, ref.values) and torch.equal(ids, ref.indices)
