"""The kvcache service: keeps the global block index current from KV events and heartbeats.

    epd.kv.events     (KVEvent)   -> index.apply
    epd.ctl.heartbeat (Heartbeat) -> last-seen per worker; silent workers are dropped

The host-memory and disk tiers that blocks are swapped out to come with the KV hand-off work.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Gauge

from services.kvcache.index import BlockIndex
from shared.bus.work import subscribe_decoded
from shared.config import KVCacheConfig
from shared.logging import get_logger
from shared.protocol import Heartbeat, KVEvent
from shared.protocol import subjects as subj
from shared.service import ServiceContext

log = get_logger("kvcache")
INDEXED_BLOCKS = Gauge("epd_kvcache_indexed_blocks", "distinct block hashes in the global index")

WORKER_TIMEOUT_S = 10.0


class KVCacheService:
    name = "kvcache"

    def __init__(self, cfg: KVCacheConfig):
        self.cfg = cfg
        self.index = BlockIndex()
        self.last_seen: dict[str, float] = {}
        self.ctx: ServiceContext | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for subject, cls, handler in ((subj.kv_events_subject(), KVEvent, self.on_event),
                                      (subj.heartbeat_subject(), Heartbeat, self.on_heartbeat)):
            sub = await subscribe_decoded(ctx.nc, subject, cls, handler, service=self.name)
            ctx.stack.push_async_callback(sub.unsubscribe)
        ctx.spawn(self._expire_loop(), "kvcache-expire")

    async def on_event(self, ev: KVEvent) -> None:
        self.index.apply(ev.worker_id, ev.kind, ev.block_hashes, ev.tier)
        self.last_seen[ev.worker_id] = time.monotonic()
        INDEXED_BLOCKS.set(len(self.index))

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        self.last_seen[hb.worker_id] = time.monotonic()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(WORKER_TIMEOUT_S / 2)
            now = time.monotonic()
            for worker_id, seen in list(self.last_seen.items()):
                if now - seen > WORKER_TIMEOUT_S:
                    dropped = self.index.drop_worker(worker_id)
                    del self.last_seen[worker_id]
                    log.info("worker gone: blocks dropped from index", worker_id=worker_id, blocks=dropped)
            INDEXED_BLOCKS.set(len(self.index))

    async def health(self) -> tuple[bool, dict]:
        ok = bool(self.ctx and self.ctx.nc.is_connected)
        return ok, {"blocks": len(self.index), "workers": len(self.index.workers())}

    async def drain(self) -> None:
        return None
