"""Service processes for tests: `python -m <module>` with env, output captured to a file.

    proc = PythonProc("services.gateway", ["--port", "0"], env={"EPD_NATS_URL": url},
                      log_path=tmp_path / "gateway.log").start()
    await await_healthy("http://127.0.0.1:8080/health", timeout=20)
    proc.stop()          # SIGTERM, then SIGKILL after a timeout; returns the exit code
    print(proc.output())
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

Predicate = Callable[[], "bool | Awaitable[bool]"]


class PythonProc:
    """One `sys.executable -m module args...` child. `stop`/`kill` are no-ops once exited."""

    def __init__(self, module: str, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 log_path: str | Path, cwd: str | Path | None = None) -> None:
        self.module = module
        self.args = [str(a) for a in args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.log_path = Path(log_path)
        self.cwd = Path(cwd or REPO_ROOT)
        self.proc: subprocess.Popen | None = None

    def start(self) -> PythonProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args],
                                         env=self.env, cwd=self.cwd, stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash). Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode

    def output(self, tail: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def wait_healthy(url_or_predicate: str | Callable[[], bool], timeout: float = 30.0,
                 interval: float = 0.05, proc: PythonProc | None = None) -> None:
    """Block until GET url answers 2xx (or predicate() is true). Raises TimeoutError, or
    RuntimeError with its output if `proc` exits first."""
    check = (lambda: _http_ok(url_or_predicate)) if isinstance(url_or_predicate, str) else url_or_predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.proc is not None and not proc.running:
            raise RuntimeError(f"{proc.module} exited rc={proc.returncode}:\n{proc.output(60)}")
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"not healthy after {timeout}s: {url_or_predicate!r}")


async def await_healthy(url_or_predicate: str | Predicate, timeout: float = 30.0,
                        interval: float = 0.05, proc: PythonProc | None = None) -> None:
    """Async `wait_healthy`: the predicate may be sync or async; HTTP checks run in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.proc is not None and not proc.running:
            raise RuntimeError(f"{proc.module} exited rc={proc.returncode}:\n{proc.output(60)}")
        if isinstance(url_or_predicate, str):
            ok = await asyncio.to_thread(_http_ok, url_or_predicate)
        else:
            ok = url_or_predicate()
            if inspect.isawaitable(ok):
                ok = await ok
        if ok:
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"not healthy after {timeout}s: {url_or_predicate!r}")
