"""Bus throughput benchmark: raw 1 MiB request/reply vs chunked transfer, same server, same run.

    python -m shared.bus.bench [--nats-url nats://...] [--total-mib 64] [--chunk-mib 1]

(a) raw: total/chunk core-NATS requests, `window` in flight; each request is a few bytes
    and each reply carries one chunk of bytes (the direction of a chunked fetch), no codec.
(b) chunked: ChunkServer.offer(payload) + fetch(window) of the whole payload: msgpack
    envelope, reassembly and sha256 verification included.
Without --nats-url an embedded nats-server (shared.bus.embedded) is started with
max_payload = chunk + 64 KiB so a full chunk fits in one message (the default max_payload is
exactly 1 MiB, which leaves no room for the chunk envelope). Prints JSON.
Also `epd bench bus` (services/cli.py) through `bench_main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

from shared.bus.chunked import HEADROOM, ChunkServer, fetch
from shared.bus.connection import connect, server_max_payload

MIB = 1024 * 1024


async def _raw(nc_req, nc_rep, subject: str, size: int, count: int, window: int) -> float:
    """Seconds for `count` request/replies of `size`-byte replies, `window` in flight."""
    blob = os.urandom(size)

    async def respond(msg) -> None:
        await msg.respond(blob)

    sub = await nc_rep.subscribe(subject, cb=respond)
    await nc_rep.flush()
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        async with sem:
            resp = await nc_req.request(subject, b"x", timeout=10)
            assert len(resp.data) == size

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed


async def run_bus_bench(url: str, total_mib: int = 64, chunk_mib: float = 1, *,
                        window: int = 8, repeats: int = 3) -> dict:
    """Measure raw vs chunked throughput against a live server at `url`; returns a dict.
    Raises nats errors if the server is unreachable."""
    holder = await connect(url, "bench-holder", pending_size=64 * MIB)
    puller = await connect(url, "bench-puller", pending_size=64 * MIB)
    try:
        max_payload = server_max_payload(holder)
        chunk = min(int(chunk_mib * MIB), max_payload - HEADROOM)
        total = total_mib * MIB
        count = -(-total // chunk)
        raw_s = [await _raw(puller, holder, "epd.bench.raw", chunk, count, window)
                 for _ in range(repeats + 1)][1:]  # first run warms up
        payload = os.urandom(total)
        async with ChunkServer(holder, "epd.bench.xfer", chunk_size=chunk) as cs:
            t0 = time.perf_counter()
            tid = cs.offer(payload)
            offer_s = time.perf_counter() - t0
            fetch_s = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                got = await fetch(puller, cs.subject, tid, window=window)
                fetch_s.append(time.perf_counter() - t0)
                assert len(got) == total
            fetch_s = fetch_s[1:]
            cs.release(tid)
    finally:
        await holder.close()
        await puller.close()

    def gbps(seconds: float, nbytes: int) -> float:
        return round(nbytes / seconds / 1e9, 3)

    raw_gbps = gbps(statistics.median(raw_s), count * chunk)
    chunked_gbps = gbps(statistics.median(fetch_s), total)
    return {
        "server_max_payload": max_payload,
        "message_bytes": chunk,
        "messages": count,
        "window": window,
        "repeats": repeats,
        "raw_request_reply": {"bytes": count * chunk, "median_s": round(statistics.median(raw_s), 4),
                              "gbps": raw_gbps, "best_gbps": gbps(min(raw_s), count * chunk)},
        "chunked_fetch": {"bytes": total, "median_s": round(statistics.median(fetch_s), 4),
                          "gbps": chunked_gbps, "best_gbps": gbps(min(fetch_s), total),
                          "offer_s": round(offer_s, 4)},
        "chunked_over_raw": round(chunked_gbps / raw_gbps, 3) if raw_gbps else None,
    }


async def bench_main(nats_url: str | None = None, total_mib: int = 64, chunk_mib: float = 1, *,
                     window: int = 8, repeats: int = 3) -> dict:
    """`run_bus_bench` on `nats_url`, or on an embedded nats-server started (and stopped)
    here with max_payload = chunk + 64 KiB when no URL is given. Returns the result dict."""
    if nats_url:
        result = await run_bus_bench(nats_url, total_mib, chunk_mib, window=window, repeats=repeats)
        result["server"] = f"external {nats_url} (its own max_payload)"
        return result
    from shared.bus.embedded import EmbeddedNats

    max_payload = int(chunk_mib * MIB) + 64 * 1024
    with tempfile.TemporaryDirectory(prefix="epd-bench-") as tmp:
        srv = EmbeddedNats(tmp, max_payload=max_payload)
        await asyncio.to_thread(srv.start)
        try:
            result = await run_bus_bench(srv.url, total_mib, chunk_mib, window=window,
                                         repeats=repeats)
        finally:
            await asyncio.to_thread(srv.stop)
    result["server"] = f"embedded nats-server, max_payload={max_payload} (chunk + 64 KiB)"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats-url", default="", help="server to use [default: start an embedded one]")
    ap.add_argument("--total-mib", type=int, default=64)
    ap.add_argument("--chunk-mib", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from shared.logging import configure

    configure(level="warning")
    coro = bench_main(args.nats_url, args.total_mib, args.chunk_mib, window=args.window,
                      repeats=args.repeats)
    try:
        import uvloop  # what the services run on

        result, loop_name = uvloop.run(coro), "uvloop"
    except ImportError:
        result, loop_name = asyncio.run(coro), "asyncio"
    result["event_loop"] = loop_name
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
