"""The skeleton every service process shares (STYLE point 8).

    connect to NATS -> ensure the JetStream topology -> `service.start(ctx)` registers handlers
    on an AsyncExitStack -> serve /health + /metrics -> wait for SIGTERM/SIGINT ->
    `service.drain()` finishes in-flight work -> close everything -> exit 0.

A service implements the `Service` protocol; `run(service, cfg)` does the rest. A handler that
raises is logged and counted by the bus helpers, never allowed to stop the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web

from shared import logging as epdlog
from shared import metrics
from shared.bus.connection import connect
from shared.bus.streams import ensure_topology
from shared.config import ServiceConfig

DRAIN_TIMEOUT_S = 30.0


@dataclass
class ServiceContext:
    """What a running service gets: its config, the bus, and a stack for cleanups."""

    cfg: ServiceConfig
    nc: object
    js: object
    stack: AsyncExitStack
    shutdown: asyncio.Event
    http_app: web.Application
    tasks: set = field(default_factory=set)

    def spawn(self, coro, name: str) -> asyncio.Task:
        """Start a background task, keep a reference, and log it if it dies with an error."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            epdlog.get_logger("service").error("background task failed", task=task.get_name(),
                                               exc_info=task.exception())


class Service(Protocol):
    name: str

    async def start(self, ctx: ServiceContext) -> None:
        """Register handlers/tasks (push cleanups on ctx.stack). Raising aborts start-up."""

    async def health(self) -> tuple[bool, dict]:
        """(healthy, details) for /health."""

    async def drain(self) -> None:
        """Stop taking new work and finish in-flight work. Called once, before the bus closes."""


async def serve_http(stack: AsyncExitStack, app: web.Application, host: str, port: int) -> int:
    """Serve `app`; returns the bound port. Cleanup is pushed onto `stack`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stack.push_async_callback(runner.cleanup)
    return site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp exposes no getter


async def run_async(service: Service, cfg: ServiceConfig, *, ready_file: str | None = None) -> int:
    log = epdlog.get_logger("service", service=service.name)
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, shutdown.set)

    async with AsyncExitStack() as stack:
        nc = await connect(cfg.nats_servers, name=service.name)
        stack.push_async_callback(_close_nc, nc)
        js = nc.jetstream()
        await ensure_topology(js, replicas=cfg.js_replicas, ack_wait_s=cfg.ack_wait_s,
                              max_deliver=cfg.max_deliver)
        app = getattr(service, "app", None) or web.Application()
        app.router.add_get("/metrics", metrics.metrics_handler)
        app.router.add_get("/health", metrics.health_handler(service.health))
        ctx = ServiceContext(cfg=cfg, nc=nc, js=js, stack=stack, shutdown=shutdown, http_app=app)
        await service.start(ctx)
        port = await serve_http(stack, app, cfg.http_host, cfg.http_port)
        metrics.SERVICE_UP.labels(service.name).set(1)
        log.info("service ready", http=f"http://{cfg.http_host}:{port}", nats=cfg.nats_url)
        if ready_file:
            await asyncio.to_thread(Path(ready_file).write_text, str(port))
        await shutdown.wait()
        log.info("shutting down: draining in-flight work")
        metrics.SERVICE_UP.labels(service.name).set(0)
        try:
            await asyncio.wait_for(asyncio.shield(service.drain()), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("drain timed out", timeout_s=DRAIN_TIMEOUT_S)
        for task in list(ctx.tasks):
            task.cancel()
        await asyncio.gather(*ctx.tasks, return_exceptions=True)
    log.info("stopped")
    return 0


async def _close_nc(nc) -> None:
    with contextlib.suppress(Exception):
        await nc.drain()
    with contextlib.suppress(Exception):
        await nc.close()


def run(service: Service, cfg: ServiceConfig, *, ready_file: str | None = None) -> int:
    """Run a service until SIGTERM/SIGINT; returns the process exit code."""
    epdlog.configure(level=cfg.log_level, json=None if cfg.log_format == "auto" else cfg.log_format == "json",
                     service=service.name)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_async(service, cfg, ready_file=ready_file))
    return uvloop.run(run_async(service, cfg, ready_file=ready_file))
