"""ensure_topology against a real nats-server: creation, no-op second call, updates, dedup."""

from __future__ import annotations

from nats.js.api import RetentionPolicy, StorageType

from shared.bus.streams import consumer_max_deliver, ensure_topology, publish_work
from shared.protocol.subjects import (
    DLQ_STREAM,
    PRIORITIES,
    ROLES_BUCKET,
    STAGES,
    WORK_STREAM,
    WORKERS_BUCKET,
    Priority,
    Stage,
    work_consumer,
    work_subject,
)


async def test_topology_created_then_second_call_is_noop(js_clean):
    js = js_clean
    first = await ensure_topology(js, ack_wait_s=7.0, max_deliver=4, workers_ttl_s=15.0)
    assert f"stream:{WORK_STREAM}" in first.created and f"stream:{DLQ_STREAM}" in first.created
    assert len([c for c in first.created if c.startswith("consumer:")]) == len(STAGES) * len(PRIORITIES)
    assert {f"kv:{WORKERS_BUCKET}", f"kv:{ROLES_BUCKET}"} <= set(first.created)

    second = await ensure_topology(js, ack_wait_s=7.0, max_deliver=4, workers_ttl_s=15.0)
    assert not second.changed, second

    work = (await js.stream_info(WORK_STREAM)).config
    assert work.retention == RetentionPolicy.WORK_QUEUE and work.storage == StorageType.FILE
    assert work.duplicate_window > 0
    dlq = (await js.stream_info(DLQ_STREAM)).config
    assert dlq.retention == RetentionPolicy.LIMITS and abs(dlq.max_age - 7 * 24 * 3600) < 1
    ci = (await js.consumer_info(WORK_STREAM, work_consumer(Stage.DECODE, Priority.OFFLINE))).config
    assert ci.filter_subject == work_subject(Stage.DECODE, Priority.OFFLINE)
    assert abs(ci.ack_wait - 7.0) < 1e-3 and ci.max_deliver == consumer_max_deliver(4)
    assert ci.max_ack_pending and ci.max_ack_pending >= 1000
    kv = (await js.stream_info(f"KV_{WORKERS_BUCKET}")).config
    assert abs(kv.max_age - 15.0) < 1e-3
    await js.key_value(ROLES_BUCKET)  # usable as a KV bucket


async def test_topology_updates_what_differs(js_clean):
    js = js_clean
    await ensure_topology(js, ack_wait_s=7.0)
    report = await ensure_topology(js, ack_wait_s=9.0, workers_ttl_s=20.0)
    assert not report.created
    assert len([u for u in report.updated if u.startswith("consumer:")]) == len(STAGES) * len(PRIORITIES)
    assert f"kv:{WORKERS_BUCKET}" in report.updated
    ci = (await js.consumer_info(WORK_STREAM, work_consumer(Stage.PREFILL))).config
    assert abs(ci.ack_wait - 9.0) < 1e-3
    assert not (await ensure_topology(js, ack_wait_s=9.0, workers_ttl_s=20.0)).changed


async def test_publish_work_is_deduplicated_by_msg_id(js_clean):
    js = js_clean
    await ensure_topology(js)
    a = await publish_work(js, Stage.PREFILL, Priority.ONLINE, b"x", msg_id="req-1:prefill")
    b = await publish_work(js, Stage.PREFILL, Priority.ONLINE, b"x", msg_id="req-1:prefill")
    c = await publish_work(js, Stage.PREFILL, Priority.ONLINE, b"y", msg_id="req-2:prefill")
    assert not a.duplicate and b.duplicate and not c.duplicate
    assert (await js.stream_info(WORK_STREAM)).state.messages == 2
