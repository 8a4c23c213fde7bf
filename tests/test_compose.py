"""docker-compose.yml can't run here (no Docker engine): check what can be checked statically."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from services.cli import SERVICES, build_parser
from shared.config import env_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_core_services_present(compose):
    names = set(compose["services"])
    assert {"nats", "gateway", "scheduler", "kvcache", "worker-encode", "worker-prefill", "worker-decode"} <= names
    assert "-js" in compose["services"]["nats"]["command"]
    assert compose["services"]["nats"]["volumes"]


def test_every_command_exists_in_the_cli(compose):
    parser = build_parser()
    for name, svc in compose["services"].items():
        if name == "nats":
            continue
        parser.parse_args(svc["command"])  # SystemExit(2) on an unknown command


def test_env_names_match_the_config(compose):
    for name, svc in compose["services"].items():
        if name == "nats" or svc["command"][0] not in SERVICES:
            continue
        cls = SERVICES[svc["command"][0]][0]
        known = {env_name(f.name) for f in dataclasses.fields(cls)}
        unknown = set(svc.get("environment", {})) - known
        assert not unknown, f"{name}: {unknown} are not fields of {cls.__name__}"


def test_ports_and_healthchecks(compose):
    gw = compose["services"]["gateway"]
    assert gw["environment"]["EPD_HTTP_PORT"] == "8000" and "8000:8000" in gw["ports"]
    assert compose["services"]["nats"]["healthcheck"]
    for name in ("gateway", "scheduler", "kvcache", "worker-decode"):
        assert compose["services"][name]["healthcheck"]["test"]
        assert compose["services"][name]["environment"]["EPD_NATS_URL"] == "nats://nats:4222"
    roles = {compose["services"][f"worker-{r}"]["environment"]["EPD_ROLE"] for r in ("encode", "prefill", "decode")}
    assert roles == {"encode", "prefill", "decode"}


def test_dockerfile_builds_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["epd"]' in text and "pip install" in text
