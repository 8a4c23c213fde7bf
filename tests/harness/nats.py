"""A real `nats-server -js` for tests: the production `EmbeddedNats` plus async helpers.

Async tests use `await srv.akill()` / `await srv.arestart()` so the event loop (and the
clients on it) keep running while the server comes back. No mock NATS, ever.
"""

from __future__ import annotations

import asyncio

from shared.bus.embedded import EmbeddedNats, free_port
from shared.bus.embedded import find_nats_server as nats_server_bin

__all__ = ["NatsServer", "free_port", "nats_server_bin"]


class NatsServer(EmbeddedNats):
    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> NatsServer:
        return await asyncio.to_thread(self.start)

    async def arestart(self, *, kill: bool = False) -> NatsServer:
        return await asyncio.to_thread(self.restart, kill=kill)
