"""Services as real processes on a real nats-server: health, registry, role commands,
OpenAI-format errors, malformed messages, and reconnecting after the server dies."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import msgpack
import openai
import pytest
import pytest_asyncio

from shared.bus.connection import connect
from shared.protocol import Heartbeat, RoleCommand, decode, encode
from shared.protocol import subjects as subj
from tests.harness import PythonProc

pytestmark = pytest.mark.timeout(120)


def start_service(tmp_path, name: str, nats_url: str, **env) -> tuple[PythonProc, int]:
    ready = tmp_path / f"{name}-{env.get('EPD_WORKER_ID', '')}.ready"
    base = {"EPD_NATS_URL": nats_url, "EPD_HTTP_PORT": "0", "EPD_LOG_FORMAT": "json",
            "EPD_ACK_WAIT_S": "5", **{k: str(v) for k, v in env.items()}}
    proc = PythonProc("services.cli", [name, "--ready-file", str(ready)], env=base,
                      log_path=tmp_path / f"{name}-{env.get('EPD_WORKER_ID', '')}.log").start()
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()):
        assert proc.running, f"{name} exited:\n{proc.output()}"
        assert time.monotonic() < deadline, f"{name} not ready:\n{proc.output()}"
        time.sleep(0.05)
    return proc, int(ready.read_text())


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def wait_for(pred, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


async def registered(js, worker_id: str) -> Heartbeat | None:
    kv = await js.key_value(subj.WORKERS_BUCKET)
    try:
        entry = await kv.get(worker_id)
    except Exception:
        return None
    return decode(entry.value, Heartbeat) if entry.value else None


@pytest.fixture(scope="module")
def stack(nats_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    procs = {}
    procs["scheduler"] = start_service(tmp, "scheduler", nats_server.url, EPD_HEARTBEAT_TIMEOUT_S=3)
    procs["kvcache"] = start_service(tmp, "kvcache", nats_server.url)
    procs["worker"] = start_service(tmp, "worker", nats_server.url, EPD_WORKER_ID="w-svc", EPD_ROLE="mixed",
                                    EPD_HEARTBEAT_S="0.2")
    procs["gateway"] = start_service(tmp, "gateway", nats_server.url, EPD_MODEL="tiny-model")
    yield {name: port for name, (_, port) in procs.items()}
    for proc, _ in procs.values():
        assert proc.stop() == 0, proc.output()  # SIGTERM -> drain -> exit 0


def test_every_service_is_healthy(stack):
    for port in stack.values():
        status, body = http_get(port, "/health")
        assert status == 200, body
        assert http_get(port, "/metrics")[0] == 200


async def test_worker_registers_and_scheduler_records_it(stack, js):
    hb = await wait_for(lambda: registered(js, "w-svc"))
    assert hb.role == "mixed" and hb.state == "ready"


async def test_role_command_switches_role_and_stale_epochs_are_ignored(stack, nc, js):
    await wait_for(lambda: registered(js, "w-svc"))
    await nc.publish(subj.role_subject("w-svc"), encode(RoleCommand(worker_id="w-svc", role="decode", epoch=10,
                                                                    reason="test")))

    async def role_is(role):
        hb = await registered(js, "w-svc")
        return hb is not None and hb.role == role and hb.state == "ready"

    await wait_for(lambda: role_is("decode"))
    await nc.publish(subj.role_subject("w-svc"), encode(RoleCommand(worker_id="w-svc", role="prefill", epoch=3,
                                                                    reason="stale")))
    await asyncio.sleep(1.0)
    assert await role_is("decode")
    await nc.publish(subj.role_subject("w-svc"), encode(RoleCommand(worker_id="w-svc", role="mixed", epoch=11,
                                                                    reason="back")))
    await wait_for(lambda: role_is("mixed"))


async def test_malformed_messages_are_counted_and_services_keep_running(stack, nc, js):
    good = msgpack.packb({"v": 1, "t": "heartbeat"})
    wrong_version = msgpack.packb({"v": 999, "t": "heartbeat", "worker_id": "x"})
    wrong_type = encode(RoleCommand(worker_id="w-svc", role="decode", epoch=1, reason="wrong subject"))
    for payload in (b"\xc1garbage", good[:-1], wrong_version, wrong_type, b""):
        await nc.publish(subj.heartbeat_subject(), payload)
        await nc.publish(subj.role_subject("w-svc"), payload[:5] or b"\x00")
        await nc.publish(subj.kv_events_subject(), payload)
    await nc.flush()
    await asyncio.sleep(0.5)
    for name in ("scheduler", "kvcache", "worker"):
        status, metrics_text = http_get(stack[name], "/metrics")
        assert status == 200
        errors = [line for line in metrics_text.splitlines()
                  if line.startswith("epd_bus_decode_errors_total{") and not line.endswith(" 0.0")]
        assert errors, f"{name} counted no decode errors:\n{metrics_text[:2000]}"
    before = (await registered(js, "w-svc")).seq
    await wait_for(lambda: _newer(js, "w-svc", before))  # still processing good heartbeats


async def _newer(js, worker_id, seq):
    hb = await registered(js, worker_id)
    return hb is not None and hb.seq > seq


def test_gateway_speaks_openai_errors(stack):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack['gateway']}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-model"]
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "model_not_found" if isinstance(exc.value.body, dict) else True
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503
    req = urllib.request.Request(f"http://127.0.0.1:{stack['gateway']}/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req, timeout=5)
    assert http_exc.value.code == 400
    body = http_exc.value.read().decode()
    assert '"type": "invalid_request_error"' in body and "not valid JSON" in body
    status, body = http_get(stack["gateway"], "/v1/nothing")
    assert status == 404 and '"error"' in body


def test_api_keys(nats_server, tmp_path):
    proc, port = start_service(tmp_path, "gateway", nats_server.url, EPD_MODEL="m", EPD_API_KEYS="k1,k2")
    try:
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0)
        assert good.models.list().data[0].id == "m"
        assert http_get(port, "/health")[0] == 200  # health needs no key
    finally:
        assert proc.stop() == 0


@pytest_asyncio.fixture
async def fn_client(nats_server_fn):
    nc = await connect(nats_server_fn.url, name="pytest-fn", initial_timeout=10)
    yield nc
    await nc.close()


async def test_static_layout_moves_workers(nats_server_fn, fn_client, tmp_path):
    js = fn_client.jetstream()
    sched, _ = start_service(tmp_path, "scheduler", nats_server_fn.url, EPD_LAYOUT="prefill=1,decode=1",
                             EPD_INTERVAL_S="0.3")
    workers = [start_service(tmp_path, "worker", nats_server_fn.url, EPD_WORKER_ID=f"w{i}", EPD_ROLE="mixed",
                             EPD_HEARTBEAT_S="0.2")[0] for i in range(2)]
    try:
        async def roles():
            hbs = [await registered(js, f"w{i}") for i in range(2)]
            got = sorted(h.role for h in hbs if h is not None and h.state == "ready")
            return got == ["decode", "prefill"]

        await wait_for(roles, timeout=20)
        roles_kv = await js.key_value(subj.ROLES_BUCKET)
        cmd = decode((await roles_kv.get("w0")).value, RoleCommand)
        assert cmd.epoch >= 1 and cmd.role in ("prefill", "decode")
    finally:
        for p in [*workers, sched]:
            assert p.stop() == 0, p.output()


async def test_services_reconnect_after_nats_restart(nats_server_fn, tmp_path):
    sched, sport = start_service(tmp_path, "scheduler", nats_server_fn.url)
    worker, _ = start_service(tmp_path, "worker", nats_server_fn.url, EPD_WORKER_ID="w-re", EPD_HEARTBEAT_S="0.2")
    try:
        nc = await connect(nats_server_fn.url, name="pytest-re", initial_timeout=10)
        js = nc.jetstream()
        seq = (await wait_for(lambda: registered(js, "w-re"))).seq
        await nc.close()
        nats_server_fn.kill()
        await asyncio.sleep(1.5)
        assert sched.running and worker.running
        assert http_get(sport, "/health")[0] == 503  # honest while the bus is down
        nats_server_fn.restart()
        nc = await connect(nats_server_fn.url, name="pytest-re2", initial_timeout=10)
        js = nc.jetstream()
        await wait_for(lambda: _newer(js, "w-re", seq), timeout=30)  # heartbeats flow again end to end
        await wait_for(lambda: _healthy(sport), timeout=10)
        await nc.close()
    finally:
        for p in (worker, sched):
            assert p.stop() == 0, p.output()


async def _healthy(port):
    return http_get(port, "/health")[0] == 200
