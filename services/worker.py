"""A worker process: one accelerator (or CPU), one model, whichever stage its role names.

The worker owns the bus; stage handlers (services/encoder, prefill, decode) own the work.
Life cycle of a role change:

    ready(role=A) --RoleCommand(epoch>current, role=B)--> switching: stage A stops pulling,
    finishes or hands back its running work --> ready(role=B): stage B starts pulling.

Commands with an epoch not above the last applied one are ignored (stale or replayed), so the
scheduler can re-send a command safely. Heartbeats carry role, state and load every
`heartbeat_s`; the scheduler treats a silent worker as dead.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Protocol

from shared.bus.work import subscribe_decoded
from shared.config import WorkerConfig
from shared.logging import bind_context, get_logger
from shared.protocol import Heartbeat, RoleCommand, encode
from shared.protocol import subjects as subj
from shared.service import ServiceContext

log = get_logger("worker")


class StageRunner(Protocol):
    """What a stage handler exposes to the worker (the pipeline issue implements these)."""

    async def start(self) -> None: ...
    async def stop(self) -> None:
        """Stop pulling new work and finish or hand back running work. Idempotent."""
    def load(self) -> dict:
        """Load figures for the heartbeat: queue_depth, running, free_blocks, total_blocks,
        step_time_ms, tokens_per_s, capacity."""


class WorkerService:
    name = "worker"

    def __init__(self, cfg: WorkerConfig, stages: dict[str, StageRunner] | None = None):
        self.cfg = cfg
        self.worker_id = cfg.resolved_worker_id
        subj.token(self.worker_id, "worker_id")
        self.role = cfg.role
        self.state = "starting"
        self.epoch = 0
        self.seq = 0
        self.stages = stages or {}
        self.ctx: ServiceContext | None = None
        self._role_lock = asyncio.Lock()
        bind_context(worker_id=self.worker_id)

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        sub = await subscribe_decoded(ctx.nc, subj.role_subject(self.worker_id), RoleCommand,
                                      self.on_role_command, service=self.name)
        ctx.stack.push_async_callback(sub.unsubscribe)
        await self._start_stage(self.role)
        self.state = "ready"
        ctx.spawn(self._heartbeat_loop(), "heartbeat")
        log.info("worker ready", role=self.role, model=self.cfg.model, device=self.cfg.device)

    async def _start_stage(self, role: str) -> None:
        runner = self.stages.get(role)
        if runner is not None:
            await runner.start()

    async def _stop_stage(self, role: str) -> None:
        runner = self.stages.get(role)
        if runner is not None:
            await runner.stop()

    async def on_role_command(self, cmd: RoleCommand) -> None:
        async with self._role_lock:
            if cmd.epoch <= self.epoch:
                log.info("stale role command ignored", epoch=cmd.epoch, current=self.epoch)
                return
            self.epoch = cmd.epoch
            if cmd.role == self.role:
                return
            log.info("switching role", from_role=self.role, to_role=cmd.role, reason=cmd.reason)
            self.state = "switching"
            await self.heartbeat()
            await self._stop_stage(self.role)
            self.role = cmd.role
            await self._start_stage(self.role)
            self.state = "ready"
            await self.heartbeat()

    def heartbeat_message(self) -> Heartbeat:
        self.seq += 1
        load = {}
        runner = self.stages.get(self.role)
        if runner is not None:
            load = runner.load()
        return Heartbeat(
            worker_id=self.worker_id, role=self.role, state=self.state, model=self.cfg.model,
            device=self.cfg.device, pid=os.getpid(), host=socket.gethostname(), seq=self.seq,
            ts=time.time(), queue_depth=load.get("queue_depth", 0), running=load.get("running", 0),
            free_blocks=load.get("free_blocks", 0), total_blocks=load.get("total_blocks", 0),
            step_time_ms=float(load.get("step_time_ms", 0.0)),
            tokens_per_s=float(load.get("tokens_per_s", 0.0)), capacity=load.get("capacity", 0))

    async def heartbeat(self) -> None:
        if self.ctx is not None and self.ctx.nc.is_connected:
            await self.ctx.nc.publish(subj.heartbeat_subject(), encode(self.heartbeat_message()))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a disconnected bus must not kill the loop
                log.warning("heartbeat failed", error=str(exc))
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def health(self) -> tuple[bool, dict]:
        ok = bool(self.ctx and self.ctx.nc.is_connected)
        return ok, {"worker_id": self.worker_id, "role": self.role, "state": self.state}

    async def drain(self) -> None:
        self.state = "stopping"
        await self.heartbeat()
        await self._stop_stage(self.role)
