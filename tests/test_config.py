"""Config: CLI > EPD_* env > defaults; validation names the field; env round trip."""

from __future__ import annotations

import argparse

import pytest

from shared.config import (
    GatewayConfig,
    SchedulerConfig,
    UpConfig,
    WorkerConfig,
    add_arguments,
    from_sources,
    to_env,
)


def parse(cls, argv):
    p = argparse.ArgumentParser()
    add_arguments(p, cls)
    return p.parse_args(argv)


def test_precedence_cli_over_env_over_default():
    env = {"EPD_HTTP_PORT": "9001", "EPD_NATS_URL": "nats://env:4222"}
    cfg = from_sources(GatewayConfig, parse(GatewayConfig, ["--http-port", "9002"]), env=env)
    assert cfg.http_port == 9002
    assert cfg.nats_url == "nats://env:4222"
    assert cfg.max_body_mb == 32.0


def test_types_bools_tuples_optionals():
    env = {"EPD_API_KEYS": "a,b", "EPD_ALLOW_REMOTE_IMAGES": "yes", "EPD_SERVED_MODEL_NAME": ""}
    cfg = from_sources(GatewayConfig, None, env=env)
    assert cfg.api_keys == ("a", "b")
    assert cfg.allow_remote_images is True
    assert cfg.served_model_name is None
    cfg = from_sources(GatewayConfig, parse(GatewayConfig, ["--no-allow-remote-images"]), env=env)
    assert cfg.allow_remote_images is False


@pytest.mark.parametrize("cls,env,field", [
    (GatewayConfig, {"EPD_HTTP_PORT": "70000"}, "http_port"),
    (GatewayConfig, {"EPD_HTTP_PORT": "eighty"}, "http_port"),
    (GatewayConfig, {"EPD_NATS_URL": "http://x"}, "nats_url"),
    (WorkerConfig, {"EPD_DEVICE": "tpu"}, "device"),
    (WorkerConfig, {"EPD_HEARTBEAT_S": "0"}, "heartbeat_s"),
    (SchedulerConfig, {"EPD_LAYOUT": "prefill=x"}, "layout"),
    (UpConfig, {"EPD_WORKERS": "0"}, "workers"),
])
def test_validation_names_the_field(cls, env, field):
    with pytest.raises(ValueError, match=field):
        from_sources(cls, None, env=env)


def test_to_env_round_trips():
    cfg = WorkerConfig(role="decode", worker_id="w-1", threads=2, nats_url="nats://a:1,nats://b:2")
    again = from_sources(WorkerConfig, None, env=to_env(cfg))
    assert again == cfg
    assert again.nats_servers == ["nats://a:1", "nats://b:2"]


def test_layout_and_roles():
    assert SchedulerConfig(layout="prefill=2, decode=1").layout_counts == {"prefill": 2, "decode": 1}
    assert UpConfig(mode="epd").worker_roles == ["encode", "prefill", "decode"]
    assert UpConfig(mode="colocated", workers=2).worker_roles == ["mixed", "mixed"]
    assert UpConfig(mode="pd", decode_workers=2).worker_roles == ["prefill", "decode", "decode"]
