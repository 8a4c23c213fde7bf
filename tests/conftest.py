"""Shared fixtures: a real nats-server and connected clients. Keep this file generic;
feature-specific fixtures live next to their tests.

    nats_server     session-scoped NatsServer (JetStream, default max_payload); never kill it
    nats_server_fn  a fresh NatsServer per test: kill / restart it freely
    nc              nats client connected to `nats_server` (closed after the test)
    js              JetStream context of `nc`
    js_clean        `js` with every stream on `nats_server` deleted first (no topology left)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_asyncio

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # so `tests.harness` imports however pytest was started
    sys.path.insert(0, _ROOT)

from shared.bus.connection import connect  # noqa: E402
from tests.harness.nats import NatsServer  # noqa: E402


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    srv = NatsServer(store_dir=tmp_path_factory.mktemp("nats-session"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def nats_server_fn(tmp_path):
    srv = NatsServer(store_dir=tmp_path / "nats")
    srv.start()
    yield srv
    srv.kill()


@pytest_asyncio.fixture
async def nc(nats_server):
    client = await connect(nats_server.url, name="pytest", initial_timeout=10)
    yield client
    await client.close()


@pytest_asyncio.fixture
async def js(nc):
    return nc.jetstream()


@pytest_asyncio.fixture
async def js_clean(js):
    for info in await js.streams_info():
        await js.delete_stream(info.config.name)
    return js


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama HF folder with tokenizer and chat template (`epd model make-tiny`)."""
    from shared.engine.tiny import make_tiny

    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama") / "model")
