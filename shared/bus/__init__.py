"""NATS / JetStream helpers every service uses.

    connection.py  connect() with retried first connection + reconnects; server_max_payload()
    streams.py     ensure_topology() (streams, consumers, KV buckets); publish_work()
    work.py        PullWorkLoop (pull, in-progress acks, ack/nak/dead-letter); subscribe_decoded()
    chunked.py     ChunkServer / fetch(): payloads bigger than max_payload, pipelined
    bench.py       bus throughput benchmark (python -m shared.bus.bench)
"""

from shared.bus.chunked import ChunkServer, TransferError, fetch
from shared.bus.connection import backoff_delay, connect, server_max_payload
from shared.bus.streams import TopologyReport, ensure_topology, publish_work
from shared.bus.work import Delivery, PullWorkLoop, Retryable, RetryableError, subscribe_decoded

__all__ = [
    "ChunkServer",
    "Delivery",
    "PullWorkLoop",
    "Retryable",
    "RetryableError",
    "TopologyReport",
    "TransferError",
    "backoff_delay",
    "connect",
    "ensure_topology",
    "fetch",
    "publish_work",
    "server_max_payload",
    "subscribe_decoded",
]
