"""Connecting to NATS: a retried first connection, then nats-py's own reconnect loop.

    connect(url, name)  ->  nats.aio.client.Client

The first connection is retried with capped exponential back-off plus jitter (the server
may not be up yet, e.g. in docker-compose); each attempt is bounded (two tries per server,
`connect_timeout` each). Once connected, the client reconnects by itself after a
disconnect (`max_reconnect=-1`: forever), re-subscribing every subscription, and every
state change is logged.
"""

from __future__ import annotations

import asyncio
import random
import time

import nats
from nats.aio.client import Client

from shared.logging import get_logger

log = get_logger(__name__)


def backoff_delay(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Delay before retry number `attempt` (0-based): min(cap, base*2^attempt), full jitter
    between half and all of it. Pure function."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return ceiling * (0.5 + random.random() / 2)


async def connect(
    url: str | list[str],
    name: str,
    *,
    connect_timeout: float = 2.0,
    max_reconnect: int = -1,
    reconnect_time_wait: float = 0.5,
    initial_timeout: float | None = None,
    backoff_cap: float = 5.0,
    **options,
) -> Client:
    """Connect to NATS and return a client that reconnects by itself.

    `url` is one URL, a comma-separated list, or a list (a cluster). The first connection
    is retried with back-off until it succeeds or `initial_timeout` seconds pass (None:
    forever), then the last error is raised. After that the client reconnects up to
    `max_reconnect` times per server (-1: forever), waiting `reconnect_time_wait` between
    tries. Extra keyword `options` go to `nats.connect`. Raises nats errors / OSError.
    """
    servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    clog = log.bind(client=name)

    async def disconnected_cb() -> None:
        if not nc.is_closed:  # a close() we asked for is not worth a warning
            clog.warning("nats disconnected")

    async def reconnected_cb() -> None:
        clog.info("nats reconnected", server=str(nc.connected_url.netloc if nc.connected_url else ""))

    async def error_cb(err: Exception) -> None:
        if nc.is_connected:
            clog.warning("nats error", error=repr(err))
        else:
            clog.debug("nats connection error", error=repr(err))

    async def closed_cb() -> None:
        clog.info("nats connection closed")

    deadline = None if initial_timeout is None else time.monotonic() + initial_timeout
    attempt = 0
    while True:
        nc = Client()
        try:
            # One bounded attempt: no reconnect loop yet, two tries per server. The
            # reconnect options are switched on below once the first connection stands.
            await nc.connect(
                servers, name=name, connect_timeout=connect_timeout, allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=0,
                disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
                error_cb=error_cb, closed_cb=closed_cb, **options,
            )
        except asyncio.CancelledError:
            await _quiet_close(nc)
            raise
        except (OSError, asyncio.TimeoutError, nats.errors.Error) as e:
            await _quiet_close(nc)
            delay = backoff_delay(attempt, cap=backoff_cap)
            if deadline is not None and time.monotonic() + delay > deadline:
                clog.error("nats connect failed, giving up", servers=servers, attempts=attempt + 1,
                           error=repr(e))
                raise
            clog.warning("nats not reachable yet, retrying", servers=servers, attempt=attempt + 1,
                         retry_in_s=round(delay, 3), error=repr(e))
            await asyncio.sleep(delay)
            attempt += 1
            continue
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = max_reconnect
        nc.options["reconnect_time_wait"] = reconnect_time_wait
        clog.info("nats connected", server=str(nc.connected_url.netloc if nc.connected_url else ""),
                  max_payload=nc.max_payload, attempts=attempt + 1)
        return nc


async def _quiet_close(nc: Client) -> None:
    try:
        await nc.close()
    except Exception:  # noqa: BLE001 - best-effort cleanup of a half-open client
        pass


def server_max_payload(nc: Client) -> int:
    """The max payload (bytes) the connected server accepts for one message, headers included."""
    return int(nc.max_payload)
