"""PullWorkLoop against a real nats-server: sharing, capacity, acks, retries, dead letters."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from prometheus_client import REGISTRY

from shared.bus.connection import connect
from shared.bus.streams import ensure_topology, publish_work
from shared.bus.work import Delivery, PullWorkLoop, RetryableError
from shared.protocol.codec import encode
from shared.protocol.messages import ChunkRequest
from shared.protocol.subjects import DLQ_STREAM, WORK_STREAM, Priority, Stage, work_consumer
from tests.harness import await_healthy

P = Stage.PREFILL


def item(i: int) -> bytes:
    return encode(ChunkRequest(transfer_id=f"t{i}", index=i))


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def put(js, n: int, *, start: int = 0, priority: Priority = Priority.ONLINE) -> None:
    for i in range(start, start + n):
        await publish_work(js, P, priority, item(i), msg_id=f"{priority.value}-{i}")


async def dlq_messages(js, n: int) -> list:
    sub = await js.pull_subscribe(">", stream=DLQ_STREAM)
    msgs = await sub.fetch(n, timeout=3)
    await sub.unsubscribe()
    return msgs


@pytest.fixture
async def topo(js_clean):
    await ensure_topology(js_clean, ack_wait_s=1.0, max_deliver=3)
    return js_clean


async def test_each_item_goes_to_exactly_one_of_two_loops(topo, nats_server):
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def handler(name):
        async def h(d: Delivery) -> None:
            seen[name].append(d.decode(ChunkRequest).index)
            await asyncio.sleep(0.01)
        return h

    nc2 = await connect(nats_server.url, "worker-b")
    a = PullWorkLoop(topo, P, Priority.ONLINE, handler("a"), batch=2)
    b = PullWorkLoop(nc2.jetstream(), P, Priority.ONLINE, handler("b"), batch=2)
    async with a, b:
        await put(topo, 40)
        await await_healthy(lambda: len(seen["a"]) + len(seen["b"]) >= 40, timeout=10)
        await asyncio.sleep(0.3)
    await nc2.close()
    assert sorted(seen["a"] + seen["b"]) == list(range(40))  # exactly once each
    assert seen["a"] and seen["b"]


async def test_capacity_zero_fetches_nothing_until_it_rises(topo):
    cap = {"n": 0}
    got: list[int] = []

    async def h(d: Delivery) -> None:
        got.append(d.decode(ChunkRequest).index)
        cap["n"] -= 1

    loop = PullWorkLoop(topo, P, Priority.ONLINE, h, capacity=lambda: cap["n"])
    async with loop:
        await put(topo, 2)
        await asyncio.sleep(1.0)
        assert got == []
        info = await topo.consumer_info(WORK_STREAM, work_consumer(P))
        assert info.num_pending == 2 and info.num_ack_pending == 0
        cap["n"] = 1
        loop.notify_capacity()
        await await_healthy(lambda: len(got) == 1, timeout=5)
        await asyncio.sleep(0.5)
        assert got == [0]  # capacity back at 0: the second item stays queued
        cap["n"] = 5
        loop.notify_capacity()
        await await_healthy(lambda: len(got) == 2, timeout=5)


async def test_slow_handler_with_in_progress_acks_is_not_redelivered(topo):
    deliveries: list[int] = []

    async def slow(d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        await asyncio.sleep(2.5)  # > 2x ack_wait (1 s)

    loop = PullWorkLoop(topo, P, Priority.ONLINE, slow)
    async with loop:
        assert loop.in_progress_interval == pytest.approx(1.0 / 3)  # ack_wait / 3, from the consumer
        assert loop.max_deliveries == 3  # the topology's max_deliver
        await put(topo, 1)
        await await_healthy(lambda: deliveries, timeout=5)
        await asyncio.sleep(3.5)
    assert deliveries == [1]
    assert (await topo.stream_info(WORK_STREAM)).state.messages == 0  # acked and removed


async def test_retryable_is_redelivered_then_acked(topo):
    deliveries: list[int] = []
    done = asyncio.Event()

    async def flaky(d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        if d.num_delivered == 1:
            raise RetryableError("not yet", delay=0.2)
        done.set()

    async with PullWorkLoop(topo, P, Priority.ONLINE, flaky, max_deliveries=3):
        await put(topo, 1)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.2)
    assert deliveries == [1, 2]
    assert (await topo.stream_info(WORK_STREAM)).state.messages == 0


async def test_worker_crash_mid_handler_redelivers_to_another(topo, nats_server):
    started, blocked = asyncio.Event(), asyncio.Event()
    got: list[int] = []

    async def hang(d: Delivery) -> None:
        started.set()
        await blocked.wait()

    async def ok(d: Delivery) -> None:
        got.append(d.num_delivered)

    nc1 = await connect(nats_server.url, "doomed")
    crashed = PullWorkLoop(nc1.jetstream(), P, Priority.ONLINE, hang)
    await crashed.start()
    await put(topo, 1)
    await asyncio.wait_for(started.wait(), 5)
    await nc1.close()  # the worker is gone: no ack, no in-progress
    await crashed.stop(drain_timeout=0)
    async with PullWorkLoop(topo, P, Priority.ONLINE, ok):
        await await_healthy(lambda: got, timeout=6)
        await asyncio.sleep(0.2)
    assert got == [2]


async def test_poison_messages_are_dead_lettered_and_loop_goes_on(topo):
    good: list[int] = []

    async def h(d: Delivery) -> None:
        good.append(d.decode(ChunkRequest).index)

    bad_version = msgpack.packb({"v": 999, "t": "chunk_request", "transfer_id": "x", "index": 1})
    before = counter("epd_bus_dead_letters_total", stage="prefill", reason="decode")
    dec_before = counter("epd_bus_decode_errors_total", stage="prefill", code="schema_version")
    async with PullWorkLoop(topo, P, Priority.ONLINE, h, batch=1):
        await publish_work(topo, P, Priority.ONLINE, bad_version, msg_id="bad-1")
        await publish_work(topo, P, Priority.ONLINE, item(7)[:-3], msg_id="bad-2")  # truncated
        await publish_work(topo, P, Priority.ONLINE, item(8), msg_id="good-1")
        await await_healthy(lambda: good == [8], timeout=5)
    dead = await dlq_messages(topo, 2)
    codes = sorted(m.headers["Epd-Error-Code"] for m in dead)
    assert codes == ["malformed", "schema_version"]
    for m in dead:
        assert m.headers["Epd-Stage"] == "prefill" and m.headers["Epd-Deliveries"] == "1"
        assert m.headers["Epd-Error"] and m.headers["Nats-Msg-Id"] in ("bad-1", "bad-2")
    assert bad_version in [m.data for m in dead]
    assert counter("epd_bus_dead_letters_total", stage="prefill", reason="decode") == before + 2
    assert counter("epd_bus_decode_errors_total", stage="prefill", code="schema_version") == dec_before + 1
    assert (await topo.stream_info(WORK_STREAM)).state.messages == 0


async def test_max_deliveries_exceeded_goes_to_dlq(topo):
    deliveries: list[int] = []

    async def always_retry(d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        raise RetryableError("still busy")

    before = counter("epd_bus_dead_letters_total", stage="prefill", reason="max_deliver")
    async with PullWorkLoop(topo, P, Priority.ONLINE, always_retry, max_deliveries=3):
        await put(topo, 1)
        await await_healthy(lambda: counter("epd_bus_dead_letters_total", stage="prefill",
                                            reason="max_deliver") > before, timeout=8)
    assert deliveries == [1, 2, 3]
    (dead,) = await dlq_messages(topo, 1)
    assert dead.headers["Epd-Error-Code"] == "max_deliver" and dead.headers["Epd-Deliveries"] == "3"


async def test_handler_exception_goes_to_dlq(topo):
    async def boom(d: Delivery) -> None:
        raise KeyError("bug")

    before = counter("epd_bus_dead_letters_total", stage="prefill", reason="handler_error")
    async with PullWorkLoop(topo, P, Priority.ONLINE, boom):
        await put(topo, 1)
        await await_healthy(lambda: counter("epd_bus_dead_letters_total", stage="prefill",
                                            reason="handler_error") > before, timeout=5)
    (dead,) = await dlq_messages(topo, 1)
    assert dead.headers["Epd-Error-Code"] == "KeyError" and "bug" in dead.headers["Epd-Error"]


async def test_online_is_pulled_before_offline_and_stop_drains(topo):
    order: list[str] = []
    finished: list[int] = []

    async def h(d: Delivery) -> None:
        order.append(d.priority.value)
        await asyncio.sleep(0.05)
        finished.append(1)

    await put(topo, 3, priority=Priority.OFFLINE)
    await put(topo, 3, priority=Priority.ONLINE)
    # A generous quick-poll timeout: a stalled test box must not make online look empty.
    loop = PullWorkLoop(topo, P, [Priority.ONLINE, Priority.OFFLINE], h, batch=1, poll_timeout=0.5)
    await loop.start()
    await await_healthy(lambda: len(order) == 6, timeout=5)
    await loop.stop()
    assert order == ["online"] * 3 + ["offline"] * 3
    assert len(finished) == 6 and loop.in_flight == 0
