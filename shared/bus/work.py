"""The pull-work loop every stage worker runs, and a decoded core-NATS subscription helper.

    PullWorkLoop(js, stage, [online, offline], handler, capacity=...)
      fetch min(capacity(), batch) ──> one task per message ──> handler(Delivery)
                                           │ while it runs: msg.in_progress() every ack_wait/3
      returns            -> ack
      RetryableError     -> nak(delay)          (dead-letter instead on the last delivery)
      ProtocolError      -> dead-letter "decode"
      other exception    -> dead-letter "handler_error"
      delivery > max     -> dead-letter "max_deliver" without running the handler

Dead-lettering publishes the original payload and headers plus Epd-Error, Epd-Error-Code,
Epd-Stage, Epd-Deliveries (and Epd-Reason) to dlq_subject(stage, priority), then term()s
the message. If that publish fails, the message is nak'ed and dead-lettered on redelivery.
The consumer's server-side max_deliver is max_deliveries + 1 (see streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from prometheus_client import Counter

from shared.bus.connection import backoff_delay
from shared.logging import get_logger
from shared.protocol.codec import decode as decode_message
from shared.protocol.errors import ProtocolError
from shared.protocol.subjects import WORK_STREAM, Priority, Stage, dlq_subject, work_consumer

log = get_logger(__name__)

DEAD_LETTERS = Counter("epd_bus_dead_letters_total", "work messages sent to the dead-letter stream",
                       ["stage", "reason"])
DECODE_ERRORS = Counter("epd_bus_decode_errors_total", "messages that failed to decode",
                        ["stage", "code"])


class RetryableError(Exception):
    """Raise from a work handler to have the message redelivered (after `delay` seconds)."""

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


Retryable = RetryableError


@dataclass
class Delivery:
    """One work message as a handler sees it. `msg` is the raw nats message (do not ack it)."""

    msg: Msg
    stage: Stage
    priority: Priority
    num_delivered: int

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def headers(self) -> dict[str, str]:
        return self.msg.headers or {}

    @property
    def subject(self) -> str:
        return self.msg.subject

    def decode(self, expected: Any = None) -> Any:
        """Decode the payload; raises ProtocolError (the loop then dead-letters the message)."""
        return decode_message(self.data, expected=expected)


Handler = Callable[[Delivery], Awaitable[None]]


def _header_value(text: str, limit: int = 1024) -> str:
    return " ".join(str(text).split())[:limit] or "-"


class PullWorkLoop:
    """Pulls work for one stage from its durable consumers, in priority order.

    `priorities` lists consumers highest first: a lower one is polled only when every higher
    one had nothing. `capacity()` says how many more items the caller takes now; the loop
    fetches min(capacity(), batch) and, at 0, sleeps until `notify_capacity()` or a handler
    finishing. Handlers should reserve their capacity before their first await.
    `start()` twice is a no-op (no restart after `stop()`). `stop()` stops fetching, drains
    handlers (cancelling those still running after `drain_timeout`: their messages are
    redelivered after ack_wait) and returns.
    """

    def __init__(self, js: JetStreamContext, stage: Stage | str,
                 priorities: Priority | str | Sequence[Priority | str], handler: Handler, *,
                 capacity: Callable[[], int] | None = None, batch: int = 8,
                 in_progress_interval: float | None = None, max_deliveries: int | None = None,
                 fetch_timeout: float = 1.0,
                 poll_timeout: float = 0.05, stream: str = WORK_STREAM) -> None:
        self.js = js
        self.stage = Stage(stage)
        prios = [priorities] if isinstance(priorities, (str, Priority)) else list(priorities)
        self.priorities = [Priority(p) for p in prios]
        if not self.priorities or batch < 1 or (max_deliveries is not None and max_deliveries < 1):
            raise ValueError("need >= 1 priority, batch >= 1 and max_deliveries >= 1")
        self.handler = handler
        self.capacity = capacity or (lambda: batch - len(self._tasks))
        self.batch = batch
        self._interval, self._max_deliveries = in_progress_interval, max_deliveries
        self.in_progress_interval = in_progress_interval or 10.0  # set from ack_wait in start()
        self.max_deliveries = max_deliveries or 5
        self.fetch_timeout = fetch_timeout
        self.poll_timeout = poll_timeout
        self.stream = stream
        self._subs: list[tuple[Priority, JetStreamContext.PullSubscription]] = []
        self._tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._cap_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._log = log.bind(stage=self.stage.value)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def notify_capacity(self) -> None:
        """Wake the loop: capacity may have risen. Cheap; safe to call often."""
        self._cap_event.set()

    async def start(self) -> None:
        """Bind to the consumers and start pulling. Settings left as None come from the first
        consumer's config (in-progress every ack_wait/3; max_deliveries = max_deliver - 1,
        see streams.py). Raises NotFoundError without a topology, nats errors if unreachable."""
        if self._task is not None:
            return
        first = work_consumer(self.stage, self.priorities[0])
        info = (await self.js.consumer_info(self.stream, first)).config
        if self._interval is None:
            self.in_progress_interval = (info.ack_wait or 30.0) / 3
        if self._max_deliveries is None and info.max_deliver and info.max_deliver > 1:
            self.max_deliveries = info.max_deliver - 1
        for prio in self.priorities:
            sub = await self.js.pull_subscribe_bind(durable=work_consumer(self.stage, prio),
                                                    stream=self.stream)
            self._subs.append((prio, sub))
        self._task = asyncio.create_task(self._run(), name=f"pull-work-{self.stage.value}")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop fetching, wait for in-flight handlers (<= drain_timeout), unsubscribe."""
        self._stop_event.set()
        self._cap_event.set()
        if self._task is not None:
            # The current fetch ends within fetch_timeout; messages it got are nak'ed.
            done, _ = await asyncio.wait({self._task}, timeout=self.fetch_timeout + 2.0)
            if not done:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                self._log.warning("drain timed out; cancelled handlers", cancelled=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for _, sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def __aenter__(self) -> PullWorkLoop:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _want(self) -> int:
        try:
            return min(int(self.capacity()), self.batch)
        except Exception:  # noqa: BLE001 - a broken capacity() must not kill the loop
            self._log.exception("capacity() raised; treating as 0")
            return 0

    async def _run(self) -> None:
        failures = 0
        while not self._stop_event.is_set():
            want = self._want()
            if want <= 0:
                self._cap_event.clear()
                if self._want() <= 0:  # re-check: capacity may have risen before clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._cap_event.wait(), 5.0)
                continue
            try:
                prio, msgs = await self._fetch(want)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - disconnects, API errors: back off, retry
                delay = backoff_delay(failures, base=0.2, cap=5.0)
                failures += 1
                self._log.warning("work fetch failed; backing off", error=repr(e),
                                  retry_in_s=round(delay, 2))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                continue
            if self._stop_event.is_set():
                for m in msgs:  # fetched while stopping: hand back right away
                    with contextlib.suppress(Exception):
                        await m.nak()
                break
            for m in msgs:
                task = asyncio.create_task(self._process(m, prio))
                self._tasks.add(task)
                task.add_done_callback(self._on_done)
            if msgs:
                await asyncio.sleep(0)  # let handlers start and reserve capacity

    def _on_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._cap_event.set()

    async def _fetch(self, want: int) -> tuple[Priority, list[Msg]]:
        """Quick-poll each consumer in priority order; if all are empty, long-poll the first."""
        subs = self._subs
        if len(subs) > 1:
            for prio, sub in subs:
                msgs = await self._fetch_one(sub, want, self.poll_timeout)
                if msgs:
                    return prio, msgs
        prio, sub = subs[0]
        return prio, await self._fetch_one(sub, want, self.fetch_timeout)

    @staticmethod
    async def _fetch_one(sub: JetStreamContext.PullSubscription, want: int,
                         timeout: float) -> list[Msg]:
        try:
            return await sub.fetch(want, timeout=timeout)
        except asyncio.TimeoutError:  # nats TimeoutError / FetchTimeoutError: nothing there
            return []

    async def _process(self, msg: Msg, prio: Priority) -> None:
        try:
            n = msg.metadata.num_delivered or 1
        except Exception:  # noqa: BLE001 - not a JetStream message: treat as first delivery
            n = 1
        d = Delivery(msg=msg, stage=self.stage, priority=prio, num_delivered=n)
        if n > self.max_deliveries:
            await self._dead_letter(d, "max_deliver", "max_deliver",
                                    f"delivered {n} times (max {self.max_deliveries})")
            return
        ticker = asyncio.create_task(self._keep_alive(msg))
        outcome: BaseException | None = None
        try:
            await self.handler(d)
        except asyncio.CancelledError:
            raise  # stop() timed out: leave it un-acked, it is redelivered after ack_wait
        except Exception as e:  # noqa: BLE001 - every handler failure is routed below
            outcome = e
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await self._settle(d, outcome)

    async def _settle(self, d: Delivery, err: BaseException | None) -> None:
        if err is None:
            await self._safe(d.msg.ack(), "ack")
        elif isinstance(err, ProtocolError):
            DECODE_ERRORS.labels(self.stage.value, err.code).inc()
            await self._dead_letter(d, "decode", err.code, err)
        elif isinstance(err, RetryableError):
            if d.num_delivered >= self.max_deliveries:
                await self._dead_letter(d, "max_deliver", "max_deliver",
                                        f"retryable on the last delivery: {err}")
            else:
                await self._safe(d.msg.nak(delay=err.delay), "nak")
        else:
            self._log.error("work handler raised", error=repr(err), exc_info=err,
                            deliveries=d.num_delivered)
            await self._dead_letter(d, "handler_error", type(err).__name__, err)

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.in_progress_interval)
            await self._safe(msg.in_progress(), "in_progress")

    async def _safe(self, aw: Awaitable[Any], what: str) -> None:
        try:
            await aw
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a lost ack means a redelivery, not a crash
            self._log.warning(f"work message {what} failed", error=repr(e))

    async def _dead_letter(self, d: Delivery, reason: str, code: str, error: object) -> None:
        # Keep the caller's headers; of the Nats-* ones only Nats-Msg-Id (it makes a repeated
        # dead-letter a no-op): e.g. Nats-Expected-Stream would make the DLQ publish fail.
        headers = {k: v for k, v in d.headers.items()
                   if not k.startswith("Nats-") or k == "Nats-Msg-Id"}
        headers.update({"Epd-Error": _header_value(str(error) or type(error).__name__),
                        "Epd-Error-Code": _header_value(code), "Epd-Stage": self.stage.value,
                        "Epd-Deliveries": str(d.num_delivered), "Epd-Reason": reason,
                        "Epd-Subject": d.subject})
        for attempt in range(3):  # bounded: a JetStream outage must not pin the handler slot
            try:
                await self.js.publish(dlq_subject(self.stage, d.priority), d.data,
                                      headers=headers, timeout=2.0)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the message; dead-letter it next time
                if attempt == 2:
                    self._log.error("dead-letter publish failed; nak'ing", error=repr(e),
                                    reason=reason)
                    await self._safe(d.msg.nak(delay=1.0), "nak")
                    return
                await asyncio.sleep(backoff_delay(attempt, base=0.2))
        await self._safe(d.msg.term(), "term")
        DEAD_LETTERS.labels(self.stage.value, reason).inc()
        self._log.error("work message dead-lettered", reason=reason, code=code,
                        error=str(error)[:300], deliveries=d.num_delivered,
                        priority=d.priority.value, subject=d.subject)


async def subscribe_decoded(nc: Client, subject: str, expected: Any,
                            handler: Callable[..., Awaitable[None]], *, service: str = "",
                            queue: str = "", with_msg: bool = False) -> Subscription:
    """Subscribe to a core-NATS subject and call `handler(decoded)` per message
    (`handler(decoded, msg)` with `with_msg=True`, e.g. to reply).

    A message that fails to decode is logged and counted in
    epd_bus_decode_errors_total{stage=service or "ctl", code}; a handler exception is
    logged. Neither ends the subscription. Returns the nats Subscription (unsubscribe to
    stop), already flushed to the server. Raises nats errors (flush timeout) if unreachable.
    """
    label = service or "ctl"
    slog = log.bind(subject=subject, service=label)

    async def on_msg(msg: Msg) -> None:
        try:
            obj = decode_message(msg.data, expected=expected)
        except ProtocolError as e:
            DECODE_ERRORS.labels(label, e.code).inc()
            slog.warning("dropping malformed message", code=e.code, error=str(e)[:300],
                         on=msg.subject, size=len(msg.data))
            return
        try:
            await (handler(obj, msg) if with_msg else handler(obj))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the subscription must outlive its handler
            slog.error("control handler raised", error=repr(e), exc_info=e, on=msg.subject)

    sub = await nc.subscribe(subject, queue=queue, cb=on_msg)
    await nc.flush()
    return sub
