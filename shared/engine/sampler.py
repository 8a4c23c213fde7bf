"""Batched token sampling: penalties, greedy, temperature / top-k / top-p / min-p, logprobs.

Reproducibility: a sampled row draws exactly one uniform `u` from a stable hash of
(seed, sample_index, output_index) (`row_uniform`) and picks its token by inverse CDF over
the filtered distribution. The draw depends on nothing else (not on other rows, batch order,
call count or device RNG state), so a request re-run on another worker repeats its tokens.

Order of processing (HF `generate` order): repetition / frequency / presence penalties and
min_tokens masking on the raw logits -> greedy argmax (temperature == 0) or
temperature -> top-k -> top-p -> min-p -> sample. Ties at a top-k / top-p cut-off are kept.
Logprobs are vLLM's default "raw" logprobs: log_softmax of the model's logits before any
penalty, temperature or filtering.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np
import torch

from shared.engine.sampling_params import SamplingParams

_U64 = 2**64 - 1


class SamplingRow(Protocol):
    """What the sampler reads from one sequence (e.g. `shared.engine.sequence.Sequence`);
    `output_index` is the index of the token being sampled (= output tokens so far)."""

    params: SamplingParams
    seed: int
    sample_index: int
    output_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw logprob of the chosen token; None unless params.logprobs
    top_logprobs: list[list[tuple[int, float]] | None]  # best first; None unless top_logprobs > 0


def row_uniform(seed: int, sample_index: int, output_index: int) -> float:
    """The uniform in (0, 1) a row draws: a pure function of the triple (53 random bits).
    Never 0, so weights of ~1e-38 (masked logits after the exp clamp) are never picked."""
    key = struct.pack("<QQQ", seed & _U64, sample_index & _U64, output_index & _U64)
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"epd-samp").digest(), "little")
    return ((h >> 11) + 0.5) * 2.0**-53


class Sampler:
    """Picks one token per row of a [B, V] logits batch. Stateless; never mutates `logits`.

    `vocab_size` is the number of valid token ids: logit columns at or past it (a padded LM
    head) are never chosen. `eos_token_ids` are masked while output_index < min_tokens.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int]):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        B = len(rows)
        if logits.dim() != 2 or logits.shape[0] != B:
            raise ValueError(f"logits must be [{B}, V], got {list(logits.shape)}")
        x = logits if logits.dtype == torch.float32 else logits.float()
        if x.shape[1] > self.vocab_size:
            x = x[:, : self.vocab_size].contiguous()
        params = [r.params for r in rows]
        if not any(p.logprobs or not p.greedy or p.uses_penalties or p.min_tokens for p in params):
            return SamplerOutput(_argmax(x).tolist(), [None] * B, [None] * B)

        lp_idx = [i for i, p in enumerate(params) if p.logprobs]
        if lp_idx:  # raw logprobs: log-softmax of the unprocessed logits
            raw = x if len(lp_idx) == B else x[lp_idx]  # [L, V]
            lse = _logsumexp(raw)  # [L]
        x = self._process(x, rows)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            chosen = _argmax(x)
        elif len(sampled) == B:
            chosen = self._sample(x, rows)
        else:
            chosen = _argmax(x)  # cheaper for the whole batch than copying the greedy rows
            chosen[sampled] = self._sample(x[sampled], [rows[i] for i in sampled])

        logprobs: list[float | None] = [None] * B
        tops: list[list[tuple[int, float]] | None] = [None] * B
        if lp_idx:
            lps = raw.gather(1, chosen[lp_idx].unsqueeze(1)).squeeze(1) - lse
            for i, v in zip(lp_idx, lps.tolist(), strict=True):
                logprobs[i] = v
            k = max(params[i].top_logprobs for i in lp_idx)
            if k:
                vals, ids = _topk(raw, min(k, raw.shape[1]))  # sorted, best first
                vals = (vals - lse.unsqueeze(1)).tolist()
                for i, vs, ts in zip(lp_idx, vals, ids.tolist(), strict=True):
                    n = params[i].top_logprobs
                    tops[i] = list(zip(ts[:n], vs[:n], strict=True)) if n else None
        return SamplerOutput(chosen.tolist(), logprobs, tops)

    # --- logits processing ------------------------------------------------------------------
    def _process(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Penalties and min_tokens masking, on a copy of x (only for rows that need them)."""
        pen = [i for i, r in enumerate(rows) if r.params.uses_penalties]
        mint = [i for i, r in enumerate(rows) if r.output_index < r.params.min_tokens]
        if not pen and not mint:
            return x
        x = x.clone()
        V = x.shape[1]
        if pen:
            _penalize_(x, {i: rows[i] for i in pen})
        if mint:
            banned = {i: self.eos_token_ids + rows[i].params.stop_token_ids for i in mint}
            x.view(-1)[_flat_keys(banned, V, x.device)] = -math.inf
        return x

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Filter, then draw by inverse CDF with each row's own uniform. x: [b, V] -> [b] ids."""
        u = [row_uniform(r.seed, r.sample_index, r.output_index) for r in rows]
        return _draw(_weights(x, [r.params for r in rows]), u)


def _draw(e: torch.Tensor, u: list[float]) -> torch.Tensor:
    """Inverse-CDF pick per row from unnormalized weights e: [b, V] (>= 0, some > 0), in two
    levels (block sums, then inside one block) so no full-width cumsum is needed and the
    running sums are float64. Never returns a zero-weight token. -> [b]."""
    (b, V), dev = e.shape, e.device
    f64 = torch.float64 if dev.type in ("cpu", "cuda") else torch.float32
    blk = min(V & -V, 128)
    if blk < 16:  # no convenient block width: one level
        cdf = e.to(f64).cumsum(dim=-1)
        return _search(cdf, torch.tensor(u, dtype=f64, device=dev) * cdf[:, -1])
    eb = e.view(b, V // blk, blk)  # [b, n_blocks, blk]
    bsum = eb.sum(dim=-1).to(f64)  # [b, n_blocks]
    bcdf = bsum.cumsum(dim=-1)
    target = torch.tensor(u, dtype=f64, device=dev) * bcdf[:, -1]
    j = _search(bcdf, target)  # the block holding the target
    ar = torch.arange(b, device=dev)
    inner = eb[ar, j].to(f64).cumsum(dim=-1)  # [b, blk]
    return j * blk + _search(inner, target - (bcdf[ar, j] - bsum[ar, j]))


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First column whose cdf exceeds target, capped at the last column that adds mass."""
    idx = torch.searchsorted(cdf, target.unsqueeze(1), right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(idx, last).squeeze(1)


def _weights(x: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Unnormalized probabilities after temperature, top-k, top-p, min-p: [b, V] in [0, 1],
    row max exactly 1, filtered tokens exactly 0. Returns a new tensor."""
    (b, V), dev = x.shape, x.device
    inv_t = torch.tensor([1.0 / p.temperature for p in ps], device=dev).unsqueeze(1)
    # exp((x - max) / T); the clamp keeps exp off its very slow underflow path (e^-87 > 2^-126)
    e = (x - x.amax(dim=-1, keepdim=True)).mul_(inv_t).clamp_(min=-87.0).exp_()
    thr = torch.tensor([p.min_p for p in ps], device=dev)  # keep e >= thr (min-p: p_max == 1)
    cut = [i for i, p in enumerate(ps) if 0 < p.top_k < V or p.top_p < 1.0]
    if cut:
        rows = e if len(cut) == b else e[cut]
        thr[cut] = torch.maximum(thr[cut], _cutoff(rows, [ps[i] for i in cut]))
    elif not any(p.min_p > 0.0 for p in ps):
        return e
    if dev.type == "cpu":  # a per-row threshold kernel beats masked ops ~5x on CPU
        below = torch.nextafter(thr, torch.zeros_like(thr)).tolist()  # F.threshold keeps x > t
        for i, t in enumerate(below):
            if t > 0.0:
                torch.nn.functional.threshold_(e[i], t, 0.0)
    else:
        e.mul_(e >= thr.unsqueeze(1))
    return e


def _cutoff(e: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Per-row weight threshold of top-k then top-p (HF semantics: top-k keeps ties at the k-th
    weight; top-p sorts ascending and drops tokens whose cumulative mass is <= (1 - top_p) of
    the total, always keeping the best). e: [r, V] with row max 1 -> [r]."""
    r, V = e.shape
    ks = [p.top_k if 0 < p.top_k < V else V for p in ps]
    if e.device.type != "cpu":
        return _cutoff_sorted(e, ks, [p.top_p for p in ps])
    # CPU: numpy per row (its SIMD sort/partition are many times faster than torch's), and
    # only over the tokens that can survive: a token below (1 - top_p) * total / V is dropped.
    z = e.sum(dim=-1).tolist() if any(k == V for k in ks) else [0.0] * r
    out = []
    for row, k, p, zi in zip(e.numpy(), ks, ps, z, strict=True):
        rest, thr_k = 0.0, 0.0
        if k < V:
            thr_k = float(np.partition(row, V - k)[V - k])
            cand = row[row >= thr_k]
            zi = float(cand.sum())
        else:  # try a tight guess first: compaction is cheap when few tokens pass
            lo = 0.5 * (1.0 - p.top_p) * zi / V
            for bound in (max(lo, 2.0**-10), lo):
                cand = row[row >= bound]
                rest = zi - float(cand.sum())
                if rest <= (1.0 - p.top_p) * zi:  # everything left out is dropped anyway
                    break
        if p.top_p >= 1.0:
            out.append(thr_k)
            continue
        cand = np.sort(cand)
        n_drop = int(np.searchsorted(np.cumsum(cand), (1.0 - p.top_p) * zi - rest, side="right"))
        out.append(max(thr_k, float(cand[min(n_drop, cand.size - 1)])))
    return torch.tensor(out)


def _cutoff_sorted(e: torch.Tensor, ks: list[int], top_p: list[float]) -> torch.Tensor:
    """`_cutoff` by one batched sort (accelerators)."""
    V = e.shape[1]
    k = torch.tensor(ks, device=e.device)
    p = torch.tensor(top_p, device=e.device)
    s = e.sort(dim=-1).values  # [r, V] ascending
    thr_k = s.gather(1, (V - k).unsqueeze(1))  # [r, 1]
    s = s * (s >= thr_k)
    cum = s.cumsum(dim=-1)
    n_drop = torch.searchsorted(cum, ((1.0 - p) * cum[:, -1]).unsqueeze(1), right=True)
    thr_p = s.gather(1, n_drop.clamp(max=V - 1))
    return torch.where(p < 1.0, torch.maximum(thr_k, thr_p).squeeze(1), thr_k.squeeze(1))


def _penalize_(x: torch.Tensor, rows: dict[int, SamplingRow]) -> None:
    """In place on the given rows of x: repetition penalty over prompt+output ids (HF: divide
    positive logits, multiply negative ones), then frequency and presence penalties over
    output ids (OpenAI). Touches only the ids that occur; cost ~ number of ids, not B * V."""
    B, V = x.shape
    dev, xf = x.device, x.view(-1)

    def per_row(attr: str, default: float) -> torch.Tensor:  # [B], default for other rows
        vals = [getattr(rows[i].params, attr) if i in rows else default for i in range(B)]
        return torch.tensor(vals, device=dev)

    out_keys, counts = torch.unique(
        _flat_keys({i: r.output_token_ids for i, r in rows.items()}, V, dev), return_counts=True)
    rep = {i: r for i, r in rows.items() if r.params.repetition_penalty != 1.0}
    if rep:
        seen = torch.unique(torch.cat(
            [out_keys, _flat_keys({i: r.prompt_token_ids for i, r in rep.items()}, V, dev)]))
        rp, v = per_row("repetition_penalty", 1.0)[seen // V], xf[seen]
        xf[seen] = torch.where(v > 0, v / rp, v * rp)
    row = out_keys // V
    pen = per_row("frequency_penalty", 0.0)[row] * counts + per_row("presence_penalty", 0.0)[row]
    xf.index_add_(0, out_keys, -pen)


def _flat_keys(ids: dict[int, Sequence[int]], V: int, dev: torch.device) -> torch.Tensor:
    """Flat indices row * V + token of ragged id lists (ids outside [0, V) are dropped)."""
    lens = [len(t) for t in ids.values()]
    tok = np.fromiter(chain.from_iterable(ids.values()), dtype=np.int64, count=sum(lens))
    row = np.repeat(np.fromiter(ids, dtype=np.int64, count=len(ids)), lens)
    ok = (tok >= 0) & (tok < V)
    return torch.from_numpy(row[ok] * V + tok[ok]).to(dev)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp; the clamp keeps exp off its slow underflow path. [b, V] -> [b]."""
    m = x.amax(dim=-1, keepdim=True)
    return (x - m).clamp_(min=-87.0).exp_().sum(dim=-1).log_() + m.squeeze(1)


def _block(x: torch.Tensor) -> int:
    """Block width for the two-level reductions below (0: use torch's kernel directly)."""
    V = x.shape[1]
    blk = min(V & -V, 128)  # largest power of two dividing V, at most 128
    return blk if x.device.type == "cpu" and blk >= 16 and V >= 4 * blk else 0


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax (first maximum). On CPU via block maxima: torch's argmax there is ~10x slower
    than amax. x: [b, V] -> [b]."""
    b, V = x.shape
    blk = _block(x)
    if not blk or b == 0:
        return x.argmax(dim=-1)
    xb = x.reshape(b, V // blk, blk)  # [b, n_blocks, blk]
    best_blk = xb.amax(dim=-1).argmax(dim=-1)  # first block holding the maximum
    inner = xb[torch.arange(b), best_blk].argmax(dim=-1)  # first maximum inside it
    return best_blk * blk + inner


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row top-k (values, ids), best first. On CPU the k best lie in the k blocks with the best
    maxima, so only those are searched. x: [b, V] -> ([b, k], [b, k])."""
    b, V = x.shape
    blk = _block(x)
    if not blk or k * blk * 4 > V:
        return x.topk(k, dim=-1)
    xb = x.reshape(b, V // blk, blk)
    blocks = xb.amax(dim=-1).topk(k, dim=-1).indices  # [b, k]
    cand = xb.gather(1, blocks.unsqueeze(2).expand(b, k, blk)).reshape(b, k * blk)
    vals, pos = cand.topk(k, dim=-1)
    ids = blocks.gather(1, pos // blk) * blk + pos % blk
    return vals, ids


