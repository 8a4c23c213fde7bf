"""`epd --help` and every subcommand's help explain themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.cli import build_parser, main

COMMANDS = [[], ["up"], ["gateway"], ["scheduler"], ["kvcache"], ["worker"], ["model"],
            ["model", "prepare"], ["model", "make-tiny"], ["bench"], ["bench", "bus"], ["bench", "engine"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "epd")
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: epd" in out
    assert len(out.splitlines()) > 3


def test_service_help_names_env_vars(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--help"])
    out = capsys.readouterr().out
    for flag, env in [("--nats-url", "EPD_NATS_URL"), ("--role", "EPD_ROLE"), ("--threads", "EPD_THREADS")]:
        assert flag in out and env in out


def test_bad_value_is_a_clear_error(capsys):
    assert main(["worker", "--heartbeat-s", "0"]) == 2
    assert "heartbeat_s" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "epd up" in out.stdout
