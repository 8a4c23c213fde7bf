"""Kill the nats-server under a running PullWorkLoop and a publisher, restart it on the same
port and store dir: clients reconnect by themselves and work published after it is done."""

from __future__ import annotations

import asyncio

import nats.errors

from shared.bus.connection import connect
from shared.bus.streams import ensure_topology, publish_work
from shared.bus.work import Delivery, PullWorkLoop
from shared.protocol.codec import encode
from shared.protocol.messages import ChunkRequest
from shared.protocol.subjects import Priority, Stage
from tests.harness import await_healthy

D = Stage.DECODE


async def publish_retrying(js, i: int) -> None:
    """A publisher that keeps trying until JetStream acknowledges (dedup makes it safe)."""
    data = encode(ChunkRequest(transfer_id=f"t{i}", index=i))
    while True:
        try:
            await publish_work(js, D, Priority.ONLINE, data, msg_id=f"item-{i}", timeout=0.5)
            return
        except (nats.errors.Error, asyncio.TimeoutError):
            await asyncio.sleep(0.1)


async def test_loop_and_publisher_survive_server_restart(nats_server_fn):
    srv = nats_server_fn
    worker = await connect(srv.url, "worker", reconnect_time_wait=0.2)
    publisher = await connect(srv.url, "publisher", reconnect_time_wait=0.2)
    await ensure_topology(worker.jetstream(), ack_wait_s=2.0)
    done: set[int] = set()

    async def h(d: Delivery) -> None:
        done.add(d.decode(ChunkRequest).index)

    loop = PullWorkLoop(worker.jetstream(), D, Priority.ONLINE, h, fetch_timeout=0.5)
    await loop.start()
    pjs = publisher.jetstream()
    for i in range(5):
        await publish_retrying(pjs, i)
    await await_healthy(lambda: done >= set(range(5)), timeout=5)

    await srv.akill()
    assert not srv.running
    pubs = [asyncio.create_task(publish_retrying(pjs, i)) for i in range(5, 10)]
    await asyncio.sleep(1.0)  # the loop keeps fetching (and failing) while the server is down
    assert not loop._task.done()
    await srv.arestart()
    await asyncio.wait_for(asyncio.gather(*pubs), 15)
    await await_healthy(lambda: done >= set(range(10)), timeout=15)
    assert worker.is_connected and publisher.is_connected
    assert worker.stats["reconnects"] >= 1 and publisher.stats["reconnects"] >= 1
    await loop.stop()
    await worker.close()
    await publisher.close()


async def test_first_connect_waits_for_the_server(nats_server_fn):
    srv = nats_server_fn
    srv.kill()
    attempt = asyncio.create_task(connect(srv.url, "early-bird", initial_timeout=15))
    await asyncio.sleep(0.8)
    assert not attempt.done()
    await srv.arestart()
    nc = await asyncio.wait_for(attempt, 10)
    assert nc.is_connected
    await nc.close()


async def test_first_connect_gives_up_after_initial_timeout(nats_server_fn):
    srv = nats_server_fn
    srv.kill()
    try:
        await connect(srv.url, "impatient", initial_timeout=0.5, connect_timeout=0.2)
    except (OSError, nats.errors.Error, asyncio.TimeoutError):
        pass
    else:
        raise AssertionError("connect should have failed")
