"""Every NATS subject, stream, consumer and key-value bucket name, built in one place.

Nothing else in the project formats a subject string. Names that embed an id (a worker,
a request) validate it as a single subject token, so a stray '.', '*' or '>' can never
widen a subscription or split a subject.

Map of the namespace:

    epd.work.<stage>.<priority>     JetStream work queues (stream EPD_WORK, work-queue retention)
    epd.dlq.<stage>.<priority>      poison work after N deliveries (stream EPD_DLQ, limits)
    epd.tokens.<request>            token events back to the gateway
    epd.ctl.heartbeat               worker heartbeats -> scheduler
    epd.ctl.role.<worker>           role commands scheduler -> worker
    epd.ctl.cancel.<request>        cancellation, fanned out to every worker
    epd.kv.events                   KV block stored/evicted events -> kvcache service
    epd.kv.fetch.<worker>           request/reply: fetch KV blocks held by a worker
    epd.xfer.<worker>               request/reply: chunked payload pulls from a worker
"""

from __future__ import annotations

import re
from enum import Enum

PREFIX = "epd"


class Stage(str, Enum):
    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"


class Priority(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


STAGES: tuple[Stage, ...] = (Stage.ENCODE, Stage.PREFILL, Stage.DECODE)
PRIORITIES: tuple[Priority, ...] = (Priority.ONLINE, Priority.OFFLINE)

# A subject token: no dots, wildcards or whitespace; bounded so subjects stay short.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def token(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid single subject token, else raise ValueError."""
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token ([A-Za-z0-9_-], 1-128 chars; also a valid KV key)")
    return value


# --- streams, consumers, buckets -------------------------------------------------------

WORK_STREAM = "EPD_WORK"
DLQ_STREAM = "EPD_DLQ"
WORKERS_BUCKET = "epd_workers"  # worker_id -> WorkerInfo (latest heartbeat)
ROLES_BUCKET = "epd_roles"  # worker_id -> assigned role


def work_subject(stage: Stage | str, priority: Priority | str = Priority.ONLINE) -> str:
    return f"{PREFIX}.work.{Stage(stage).value}.{Priority(priority).value}"


def work_stream_subjects() -> list[str]:
    return [f"{PREFIX}.work.>"]


def work_consumer(stage: Stage | str, priority: Priority | str = Priority.ONLINE) -> str:
    """Durable pull consumer shared by every worker of a stage (work-queue: one per subject)."""
    return f"work-{Stage(stage).value}-{Priority(priority).value}"


def dlq_subject(stage: Stage | str, priority: Priority | str = Priority.ONLINE) -> str:
    return f"{PREFIX}.dlq.{Stage(stage).value}.{Priority(priority).value}"


def dlq_stream_subjects() -> list[str]:
    return [f"{PREFIX}.dlq.>"]


# --- per-request and per-worker subjects -----------------------------------------------


def tokens_subject(request_id: str) -> str:
    return f"{PREFIX}.tokens.{token(request_id, 'request id')}"


def heartbeat_subject() -> str:
    return f"{PREFIX}.ctl.heartbeat"


def role_subject(worker_id: str) -> str:
    return f"{PREFIX}.ctl.role.{token(worker_id, 'worker id')}"


def cancel_subject(request_id: str) -> str:
    return f"{PREFIX}.ctl.cancel.{token(request_id, 'request id')}"


def cancel_wildcard() -> str:
    return f"{PREFIX}.ctl.cancel.*"


def kv_events_subject() -> str:
    return f"{PREFIX}.kv.events"


def kv_fetch_subject(worker_id: str) -> str:
    return f"{PREFIX}.kv.fetch.{token(worker_id, 'worker id')}"


def xfer_subject(worker_id: str) -> str:
    return f"{PREFIX}.xfer.{token(worker_id, 'worker id')}"
