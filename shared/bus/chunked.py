"""Chunked transfer of payloads larger than the server's max payload (request/reply).

    holder                                   fetcher
    ChunkServer.offer(payload) -> tid  ...   fetch(nc, subject, tid)
      <- ChunkRequest(tid, 0)                  learns total, total_bytes, sha256, chunk size
      -> Chunk(tid, 0, total, ..., data)
      <- ChunkRequest(tid, 1..window)          `window` requests in flight, each reply is
      -> Chunk(tid, i, ...)                    written at offset i * chunk_size of one
      ...                                      preallocated buffer; the sha256 is fed the
    ChunkServer.release(tid)                   contiguous prefix as it fills, then checked

Chunk i covers payload[i*chunk_size : (i+1)*chunk_size]; every chunk but the last is exactly
chunk_size bytes. Every Chunk repeats total, total_bytes and the sha256 (hex) of the whole
payload; an unknown/expired transfer or bad index gets a Chunk with `error` set.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.bus.connection import server_max_payload
from shared.bus.work import DECODE_ERRORS
from shared.logging import get_logger
from shared.protocol.codec import decode, encode
from shared.protocol.errors import ProtocolError
from shared.protocol.messages import Chunk, ChunkRequest
from shared.protocol.subjects import xfer_subject

log = get_logger(__name__)

MAX_CHUNK = 1024 * 1024
HEADROOM = 1024  # msgpack envelope + ids + sha256 hex, well under this


class TransferError(Exception):
    """A chunked fetch failed: unknown/expired transfer, timeout, bad chunk or checksum."""


class _Transfer:
    __slots__ = ("view", "sha256", "total", "ttl", "expires_at")

    def __init__(self, view: memoryview, sha256: str, total: int, ttl: float) -> None:
        self.view, self.sha256, self.total, self.ttl = view, sha256, total, ttl
        self.expires_at = time.monotonic() + ttl


class ChunkServer:
    """Serves offered payloads chunk by chunk on one request/reply subject.

    `offer` keeps a reference (no copy) to the payload until `release` or until `ttl`
    seconds pass without a chunk request (sliding). Not thread-safe: use from the loop.
    """

    def __init__(self, nc: Client, subject: str | None = None, *, worker_id: str | None = None,
                 chunk_size: int | None = None, default_ttl: float = 60.0) -> None:
        if subject is None:
            if worker_id is None:
                raise ValueError("ChunkServer needs a subject or a worker_id")
            subject = xfer_subject(worker_id)
        self.nc = nc
        self.subject = subject
        limit = server_max_payload(nc) - HEADROOM
        self.chunk_size = min(chunk_size or MAX_CHUNK, limit)
        if self.chunk_size < 1:
            raise ValueError(f"server max_payload {server_max_payload(nc)} leaves no room for chunks")
        self.default_ttl = default_ttl
        self._transfers: dict[str, _Transfer] = {}
        self._sub: Subscription | None = None

    @property
    def held_bytes(self) -> int:
        return sum(t.view.nbytes for t in self._transfers.values())

    async def start(self) -> ChunkServer:
        """Subscribe and flush (requests sent after this returns reach it); a second call is a
        no-op. Raises nats errors (e.g. flush timeout) when the server is unreachable."""
        if self._sub is None:
            self._sub = await self.nc.subscribe(self.subject, cb=self._on_request)
            await self.nc.flush()
        return self

    async def stop(self) -> None:
        """Unsubscribe and forget every transfer. A second call is a no-op."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error as e:
                log.warning("chunk server unsubscribe failed", error=repr(e))
        self._transfers.clear()

    async def __aenter__(self) -> ChunkServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def offer(self, payload: bytes | bytearray | memoryview, transfer_id: str | None = None,
              ttl: float | None = None) -> str:
        """Make `payload` (any C-contiguous buffer) fetchable; returns its transfer id.
        Hashes it here (sha256, ~1 ms per MiB). The caller must not mutate the payload until
        it is released. Re-offering an id replaces it. Raises TypeError for a strided buffer."""
        self._expire()
        view = memoryview(payload).cast("B")
        tid = transfer_id or uuid.uuid4().hex
        total = max(1, -(-view.nbytes // self.chunk_size))
        digest = hashlib.sha256(view).hexdigest()
        self._transfers[tid] = _Transfer(view, digest, total, ttl or self.default_ttl)
        return tid

    def release(self, transfer_id: str) -> None:
        """Drop a transfer; later requests for it get an error. Unknown ids are a no-op."""
        self._transfers.pop(transfer_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for tid in [k for k, t in self._transfers.items() if t.expires_at <= now]:
            del self._transfers[tid]

    def _reply_for(self, req: ChunkRequest) -> Chunk:
        t = self._transfers.get(req.transfer_id)
        now = time.monotonic()
        if t is None or t.expires_at <= now:
            self._transfers.pop(req.transfer_id, None)
            return Chunk(transfer_id=req.transfer_id, index=req.index, error="unknown or expired transfer")
        if not 0 <= req.index < t.total:
            return Chunk(transfer_id=req.transfer_id, index=req.index, total=t.total,
                         error=f"chunk index {req.index} out of range [0, {t.total})")
        t.expires_at = now + t.ttl
        start = req.index * self.chunk_size
        return Chunk(transfer_id=req.transfer_id, index=req.index, total=t.total,
                     total_bytes=t.view.nbytes, sha256=t.sha256,
                     data=t.view[start:start + self.chunk_size])

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            req = decode(msg.data, expected=ChunkRequest)
        except ProtocolError as e:
            DECODE_ERRORS.labels("xfer", e.code).inc()
            log.warning("malformed chunk request", code=e.code, error=str(e)[:200])
            reply = Chunk(transfer_id="", index=0, error=f"malformed request: {e.code}")
        else:
            reply = self._reply_for(req)
        try:
            await msg.respond(encode(reply))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the fetcher retries; the server lives on
            log.warning("chunk reply failed", error=repr(e), index=reply.index)


async def _request_chunk(nc: Client, subject: str, transfer_id: str, index: int,
                         timeout: float, retries: int) -> Chunk:
    """One chunk, retried on timeout / no responders up to `retries` times."""
    data = encode(ChunkRequest(transfer_id=transfer_id, index=index))
    for attempt in range(retries + 1):
        try:
            resp = await nc.request(subject, data, timeout=timeout)
            break
        except (asyncio.TimeoutError, nats.errors.NoRespondersError) as e:
            if attempt == retries:
                raise TransferError(f"chunk {index} of {transfer_id}: no reply after "
                                    f"{retries + 1} tries ({type(e).__name__})") from e
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
    try:
        chunk = decode(resp.data, expected=Chunk)
    except ProtocolError as e:
        raise TransferError(f"chunk {index} of {transfer_id}: bad reply ({e.code})") from e
    if chunk.error is not None:
        raise TransferError(f"chunk {index} of {transfer_id}: {chunk.error}")
    if chunk.index != index or chunk.transfer_id != transfer_id:
        raise TransferError(f"asked chunk {index} of {transfer_id}, got {chunk.index} of {chunk.transfer_id}")
    return chunk


async def fetch(nc: Client, subject: str, transfer_id: str, *, window: int = 8,
                timeout: float = 5.0, retries: int = 2) -> bytearray:
    """Fetch a whole offered payload with `window` chunk requests in flight.

    Returns a new bytearray (writable: `torch.frombuffer` takes it without a copy).
    `timeout` bounds each chunk request, retried `retries` times. Raises TransferError on
    an unknown transfer, a missing/inconsistent chunk, a length or sha256 mismatch.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    first = await _request_chunk(nc, subject, transfer_id, 0, timeout, retries)
    total, total_bytes, digest = first.total, first.total_bytes, first.sha256
    size = len(first.data)
    if total < 1 or total_bytes < 0 or (total > 1 and size * (total - 1) >= total_bytes) \
            or (total == 1 and size != total_bytes):
        raise TransferError(f"{transfer_id}: inconsistent header total={total} "
                            f"total_bytes={total_bytes} chunk={size}")
    buf = bytearray(total_bytes)
    view = memoryview(buf)
    hasher = hashlib.sha256()
    landed = bytearray(total)  # 1 where chunk i is in place
    hashed = 0  # chunks [0, hashed) are fed to the hash: it runs while replies are awaited

    def place(c: Chunk) -> None:
        nonlocal hashed
        start = c.index * size
        want = min(size, total_bytes - start)
        if (c.total, c.total_bytes, c.sha256) != (total, total_bytes, digest) or len(c.data) != want:
            raise TransferError(f"{transfer_id}: chunk {c.index} does not match the transfer")
        view[start:start + want] = c.data
        landed[c.index] = 1
        while hashed < total and landed[hashed]:
            hasher.update(view[hashed * size:(hashed + 1) * size])
            hashed += 1

    place(first)
    pending: set[asyncio.Task[Chunk]] = set()
    next_index = 1
    try:
        while next_index < total or pending:
            while next_index < total and len(pending) < window:
                pending.add(asyncio.create_task(
                    _request_chunk(nc, subject, transfer_id, next_index, timeout, retries)))
                next_index += 1
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                place(task.result())
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    got = hasher.hexdigest()
    if got != digest:
        raise TransferError(f"{transfer_id}: sha256 mismatch (got {got[:12]}, want {digest[:12]})")
    return buf
