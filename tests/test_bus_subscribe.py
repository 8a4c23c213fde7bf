"""subscribe_decoded: malformed messages and handler errors never end the subscription."""

from __future__ import annotations

import msgpack
from prometheus_client import REGISTRY

from shared.bus.work import subscribe_decoded
from shared.protocol.codec import encode
from shared.protocol.messages import ChunkRequest
from shared.protocol.subjects import heartbeat_subject
from tests.harness import await_healthy


def decode_errors(code: str) -> float:
    return REGISTRY.get_sample_value("epd_bus_decode_errors_total",
                                     {"stage": "t", "code": code}) or 0.0


async def test_subscription_survives_garbage_and_handler_errors(nc):
    got: list[int] = []

    async def handler(req: ChunkRequest) -> None:
        if req.index == 13:
            raise RuntimeError("unlucky")
        got.append(req.index)

    malformed, version = decode_errors("malformed"), decode_errors("schema_version")
    sub = await subscribe_decoded(nc, heartbeat_subject(), ChunkRequest, handler, service="t")
    subject = heartbeat_subject()
    await nc.publish(subject, b"\x00\xffnot msgpack")
    await nc.publish(subject, msgpack.packb({"v": 42, "t": "chunk_request"}))
    await nc.publish(subject, encode(ChunkRequest(transfer_id="a", index=13)))  # handler raises
    await nc.publish(subject, encode(ChunkRequest(transfer_id="a", index=1)))
    await await_healthy(lambda: got == [1], timeout=5)
    assert decode_errors("malformed") == malformed + 1
    assert decode_errors("schema_version") == version + 1
    await nc.publish(subject, encode(ChunkRequest(transfer_id="a", index=2)))
    await await_healthy(lambda: got == [1, 2], timeout=5)
    await sub.unsubscribe()


async def test_with_msg_passes_the_raw_message_for_replies(nc):
    async def echo(req: ChunkRequest, msg) -> None:
        await msg.respond(encode(ChunkRequest(transfer_id=req.transfer_id, index=req.index + 1)))

    sub = await subscribe_decoded(nc, heartbeat_subject(), ChunkRequest, echo, with_msg=True)
    resp = await nc.request(heartbeat_subject(), encode(ChunkRequest(transfer_id="q", index=1)), timeout=2)
    assert resp.data == encode(ChunkRequest(transfer_id="q", index=2))
    await sub.unsubscribe()
