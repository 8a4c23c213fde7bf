"""LLMEngine: the in-process engine. Requests in, per-step token deltas out.

    add_request / import_kv -> Scheduler (waiting / running) -> step():
        schedule -> ModelRunner.execute (forward, K/V written) -> Scheduler.update (counters,
        prefix-cache commit) -> fork n>1 children -> sample -> append token, stop checks
        -> one RequestOutput delta per sequence that got a token

Stage API for disaggregated serving (E, P and D in different processes):
    E: encode_images(images) -> [ImageFeatures(hash, embeds)] (LRU-cached by content hash)
    P: add_request(..., mm_inputs=features, prefill_only=True); step() returns the first
       token(s) and PARKS the request (blocks pinned); export_kv(); release().
    D: missing_blocks(hashes) -> import_kv(..., kv, mm_inputs=features) (kv=None: recompute
       locally, which needs the features) -> step() ...
Images: multimodal.py. Text / stop state: outputs.py. K/V hand-off: kv_handoff.py.
"""

from __future__ import annotations

import random
import time

from shared.engine.block_manager import BlockManager
from shared.engine.config import EngineConfig
from shared.engine.device import resolve_device, resolve_dtype, set_num_threads
from shared.engine.errors import (
    InvalidRequestError,
    OutOfBlocksError,
    PromptTooLongError,
    UnknownRequestError,
)
from shared.engine.image_encoder import ImageEncoder
from shared.engine.kv_cache import KVCache
from shared.engine.kv_handoff import KVExport, kv_matches, read_kv, write_imported
from shared.engine.loader import load_hf_config, load_model
from shared.engine.model_runner import ModelRunner
from shared.engine.multimodal import ImageFeatures, MMInputs, admit
from shared.engine.outputs import (
    RequestOutput,
    check_stop,
    eos_token_ids,
    load_tokenizer,
    make_output,
    make_output_state,
)
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import ONLINE, PRIORITIES, RequestGroup, Sequence, SequenceStatus


class LLMEngine:
    """Owns model, KV cache, block manager, scheduler and sampler for one device.

    `tokenizer=None` loads the folder's tokenizer.json when present; `tokenizer=False` runs on
    token ids only (no text; stop strings rejected). `sampler` overrides the default
    `shared.engine.sampler.Sampler`. Not thread-safe: drive it from one thread."""

    def __init__(self, config: EngineConfig, tokenizer=None, sampler=None):
        self.config = config
        set_num_threads(config.num_threads)
        self.device, self.dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        self.hf_config = load_hf_config(config.model)
        self.max_model_len = config.resolve_max_model_len(self.hf_config.get_text_config().max_position_embeddings)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens: must be >= max_model_len ({self.max_model_len}) "
                             "when chunked prefill is disabled")
        self.model = m = load_model(config.model, self.dtype, self.device, self.max_model_len, self.hf_config,
                                    weight_quant=config.weight_quant)
        bs = config.block_size
        self.num_kv_blocks = config.resolve_num_kv_blocks(
            KVCache.bytes_per_block(m.num_layers, bs, m.num_kv_heads, m.head_dim, self.dtype))
        self.kv_cache = KVCache(m.num_layers, self.num_kv_blocks, bs, m.num_kv_heads, m.head_dim,
                                self.dtype, self.device)
        self.block_manager = BlockManager(self.num_kv_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.tokenizer = (load_tokenizer(config.model) if tokenizer is None else tokenizer) or None
        self.vocab_size = m.vocab_size
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.hf_config, config.model)
        if sampler is None:
            from shared.engine.sampler import Sampler

            sampler = Sampler(self.vocab_size, sorted(self.eos_token_ids))
        self.runner = ModelRunner(m, self.kv_cache, sampler, self.dtype, self.device)
        self.image_encoder = ImageEncoder.for_model(m, config)  # None: a text-only model
        self._groups: dict[str, RequestGroup] = {}
        self._rng = random.Random(config.seed)
        self._last_step_s = 0.0

    # --- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    images: list | None = None, mm_inputs: MMInputs | None = None,
                    priority: str = ONLINE, arrival_time: float | None = None,
                    prefill_only: bool = False) -> None:
        """Queue a request; later step() calls produce its n sequences' tokens.

        Images: `images` (encoded here) or `mm_inputs` (ImageFeatures from encode_images, or
        positioned MMInputs); see multimodal.admit for prompt expansion.
        Raises (and queues nothing) InvalidRequestError with `param` naming the field (empty
        prompt, ids out of vocab, duplicate id, bad params / priority / mm_inputs, bad images or
        image / image-token count mismatch ("image"), stop strings without a tokenizer),
        PromptTooLongError (prompt + max_tokens > max_model_len, counted after expansion),
        OutOfBlocksError (cannot fit the KV cache even alone). n > 1 samples share the prompt
        K/V (forked when its prefill samples). The seed is params.seed or drawn from the engine
        RNG and kept on the sequences. `prefill_only`: park after the first token (export_kv)."""
        seqs = self._new_seqs(request_id, prompt_token_ids, params, None, images, mm_inputs,
                              priority, arrival_time, prefill_only)
        self._groups[request_id] = RequestGroup(request_id, seqs, unforked=seqs[1:])
        self.scheduler.add(seqs[0])

    def encode_images(self, images: list) -> list[ImageFeatures]:
        """The E stage: one ImageFeatures(hash, embeds [n_tokens, hidden]) per image (bytes, PIL
        or pixel tensor [3, H, W]); vision tower batched over images not in the LRU cache.
        InvalidRequestError(param="image"): bad / too many images, or a text-only model."""
        if self.image_encoder is None:
            raise InvalidRequestError("this model does not accept images", param="image")
        return self.image_encoder.encode(images)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish the request's unfinished sequences with reason "abort", free all its blocks
        and forget it. Returns their final outputs; unknown or finished ids: no-op ([])."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return []
        outs = []
        for s in group.seqs:
            if not s.is_finished:
                s.status, s.finish_reason = SequenceStatus.FINISHED, "abort"
                outs.append(make_output(s, [], "", None, None))
            self.scheduler.remove(s)
        return outs

    def release(self, request_id: str) -> None:
        """Forget a (parked, exported) request without output: its blocks are unpinned and the
        full ones stay in the prefix cache as cached-free. No-op for unknown ids."""
        self.abort(request_id)

    def preempt_offline(self, max_seqs: int | None = None) -> int:
        """Preempt (by recompute) running offline sequences, newest first; returns how many."""
        return len(self.scheduler.preempt_offline(max_seqs))

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return one delta per sequence that got a token this
        step ([] when nothing is runnable). Finished sequences free their blocks."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        logits = self.runner.execute(sched)
        self.scheduler.update(sched)
        rows, index, sampled_groups = [], [], []
        for seq in (s for s, smp in zip(sched.seqs, sched.sample, strict=True) if smp):
            group = self._groups[seq.request_id]
            sampled_groups.append(group)
            kids = group.unforked if seq.seq_index == 0 else []
            for s in [seq, *kids]:
                rows.append(s)
                index.append(len(sampled_groups) - 1)
            if kids and not seq.prefill_only:
                self._fork(seq, kids)
            group.unforked = []
        outs = []
        if rows:
            res = self.runner.sample(logits, rows, index)
            for j, s in enumerate(rows):
                outs.append(self._on_token(s, res.token_ids[j], res.logprobs[j], res.top_logprobs[j]))
        for group in sampled_groups:
            self._settle(group)
        self._last_step_s = time.perf_counter() - t0
        return outs

    def _fork(self, parent: Sequence, kids: list[Sequence]) -> None:
        for child in kids:
            copies = self.block_manager.fork(parent, child)
            if copies is None:  # no block for the partial copy: recompute later instead
                self.scheduler.add(child)
            else:
                self.runner.copy_blocks(copies)
                self.scheduler.add_running(child)

    def _on_token(self, seq: Sequence, tok: int, lp, top) -> RequestOutput:
        seq.append_token(tok)
        text = check_stop(seq, tok, self.eos_token_ids, self.max_model_len)
        if seq.is_finished and not seq.prefill_only:
            self.scheduler.remove(seq)
        elif not seq.is_finished and seq.prefill_only:
            seq.status = SequenceStatus.PARKED
        return make_output(seq, [tok], text, lp, top)

    def _settle(self, group: RequestGroup) -> None:
        """After a group sampled: park a prefill-only parent (blocks pinned); forget finished
        groups (a finished prefill-only group frees the parent's pinned blocks)."""
        parent = group.seqs[0]
        if parent.prefill_only and parent in self.scheduler.running:
            self.scheduler.running.remove(parent)
        if group.finished and self._groups.get(group.request_id) is group:
            del self._groups[group.request_id]
            self.block_manager.free(parent)

    # --- validation ----------------------------------------------------------------------
    def _new_seqs(self, request_id, prompt, params, seed, images, mm_inputs, priority, arrival,
                  prefill_only) -> list[Sequence]:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if request_id in self._groups:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams", param="params")
        if priority not in PRIORITIES:
            raise InvalidRequestError(f"priority must be one of {PRIORITIES}", param="priority")
        self._check_ids(prompt, "prompt")
        prompt, mm_inputs = admit(self.image_encoder, prompt, images, mm_inputs, self.model.hidden_size)
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were requested ({len(prompt)} prompt + {params.max_tokens} max_tokens)",
                param="prompt")
        if -(-total // self.config.block_size) > self.num_kv_blocks:
            raise OutOfBlocksError(f"{total} tokens need more than the {self.num_kv_blocks} KV blocks")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", param="stop")
        seed = seed if seed is not None else params.seed
        seed = seed if seed is not None else self._rng.randrange(2**63)
        arrival = time.monotonic() if arrival is None else arrival
        seqs = [Sequence(request_id, i, list(prompt), len(prompt), params, seed, priority, arrival,
                         list(mm_inputs), prefill_only) for i in range(params.n)]
        for s in seqs:
            s.out_state = make_output_state(self.tokenizer, s)
        return seqs

    def _check_ids(self, ids, param: str) -> None:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise InvalidRequestError(f"{param} must be a non-empty list of token ids", param=param)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"{param} has token ids outside [0, {self.vocab_size})", param=param)

    # --- stage API: K/V hand-off ---------------------------------------------------------
    def missing_blocks(self, block_hashes: list[str]) -> list[int]:
        """Indices of the blocks this engine does not hold: fetch only those for import_kv."""
        return self.block_manager.missing_blocks(block_hashes)

    def export_kv(self, request_id: str, block_indices: list[int] | None = None) -> KVExport:
        """Copy the prompt K/V of a request whose prompt is computed (e.g. parked after
        prefill_only). Raises UnknownRequestError, or InvalidRequestError if not computed."""
        group = self._groups.get(request_id)
        if group is None:
            raise UnknownRequestError(request_id)
        seq = group.seqs[0]
        if not seq.block_table or seq.num_computed_tokens < seq.num_prompt_tokens:
            raise InvalidRequestError(f"prompt K/V of {request_id!r} is not computed here", param="request_id")
        return read_kv(self.block_manager, self.kv_cache, seq, block_indices)

    def import_kv(self, request_id: str, prompt_token_ids: list[int], first_token_ids: list[int],
                  params: SamplingParams, kv: KVExport | None, seed: int, *,
                  images: list | None = None, mm_inputs: MMInputs | None = None,
                  priority: str = ONLINE, arrival_time: float | None = None) -> None:
        """Continue a request prefilled elsewhere: one first token per sample (already
        reported by the prefill stage, not reported again). Blocks cached here under the
        same hash are reused; the others are written from `kv`, which must carry them (see
        missing_blocks). With kv=None, or too few free blocks, or blocks missing from kv, the
        prompt is recomputed here instead: same tokens either way. Images as in add_request,
        the same as P's (they name the blocks; recompute and preemption need their embeds).
        Raises like add_request, plus InvalidRequestError(param="kv") if kv does not match."""
        self._check_ids(first_token_ids, "first_token_ids")
        if isinstance(params, SamplingParams) and len(first_token_ids) != params.n:
            raise InvalidRequestError("need one first token per sample (n)", param="first_token_ids")
        seqs = self._new_seqs(request_id, prompt_token_ids, params, seed, images, mm_inputs, priority,
                              arrival_time, False)
        parent = seqs[0]
        if kv is not None and not kv_matches(self.block_manager, parent, kv):
            raise InvalidRequestError("kv does not match the prompt (tokens, images or block size)", param="kv")
        for s, tok in zip(seqs, first_token_ids, strict=True):
            s.append_token(tok)
            check_stop(s, tok, self.eos_token_ids, self.max_model_len)  # replays text / stop state
        if all(s.is_finished for s in seqs):
            return
        self._groups[request_id] = RequestGroup(request_id, seqs)
        if kv is None or not write_imported(self.block_manager, self.kv_cache, parent, kv):
            for s in seqs:
                if not s.is_finished:
                    self.scheduler.add(s)
            return
        parent.num_computed_tokens = parent.num_prompt_tokens
        self.block_manager.commit(parent)
        self._fork(parent, [s for s in seqs[1:] if not s.is_finished])
        if parent.is_finished:  # it only lent its blocks to its siblings
            self.block_manager.free(parent)
        else:
            self.scheduler.add_running(parent)

    # --- introspection -------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """True while any sequence is waiting or running (parked ones do not count)."""
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        """Allocatable blocks (free + cached-free)."""
        return self.block_manager.num_free_blocks

    def check_integrity(self) -> None:
        """AssertionError if blocks, queues and requests disagree (for tests and debugging)."""
        live = [s for g in self._groups.values() for s in g.seqs]
        queued = self.scheduler.running + [s for q in self.scheduler.waiting.values() for s in q]
        ids = {id(s) for s in live}
        for s in queued:
            assert id(s) in ids, f"{s!r} is queued but belongs to no request"
        for s in self.scheduler.running:
            assert s.status is SequenceStatus.RUNNING and s.block_table, f"bad running {s!r}"
        for q in self.scheduler.waiting.values():
            for s in q:
                assert not s.block_table, f"waiting {s!r} holds blocks"
        self.block_manager.check_integrity(live)

    def stats(self) -> dict:
        """Queue and block counts, last step time, and image cache counters (mm_cache_*)."""
        mm = self.image_encoder.stats() if self.image_encoder is not None else {}
        bm, parked = self.block_manager, SequenceStatus.PARKED
        return mm | {
            "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
            "parked": sum(1 for g in self._groups.values() if g.seqs[0].status is parked),
            "free_blocks": bm.num_free_blocks, "cached_free_blocks": bm.num_cached_free_blocks,
            "num_blocks": self.num_kv_blocks, "last_step_s": self._last_step_s,
        }

    def model_parameters(self):
        """The model's parameters (tied weights once)."""
        return self.model.parameters()
