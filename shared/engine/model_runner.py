"""SchedulerOutput -> flat tensors -> forward -> float32 logits of the sampling rows -> Sampler.

Flat batch layout (T tokens): rows [0, B) are the 1-token entries (decodes), then one segment
per multi-token prefill chunk. All index tensors (cache rows to write, head-block tiles to
gather, masks) are built once per step on the host, vectorized over the batch, moved to the
device once, and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from shared.engine.attention import AttentionMetadata, PrefillSegment
from shared.engine.kv_cache import KVCache
from shared.engine.scheduler import SchedulerOutput
from shared.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler, dtype: torch.dtype,
                 device: torch.device):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler
        self.dtype, self.device = dtype, device
        self.block_size = kv_cache.block_size
        self.n_kv = kv_cache.num_kv_heads
        self._arange_bs = torch.arange(self.block_size)
        self._arange_kv = torch.arange(self.n_kv)
        model.bind_kv_cache(kv_cache.layers)
        self.capture_logits = False  # debugging / tests: keep the last step's logits
        self.last_logits: torch.Tensor | None = None

    # --- inputs --------------------------------------------------------------------------
    def _slots(self, block_table: list[int], end: int) -> torch.Tensor:
        """Flat cache slots of token positions [0, end) of one sequence: `[end]` long."""
        bt = torch.tensor(block_table[: -(-end // self.block_size)], dtype=torch.long)
        return (bt[:, None] * self.block_size + self._arange_bs).flatten()[:end]

    def _tiles(self, bt: torch.Tensor) -> torch.Tensor:
        """Block ids `[..., nb]` -> head-block tile ids `[..., n_kv, nb]` (kv_cache.py)."""
        return bt.unsqueeze(-2) * self.n_kv + self._arange_kv[:, None]

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """-> input_ids [T], positions [T], metadata, flat row of each sampling entry (sched order)."""
        bs, dev = self.block_size, self.device
        order = ([i for i, n in enumerate(sched.num_new_tokens) if n == 1]
                 + [i for i, n in enumerate(sched.num_new_tokens) if n > 1])
        nd = sum(1 for n in sched.num_new_tokens if n == 1)
        ids: list[int] = []
        pos: list[int] = []
        slot_parts = []
        flat_row = [0] * len(sched.seqs)
        meta = AttentionMetadata(write_rows=None, num_decodes=nd)
        if nd:  # decodes: one query each, context [0, pos]
            dec = [sched.seqs[i] for i in order[:nd]]
            pos = [s.num_computed_tokens for s in dec]
            ids = [s.token_ids[p] for s, p in zip(dec, pos, strict=True)]
            nb = max(pos) // bs + 1
            bt = torch.tensor([s.block_table[:nb] + [0] * (nb - len(s.block_table[:nb])) for s in dec],
                              dtype=torch.long)  # [B, nb]
            pos_t = torch.tensor(pos, dtype=torch.long)
            slot_parts.append(bt.gather(1, (pos_t // bs)[:, None]).squeeze(1) * bs + pos_t % bs)
            bias = torch.zeros(nd, nb * bs, dtype=self.dtype)
            bias.masked_fill_(torch.arange(nb * bs)[None, :] > pos_t[:, None], float("-inf"))
            meta.decode_tiles = self._tiles(bt).flatten().to(dev)  # [B * n_kv * nb]
            meta.decode_bias = bias.view(nd, 1, 1, nb * bs).to(dev)
            for row, i in enumerate(order[:nd]):
                flat_row[i] = row
        for i in order[nd:]:
            s, n = sched.seqs[i], sched.num_new_tokens[i]
            start, end = s.num_computed_tokens, s.num_computed_tokens + n
            row0 = len(ids)
            ids.extend(s.token_ids[start:end])
            pos.extend(range(start, end))
            slot_parts.append(self._slots(s.block_table, end)[start:])
            seg = PrefillSegment(row0, n)
            if start > 0:
                bt = torch.tensor(s.block_table[: -(-end // bs)], dtype=torch.long)
                seg.ctx_tiles, seg.ctx_len = self._tiles(bt).flatten().to(dev), end
                seg.mask = (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]).to(dev)
            meta.prefills.append(seg)
            flat_row[i] = row0 + n - 1
        slots = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]  # [T]
        rows = ((slots // bs * self.n_kv)[:, None] + self._arange_kv) * bs + (slots % bs)[:, None]
        meta.write_rows = rows.flatten().to(dev)  # [T * n_kv], (token, head) order
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        sample_rows = [flat_row[i] for i, smp in enumerate(sched.sample) if smp]
        return input_ids, positions, meta, sample_rows

    def _inputs_embeds(self, sched: SchedulerOutput, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings with rows inside an MMInput range replaced by its embeds (a prefill
        chunk may cover any part of an image). None when no scheduled token is multimodal."""
        if not any(s.mm_inputs for s in sched.seqs):
            return None
        embeds = self.model.embed_tokens(input_ids)  # [T, hidden]
        first_row = self._rows_by_seq(sched)
        for s, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            start, row0 = s.num_computed_tokens, first_row[id(s)]
            for mm in s.mm_inputs:  # overlap of [start, start+n) with the image's positions
                a, b = max(start, mm.offset), min(start + n, mm.end)
                if a < b:
                    part = mm.embeds[a - mm.offset: b - mm.offset]  # [b - a, hidden]
                    embeds[row0 + a - start: row0 + b - start] = part.to(embeds.device, embeds.dtype)
        return embeds

    @staticmethod
    def _rows_by_seq(sched: SchedulerOutput) -> dict[int, int]:
        """First flat row of each scheduled sequence (same order as `prepare`)."""
        out, row = {}, 0
        for i, n in enumerate(sched.num_new_tokens):
            if n == 1:
                out[id(sched.seqs[i])] = row
                row += 1
        for i, n in enumerate(sched.num_new_tokens):
            if n > 1:
                out[id(sched.seqs[i])] = row
                row += n
        return out

    # --- execution -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Run the forward for `sched` (writes K/V); returns float32 logits `[R, vocab]` of the
        entries with `sample` set, in scheduler order, or None if none samples."""
        input_ids, positions, meta, sample_rows = self.prepare(sched)
        embeds = self._inputs_embeds(sched, input_ids)
        hidden = self.model(input_ids, positions, meta, inputs_embeds=embeds)  # [T, hidden]
        if not sample_rows:
            return None
        if sample_rows != list(range(len(sample_rows))):
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        else:
            hidden = hidden[: len(sample_rows)]
        logits = self.model.compute_logits(hidden)  # [R, V] float32
        if self.capture_logits:
            self.last_logits = logits.clone()
        return logits

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Seq[Sequence], logit_index: list[int]):
        """Sample one token per row; row j uses logits[logit_index[j]] (n>1 forks share one)."""
        if logit_index != list(range(logits.shape[0])):
            logits = logits[torch.tensor(logit_index, device=logits.device)]
        return self.sampler(logits, rows)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.kv_cache.copy_blocks(pairs)
