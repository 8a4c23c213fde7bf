"""Configuration: frozen dataclasses, one `EPD_*` env var and one `--flag` per field.

A field `nats_url` is set, highest precedence first, by `--nats-url`, then `EPD_NATS_URL`, then
its default. Every config validates itself in `__post_init__` and raises ValueError naming the
field. `add_arguments(parser, Cls)` and `from_sources(Cls, args)` are the only glue a CLI needs,
so the same names work on the command line, in the environment and in docker-compose.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field

ENV_PREFIX = "EPD_"
ROLES = ("encode", "prefill", "decode", "mixed")
MODES = ("colocated", "pd", "epd")


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its CLI help text (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp):
    """(scalar type, optional, is_sequence) for an annotation like `int | None` or `tuple[str, ...]`."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _parse(raw: str, tp, name: str):
    scalar, optional, seq = _base_type(tp)
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    if seq:
        return tuple(_parse_scalar(p.strip(), scalar, name) for p in raw.split(",") if p.strip())
    return _parse_scalar(raw, scalar, name)


def _parse_scalar(raw: str, scalar, name: str):
    try:
        if scalar is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return scalar(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: cannot parse {raw!r} as {scalar.__name__}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of config class `cls` (default None = not given on the CLI)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        scalar, _, seq = _base_type(hints[f.name])
        meta_help = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{meta_help} [env {env_name(f.name)}; default: {shown}]"
        kwargs: dict = {"dest": f.name, "default": None, "help": help_text}
        if scalar is bool and not seq:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            kwargs["type"] = str
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_name(f.name), **kwargs)


def from_sources(cls, args: argparse.Namespace | dict | None = None, env: typing.Mapping[str, str] | None = None, **overrides):
    """Build `cls` from CLI args > `EPD_*` env > defaults; `overrides` win over everything."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif given.get(f.name) is not None:
            raw = given[f.name]
            values[f.name] = _parse(raw, hints[f.name], f.name) if isinstance(raw, str) else raw
        elif env_name(f.name) in env:
            values[f.name] = _parse(env[env_name(f.name)], hints[f.name], f.name)
    return cls(**values)


def to_env(cfg) -> dict[str, str]:
    """The `EPD_*` environment that reproduces `cfg` in a child process."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, tuple):
            v = ",".join(map(str, v))
        elif isinstance(v, bool):
            v = "true" if v else "false"
        out[env_name(f.name)] = str(v)
    return out


def require(cond: bool, name: str, msg: str) -> None:
    """Raise ValueError('<name>: <msg>') unless `cond`: how every config names a bad field."""
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class ServiceConfig:
    """Fields every service process shares."""

    nats_url: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated for a cluster")
    state_dir: str = opt(".state", "folder for models, NATS data and caches")
    log_level: str = opt("info", "log level", ("debug", "info", "warning", "error"))
    log_format: str = opt("auto", "log format (auto: pretty on a TTY, JSON otherwise)", ("auto", "json", "console"))
    http_host: str = opt("127.0.0.1", "address of this service's HTTP endpoint (/health, /metrics)")
    http_port: int = opt(0, "port of this service's HTTP endpoint (0: pick a free one)")
    js_replicas: int = opt(1, "JetStream stream/bucket replicas (3 on a 3-node cluster)")
    ack_wait_s: float = opt(30.0, "seconds before an un-acked work message is redelivered")
    max_deliver: int = opt(5, "deliveries before a work message is dead-lettered")

    def __post_init__(self) -> None:
        require(all(u.strip().startswith(("nats://", "tls://", "ws://", "wss://")) for u in self.nats_url.split(",")),
                 "nats_url", f"must be nats:// URL(s), got {self.nats_url!r}")
        require(0 <= self.http_port < 65536, "http_port", "must be in [0, 65535]")
        require(self.js_replicas in (1, 3, 5), "js_replicas", "must be 1, 3 or 5")
        require(self.ack_wait_s >= 1, "ack_wait_s", "must be >= 1")
        require(self.max_deliver >= 1, "max_deliver", "must be >= 1")

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    http_port: int = opt(8000, "port of the OpenAI-compatible HTTP API")
    model: str = opt("smollm2", "model name served (a name under <state_dir>/models or a folder path)")
    served_model_name: str | None = opt(None, "model id reported by /v1/models (default: the model's name)")
    api_keys: tuple[str, ...] = opt((), "accepted API keys (comma-separated); empty: no auth")
    max_body_mb: float = opt(32.0, "largest accepted request body in MiB")
    request_timeout_s: float = opt(600.0, "longest a request may run before it is cancelled")
    allow_remote_images: bool = opt(False, "allow http(s) image URLs (else only data: URLs)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_body_mb > 0, "max_body_mb", "must be > 0")
        require(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")


@dataclass(frozen=True)
class WorkerConfig(ServiceConfig):
    role: str = opt("mixed", "stage this worker starts in", ROLES)
    worker_id: str | None = opt(None, "unique worker id (default: host-pid)")
    model: str = opt("smollm2", "model name under <state_dir>/models, or a folder path")
    dtype: str = opt("float32", "model dtype", ("float32", "bfloat16", "float16"))
    device: str = opt("cpu", "device: cpu, cuda, cuda:N, npu, npu:N")
    threads: int = opt(1, "torch threads for this worker (0: torch's default)")
    heartbeat_s: float = opt(1.0, "seconds between heartbeats")
    max_batch: int = opt(64, "most work items pulled and run at once")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.heartbeat_s > 0, "heartbeat_s", "must be > 0")
        require(self.threads >= 0, "threads", "must be >= 0")
        require(self.max_batch >= 1, "max_batch", "must be >= 1")
        require(self.device.split(":")[0] in ("cpu", "cuda", "npu"), "device", f"unknown device {self.device!r}")

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")


@dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    policy: str = opt("static", "role policy", ("static",))
    layout: str = opt("", "static layout, e.g. 'prefill=1,decode=1' (empty: keep the roles workers start with)")
    heartbeat_timeout_s: float = opt(5.0, "a worker silent this long is considered dead")
    interval_s: float = opt(1.0, "seconds between scheduling decisions")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0")
        require(self.interval_s > 0, "interval_s", "must be > 0")
        _ = self.layout_counts  # parses, so a bad layout fails here

    @property
    def layout_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.layout.split(","))):
            role, _, n = part.partition("=")
            if role not in ROLES or not n.isdigit():
                raise ValueError(f"layout: bad entry {part!r} (want role=count, role in {ROLES})")
            out[role] = int(n)
        return out


@dataclass(frozen=True)
class KVCacheConfig(ServiceConfig):
    host_cache_gb: float = opt(1.0, "host-memory tier size in GiB")
    disk_cache_gb: float = opt(0.0, "disk tier size in GiB (0: off)")


@dataclass(frozen=True)
class UpConfig(ServiceConfig):
    """`epd up`: the whole stack on one machine."""

    nats_url: str = opt("", "use this NATS server instead of starting an embedded one")
    nats_port: int = opt(0, "port of the embedded nats-server (0: a free one)")
    mode: str = opt("colocated", "deployment mode", MODES)
    workers: int = opt(1, "number of mixed workers (colocated mode)")
    encode_workers: int = opt(1, "encode workers (epd mode)")
    prefill_workers: int = opt(1, "prefill workers (pd, epd modes)")
    decode_workers: int = opt(1, "decode workers (pd, epd modes)")
    gateway_port: int = opt(8000, "port of the OpenAI-compatible API")
    model: str = opt("smollm2", "model name under <state_dir>/models, or a folder path")
    dtype: str = opt("float32", "model dtype", ("float32", "bfloat16", "float16"))
    device: str = opt("cpu", "device for the workers")
    threads: int = opt(1, "torch threads per worker")

    def __post_init__(self) -> None:
        if self.nats_url:
            super().__post_init__()
        require(0 <= self.nats_port < 65536, "nats_port", "must be in [0, 65535]")
        for name in ("workers", "encode_workers", "prefill_workers", "decode_workers"):
            require(getattr(self, name) >= 1, name, "must be >= 1")

    @property
    def worker_roles(self) -> list[str]:
        if self.mode == "colocated":
            return ["mixed"] * self.workers
        if self.mode == "pd":
            # PD: encode runs with prefill (mixed-capable prefill workers), decode apart.
            return ["prefill"] * self.prefill_workers + ["decode"] * self.decode_workers
        return (["encode"] * self.encode_workers + ["prefill"] * self.prefill_workers
                + ["decode"] * self.decode_workers)
