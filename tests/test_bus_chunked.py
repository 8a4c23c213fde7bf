"""Chunked transfer through a server whose max_payload (64 KiB) is far below the payload."""

from __future__ import annotations

import asyncio
import os

import pytest

from shared.bus.chunked import ChunkServer, TransferError, fetch
from shared.bus.connection import connect, server_max_payload
from tests.harness import NatsServer

SMALL = 64 * 1024


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with NatsServer(store_dir=tmp_path_factory.mktemp("nats-small"), max_payload=SMALL) as srv:
        yield srv


@pytest.fixture
async def pair(small_server):
    holder = await connect(small_server.url, "holder")
    puller = await connect(small_server.url, "puller")
    assert server_max_payload(holder) == SMALL
    async with ChunkServer(holder, worker_id="w-holder") as cs:
        yield cs, puller
    await holder.close()
    await puller.close()


async def test_5mib_round_trips_exactly(pair):
    cs, puller = pair
    payload = os.urandom(5 * 1024 * 1024 + 12345)
    assert cs.chunk_size <= SMALL - 1024
    tid = cs.offer(payload)
    got = await fetch(puller, cs.subject, tid, window=8)
    assert got == payload
    got1 = await fetch(puller, cs.subject, tid, window=1)  # still offered: fetch again
    assert got1 == payload
    cs.release(tid)
    with pytest.raises(TransferError, match="unknown"):
        await fetch(puller, cs.subject, tid)


async def test_small_and_empty_payloads(pair):
    cs, puller = pair
    for payload in (b"", b"x", bytes(range(256)) * 10, memoryview(bytearray(cs.chunk_size))):
        tid = cs.offer(payload)
        assert await fetch(puller, cs.subject, tid) == bytes(payload)


async def test_unknown_transfer_and_corruption_raise(pair):
    cs, puller = pair
    with pytest.raises(TransferError, match="unknown"):
        await fetch(puller, cs.subject, "no-such-transfer")
    for size in (300 * 1024, 6 * 1024 * 1024):  # hashed inline / in a worker thread
        buf = bytearray(os.urandom(size))
        tid = cs.offer(buf)
        buf[size - 100 * 1024] ^= 0xFF  # corrupted after the checksum was taken
        with pytest.raises(TransferError, match="sha256"):
            await fetch(puller, cs.subject, tid)


async def test_expired_transfer_raises(pair):
    cs, puller = pair
    tid = cs.offer(b"abc" * 1000, ttl=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(TransferError, match="expired"):
        await fetch(puller, cs.subject, tid)


async def test_no_holder_times_out_with_transfer_error(pair):
    _, puller = pair
    with pytest.raises(TransferError, match="no reply"):
        await fetch(puller, "epd.xfer.nobody", "t1", timeout=0.2, retries=1)


async def test_malformed_request_gets_error_reply_and_server_lives(pair):
    cs, puller = pair
    resp = await puller.request(cs.subject, b"\xc1garbage", timeout=2)
    assert b"malformed" in resp.data
    tid = cs.offer(b"still alive")
    assert await fetch(puller, cs.subject, tid) == b"still alive"
