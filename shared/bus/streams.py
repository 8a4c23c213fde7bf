"""The JetStream topology: work queue, dead-letter stream, consumers and KV buckets.

    EPD_WORK  epd.work.>   work-queue retention, file storage, dedup window
      work-<stage>-<priority>   durable pull consumer, filter epd.work.<stage>.<priority>
    EPD_DLQ   epd.dlq.>    limits retention, max age 7 days
    KV epd_workers         TTL'd: a worker that stops heart-beating disappears
    KV epd_roles           role assignments (survive a scheduler restart)

`ensure_topology` is idempotent: it creates what is missing, updates what differs and
leaves the rest alone, so every service may call it at start.

A consumer's server-side `max_deliver` is one more than the configured `max_deliver`:
the work loop runs the handler at most `max_deliver` times, and the extra delivery is
the one on which it dead-letters the message (so a worker dying on the last try cannot
strand the message in the work queue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from shared.logging import get_logger
from shared.protocol.subjects import (
    DLQ_STREAM,
    PRIORITIES,
    ROLES_BUCKET,
    STAGES,
    WORK_STREAM,
    WORKERS_BUCKET,
    Priority,
    Stage,
    dlq_stream_subjects,
    work_consumer,
    work_stream_subjects,
    work_subject,
)

log = get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
DLQ_MAX_AGE_S = 7 * 24 * 3600.0


@dataclass
class TopologyReport:
    """What one `ensure_topology` call changed (names); all empty on a no-op."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


def consumer_max_deliver(max_deliver: int) -> int:
    """Server-side max_deliver for a loop that runs handlers `max_deliver` times."""
    return max_deliver + 1


def _close(a: float | None, b: float | None) -> bool:
    return math.isclose(a or 0.0, b or 0.0, rel_tol=1e-6, abs_tol=1e-3)


async def _ensure_stream(js: JetStreamContext, want: StreamConfig, report: TopologyReport) -> None:
    try:
        have = (await js.stream_info(want.name)).config
    except NotFoundError:
        await js.add_stream(want)
        report.created.append(f"stream:{want.name}")
        return
    same = (sorted(have.subjects or []) == sorted(want.subjects or [])
            and have.retention == want.retention and have.storage == want.storage
            and (have.num_replicas or 1) == (want.num_replicas or 1)
            and _close(have.max_age, want.max_age)
            and _close(have.duplicate_window, want.duplicate_window))
    if not same:
        # Retention and storage cannot change in place; the server rejects that with an
        # APIError, which we let through: it needs an operator decision.
        await js.update_stream(have.evolve(subjects=want.subjects, retention=want.retention,
                                           storage=want.storage, num_replicas=want.num_replicas,
                                           max_age=want.max_age,
                                           duplicate_window=want.duplicate_window))
        report.updated.append(f"stream:{want.name}")


async def _ensure_consumer(js: JetStreamContext, stream: str, want: ConsumerConfig,
                           report: TopologyReport) -> None:
    try:
        have = (await js.consumer_info(stream, want.durable_name)).config
    except NotFoundError:
        await js.add_consumer(stream, want)
        report.created.append(f"consumer:{want.durable_name}")
        return
    same = (have.filter_subject == want.filter_subject and have.ack_policy == want.ack_policy
            and _close(have.ack_wait, want.ack_wait) and have.max_deliver == want.max_deliver
            and have.max_ack_pending == want.max_ack_pending)
    if not same:
        await js.add_consumer(stream, want)  # durable create with a new config = update
        report.updated.append(f"consumer:{want.durable_name}")


async def _ensure_kv(js: JetStreamContext, bucket: str, ttl: float | None, replicas: int,
                     report: TopologyReport) -> None:
    stream = f"KV_{bucket}"
    try:
        have = (await js.stream_info(stream)).config
    except NotFoundError:
        await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl, history=1,
                                                 replicas=replicas, storage=StorageType.FILE))
        report.created.append(f"kv:{bucket}")
        return
    if not _close(have.max_age, ttl) or (have.num_replicas or 1) != replicas:
        dup = min(120.0, ttl) if ttl else have.duplicate_window
        await js.update_stream(have.evolve(max_age=ttl or 0.0, num_replicas=replicas,
                                           duplicate_window=dup))
        report.updated.append(f"kv:{bucket}")


async def ensure_topology(
    js: JetStreamContext,
    *,
    replicas: int = 1,
    ack_wait_s: float = 30.0,
    max_deliver: int = 5,
    max_ack_pending: int = 10_000,
    duplicate_window_s: float = 120.0,
    workers_ttl_s: float = 30.0,
    dlq_max_age_s: float = DLQ_MAX_AGE_S,
) -> TopologyReport:
    """Create or update every stream, consumer and KV bucket of subjects.py.

    Mutates server state only where it differs from the wanted config; a second call with
    the same arguments is a no-op (returns an empty report). Raises nats.js.errors.APIError
    when the server refuses (e.g. a retention change), nats errors when unreachable.
    """
    if replicas < 1 or ack_wait_s <= 0 or max_deliver < 1:
        raise ValueError("replicas >= 1, ack_wait_s > 0 and max_deliver >= 1 are required")
    report = TopologyReport()
    await _ensure_stream(js, StreamConfig(
        name=WORK_STREAM, subjects=work_stream_subjects(), retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE, num_replicas=replicas, duplicate_window=duplicate_window_s,
        max_age=0.0), report)
    await _ensure_stream(js, StreamConfig(
        name=DLQ_STREAM, subjects=dlq_stream_subjects(), retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, num_replicas=replicas, max_age=dlq_max_age_s,
        duplicate_window=duplicate_window_s), report)
    for stage in STAGES:
        for priority in PRIORITIES:
            await _ensure_consumer(js, WORK_STREAM, ConsumerConfig(
                durable_name=work_consumer(stage, priority),
                filter_subject=work_subject(stage, priority),
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait_s, max_deliver=consumer_max_deliver(max_deliver),
                max_ack_pending=max_ack_pending), report)
    await _ensure_kv(js, WORKERS_BUCKET, workers_ttl_s, replicas, report)
    await _ensure_kv(js, ROLES_BUCKET, None, replicas, report)
    if report.changed:
        log.info("jetstream topology ensured", created=report.created, updated=report.updated)
    return report


async def publish_work(js: JetStreamContext, stage: Stage | str, priority: Priority | str,
                       payload: bytes, msg_id: str, *, headers: dict[str, str] | None = None,
                       timeout: float | None = None) -> PubAck:
    """Publish one work item, de-duplicated by `msg_id` within the stream's duplicate window.

    A second publish with the same `msg_id` is a no-op on the server (`PubAck.duplicate`).
    Raises nats errors (timeout, no responders) when JetStream does not acknowledge.
    """
    hdrs = {**(headers or {}), MSG_ID_HEADER: msg_id}
    return await js.publish(work_subject(stage, priority), payload, timeout=timeout, headers=hdrs)
