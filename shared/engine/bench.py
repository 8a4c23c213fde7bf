"""`epd bench engine`: our engine vs transformers `generate` (and llama.cpp when installed),
same model, same prompts, one run, JSON out — with this machine's roofline so every figure is
also a fraction of what the hardware allows.

Each (engine, dtype) runs in its own spawned process so peak RSS is its own and one engine's
caches never help another. Prompts are random token ids (no special tokens) of a fixed length;
every engine generates exactly `gen_len` tokens (EOS ignored).

dtype "int8" is our engine in bfloat16 with int8 weight-only quantization (quant.py); other
engines skip it and its ratios are against transformers bfloat16. `profile` (or env
EPD_BENCH_PROFILE=folder) writes a torch.profiler op table of 4 decode steps per batch size
and of the prefill to `folder/epd-<dtype>-<what>.txt`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class BenchSpec:
    model: str
    batches: tuple[int, ...] = (1, 16, 64)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    engines: tuple[str, ...] = ("epd", "transformers", "llamacpp")
    prompt_len: int = 32
    gen_len: int = 64
    prefill_batch: int = 8
    prefill_len: int = 512
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    seed: int = 0
    profile: str | None = field(default_factory=lambda: os.environ.get("EPD_BENCH_PROFILE") or None)


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Stay clear of the first ids (special tokens in most vocabularies).
    return torch.randint(100, vocab - 1, (n, length), generator=g).tolist()


def roofline(threads: int) -> dict:
    """Measured memory bandwidth and matmul FLOP/s on this machine (best of a few runs)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    bw = 2 * src.numel() * 4 / best  # read + write
    out = {"mem_bw_gbs": round(bw / 1e9, 1)}
    for dt in ("float32", "bfloat16"):
        a = torch.randn(2048, 2048, dtype=getattr(torch, dt))
        b = torch.randn(2048, 2048, dtype=getattr(torch, dt))
        a @ b
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[f"matmul_{dt}_gflops"] = round(2 * 2048**3 / best / 1e9, 1)
    return out


def model_limits(roof: dict, n_params: int, dtype: str, batch: int) -> float:
    """Decode tok/s the roofline allows: weights read once per step, 2 FLOP per param per token."""
    step_mem_s = n_params * DTYPES[dtype] / (roof["mem_bw_gbs"] * 1e9)
    flops = roof["matmul_bfloat16_gflops" if dtype != "float32" else "matmul_float32_gflops"] * 1e9
    step_flop_s = 2 * n_params * batch / flops
    return batch / max(step_mem_s, step_flop_s)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _run_epd(spec: BenchSpec, dtype: str) -> dict:
    import torch

    from shared.engine.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams

    torch.set_num_threads(spec.threads)
    max_b = max(spec.batches)
    need = max_b * (spec.prompt_len + spec.gen_len) + spec.prefill_batch * spec.prefill_len
    quant = "int8" if dtype == "int8" else "none"
    engine = LLMEngine(EngineConfig(model=spec.model, dtype="bfloat16" if quant != "none" else dtype,
                                    num_kv_blocks=need // 16 + 64, max_num_seqs=max(max_b, spec.prefill_batch),
                                    max_num_batched_tokens=max(2048, spec.prefill_len), enable_prefix_caching=False,
                                    weight_quant=quant))
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=spec.gen_len, ignore_eos=True)
    rows = {}
    counter = 0

    def run(prompts, p):
        nonlocal counter
        for ids in prompts:
            counter += 1
            engine.add_request(f"r{counter}", ids, p)
        first = None
        t0 = time.perf_counter()
        n_out = 0
        while engine.has_unfinished():
            outs = engine.step()
            n_out += sum(len(o.new_token_ids) for o in outs)
            if first is None and n_out:
                first = time.perf_counter()
                if prof_name:  # after the first (prefill) step: profile a few decode steps
                    _profile(spec, f"epd-{dtype}-{prof_name}", lambda: [engine.step() for _ in range(4)])
        return t0, first, time.perf_counter(), n_out

    prof_name = None
    run(_prompts(vocab, 2, spec.prompt_len, 99), params)  # warm-up
    for b in spec.batches:
        t0, first, end, n_out = run(_prompts(vocab, b, spec.prompt_len, spec.seed), params)
        if spec.profile:  # a second, untimed run that profiles its decode steps
            prof_name = f"decode-b{b}"
            run(_prompts(vocab, b, spec.prompt_len, spec.seed + 1), params)
            prof_name = None
        rows[b] = {"output_tok_s": round(n_out / (end - t0), 1),
                   "tpot_ms": round((end - first) / max(spec.gen_len - 1, 1) * 1e3, 2),
                   "ttft_ms": round((first - t0) * 1e3, 1)}
    t0, _, end, _ = run(_prompts(vocab, spec.prefill_batch, spec.prefill_len, 7), SamplingParams(
        temperature=0.0, max_tokens=1, ignore_eos=True))
    prefill = round(spec.prefill_batch * spec.prefill_len / (end - t0), 1)
    if spec.profile:
        _profile(spec, f"epd-{dtype}-prefill", lambda: run(_prompts(vocab, spec.prefill_batch, spec.prefill_len, 8),
                                                          SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)))
    n_params = sum(p.numel() for p in engine.model_parameters())
    if quant != "none":  # quantized weights are buffers; the tied embedding is a parameter once
        n_params = sum(m.qweight.numel() for m in engine.model.modules() if hasattr(m, "qweight"))
        n_params += engine.model.model.embed_tokens.weight.numel() * (not engine.model.tie_word_embeddings)
    return {"batches": rows, "prefill_tok_s": prefill, "peak_rss_mb": _peak_rss_mb(), "n_params": n_params}


def _profile(spec: BenchSpec, name: str, fn) -> None:
    """Run fn under torch.profiler; write the op table (self CPU time) to spec.profile/name.txt."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    folder = Path(spec.profile)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def _run_transformers(spec: BenchSpec, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "int8":
        return {"skipped": "int8 is an epd-only mode (compare with bfloat16)"}

    torch.set_num_threads(spec.threads)
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=getattr(torch, dtype)).eval()
    vocab = model.config.vocab_size
    rows = {}

    def gen(ids, n):
        x = torch.tensor(ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
            t1 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
            return t1 - t0, time.perf_counter() - t1

    gen(_prompts(vocab, 2, spec.prompt_len, 99), 4)
    for b in spec.batches:
        ttft, total = gen(_prompts(vocab, b, spec.prompt_len, spec.seed), spec.gen_len)
        rows[b] = {"output_tok_s": round(b * spec.gen_len / total, 1),
                   "tpot_ms": round((total - ttft) / max(spec.gen_len - 1, 1) * 1e3, 2),
                   "ttft_ms": round(ttft * 1e3, 1)}
    ttft, _ = gen(_prompts(vocab, spec.prefill_batch, spec.prefill_len, 7), 1)
    return {"batches": rows, "prefill_tok_s": round(spec.prefill_batch * spec.prefill_len / ttft, 1),
            "peak_rss_mb": _peak_rss_mb()}


def _run_llamacpp(spec: BenchSpec, dtype: str) -> dict:
    """llama.cpp on the packaged Q4_1 GGUF (dtype ignored), if llama-cpp-python is installed."""
    from llama_cpp import Llama  # noqa: F401 - raises ImportError when absent

    from shared.engine.smollm2 import gguf_path

    llm = Llama(model_path=str(gguf_path()), n_ctx=4096, n_threads=spec.threads, n_batch=512, verbose=False)
    vocab = llm.n_vocab()
    rows = {}
    for b in [b for b in spec.batches if b == 1]:  # the Python binding decodes one sequence at a time
        ids = _prompts(vocab, b, spec.prompt_len, spec.seed)[0]
        t0 = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=spec.gen_len, temperature=0.0)
        dt = time.perf_counter() - t0
        rows[b] = {"output_tok_s": round(out["usage"]["completion_tokens"] / dt, 1)}
    return {"batches": rows, "peak_rss_mb": _peak_rss_mb(), "note": "Q4_1 GGUF, batch 1 only"}


RUNNERS = {"epd": _run_epd, "transformers": _run_transformers, "llamacpp": _run_llamacpp}


def _child(engine: str, spec: BenchSpec, dtype: str, q) -> None:
    try:
        q.put(RUNNERS[engine](spec, dtype))
    except ImportError as exc:
        q.put({"skipped": f"not installed: {exc.name or exc}"})
    except Exception as exc:  # report, don't hang the parent
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(engine: str, spec: BenchSpec, dtype: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(engine, spec, dtype, q))
    p.start()
    result = q.get()
    p.join()
    return result


def run_bench(spec: BenchSpec) -> dict:
    roof = roofline(spec.threads)
    report: dict = {"model": spec.model, "threads": spec.threads, "prompt_len": spec.prompt_len,
                    "gen_len": spec.gen_len, "roofline": roof, "results": {}}
    n_params = None
    for dtype in spec.dtypes:
        for engine in spec.engines:
            if engine == "llamacpp" and dtype != spec.dtypes[0]:
                continue
            res = run_isolated(engine, spec, dtype)
            n_params = res.pop("n_params", n_params)
            report["results"].setdefault(dtype, {})[engine] = res
    if n_params:
        report["n_params"] = n_params
        for dtype, engines in report["results"].items():
            limits = {b: model_limits(roof, n_params, dtype, b) for b in spec.batches}
            report["results"][dtype]["roofline_tok_s"] = {b: round(v, 1) for b, v in limits.items()}
            base_dt = "bfloat16" if dtype == "int8" else dtype
            base = report["results"].get(base_dt, {}).get("transformers", {}).get("batches", {})
            for name, res in engines.items():
                for b, row in res.get("batches", {}).items() if isinstance(res, dict) else ():
                    row["fraction_of_roofline"] = round(row["output_tok_s"] / limits[b], 3)
                    if name != "transformers" and b in base:
                        row["vs_transformers"] = round(row["output_tok_s"] / base[b]["output_tok_s"], 2)
    return report


def main(spec: BenchSpec, out: Path | None = None) -> dict:
    report = run_bench(spec)
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text)
    print(text)
    return report
