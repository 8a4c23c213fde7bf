"""The scheduler service: worker registry from heartbeats, role assignment, failure detection.

    epd.ctl.heartbeat --> registry (memory) --> bucket epd_workers (survives a restart)
    every interval:  expire silent workers; policy(registry) -> RoleCommand on epd.ctl.role.<w>,
                     recorded in bucket epd_roles with a rising epoch per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.js.errors import KeyNotFoundError, NoKeysError

from services.scheduler.policy import RoleDecision, static_policy
from services.scheduler.registry import WorkerRegistry
from shared import metrics
from shared.bus.work import subscribe_decoded
from shared.config import SchedulerConfig
from shared.logging import get_logger
from shared.protocol import Heartbeat, RoleCommand, decode, encode
from shared.protocol import subjects as subj
from shared.service import ServiceContext

log = get_logger("scheduler")


class SchedulerService:
    name = "scheduler"

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.registry = WorkerRegistry(cfg.heartbeat_timeout_s)
        self.epochs: dict[str, int] = {}
        self.ctx: ServiceContext | None = None
        self.workers_kv = None
        self.roles_kv = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.workers_kv = await ctx.js.key_value(subj.WORKERS_BUCKET)
        self.roles_kv = await ctx.js.key_value(subj.ROLES_BUCKET)
        await self._restore()
        sub = await subscribe_decoded(ctx.nc, subj.heartbeat_subject(), Heartbeat, self.on_heartbeat,
                                      service=self.name)
        ctx.stack.push_async_callback(_unsubscribe, sub)
        ctx.spawn(self._loop(), "scheduler-loop")

    async def _restore(self) -> None:
        """Rebuild epochs and the registry from the buckets (a restarted scheduler resumes)."""
        now = time.monotonic()
        for kv, on_value in ((self.roles_kv, self._restore_role), (self.workers_kv, self._restore_worker)):
            try:
                keys = await kv.keys()
            except NoKeysError:
                continue
            for key in keys:
                with contextlib.suppress(KeyNotFoundError):
                    entry = await kv.get(key)
                    if entry.value:
                        on_value(decode(entry.value), now)

    def _restore_role(self, cmd: RoleCommand, _now: float) -> None:
        self.epochs[cmd.worker_id] = max(self.epochs.get(cmd.worker_id, 0), cmd.epoch)

    def _restore_worker(self, hb: Heartbeat, now: float) -> None:
        self.registry.observe(hb, now)

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        metrics.HEARTBEATS.inc()
        if self.registry.observe(hb, time.monotonic()):
            await self.workers_kv.put(hb.worker_id, encode(hb))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.tick(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler tick failed")

    async def tick(self, now: float) -> list[RoleDecision]:
        for dead in self.registry.expire(now):
            log.warning("worker lost", worker_id=dead.worker_id, role=dead.role,
                        silent_s=round(now - dead.last_seen, 1))
            with contextlib.suppress(Exception):
                await self.workers_kv.delete(dead.worker_id)
        by_role = self.registry.by_role()
        for role in ("encode", "prefill", "decode", "mixed"):
            metrics.WORKERS.labels(role).set(len(by_role.get(role, [])))
        decisions = static_policy(list(self.registry.workers.values()), self.cfg.layout_counts)
        for d in decisions:
            await self.command(d)
        return decisions

    async def command(self, d: RoleDecision) -> None:
        epoch = self.epochs.get(d.worker_id, 0) + 1
        self.epochs[d.worker_id] = epoch
        cmd = RoleCommand(worker_id=d.worker_id, role=d.to_role, epoch=epoch, reason=d.reason)
        await self.roles_kv.put(d.worker_id, encode(cmd))
        await self.ctx.nc.publish(subj.role_subject(d.worker_id), encode(cmd))
        metrics.ROLE_COMMANDS.labels(d.to_role, "static").inc()
        log.info("role command", worker_id=d.worker_id, from_role=d.from_role, to_role=d.to_role,
                 epoch=epoch, reason=d.reason)
        # Reflect the intent at once so the next tick doesn't repeat it before the heartbeat.
        w = self.registry.workers.get(d.worker_id)
        if w is not None:
            w.state = "switching"

    async def health(self) -> tuple[bool, dict]:
        nc = self.ctx.nc if self.ctx else None
        ok = bool(nc and nc.is_connected)
        return ok, {"workers": len(self.registry.workers)}

    async def drain(self) -> None:
        return None


async def _unsubscribe(sub) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
