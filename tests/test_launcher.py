"""`epd up`: the whole stack on an embedded nats-server, healthy within 60 s, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from shared.bus.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_up(tmp_path: Path, model: str, *extra: str, timeout: float = 60.0) -> None:
    port = free_port()
    env = {**os.environ, "EPD_STATE_DIR": str(tmp_path / "state"), "EPD_LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", model,
                             "--gateway-port", str(port), *extra], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() - t0 < timeout, "no /health in time:\n" + (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["object"] == "model"
        deadline = time.monotonic() + 10
        while "epdserve is up" not in (tmp_path / "up.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5  # nats-server, scheduler, kvcache, worker(s), gateway
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc == 0, (tmp_path / "up.log").read_text()
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, f"{child} left behind"


def test_up_with_a_model_folder(tmp_path, tiny_llama_dir):
    run_up(tmp_path, str(tiny_llama_dir), "--mode", "pd")


@pytest.mark.slow
def test_up_default_model_prepares_smollm2(tmp_path):
    run_up(tmp_path, "smollm2", timeout=120)
    assert (tmp_path / "state" / "models" / "smollm2" / "config.json").exists()
