"""Prometheus metrics shared by every service, and the tiny HTTP endpoint that serves them.

Each process has one default registry; metrics are module-level objects named `epd_*`.
`http_app(health)` builds an aiohttp app with `/metrics` and `/health` that any service mounts
(the gateway adds these routes to its API app instead).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

SERVICE_UP = Gauge("epd_service_up", "1 while the service runs and is connected to NATS", ["service"])
BUS_CONNECTED = Gauge("epd_bus_connected", "1 while connected to NATS", ["service"])
BUS_RECONNECTS = Counter("epd_bus_reconnects_total", "NATS reconnections", ["service"])
PROTOCOL_ERRORS = Counter("epd_protocol_errors_total", "malformed or unknown messages received", ["service", "code"])
HEARTBEATS = Counter("epd_heartbeats_total", "heartbeats received by the scheduler")
WORKERS = Gauge("epd_workers", "live workers by role", ["role"])
ROLE_COMMANDS = Counter("epd_role_commands_total", "role commands sent", ["role", "reason"])
HTTP_REQUESTS = Counter("epd_http_requests_total", "HTTP requests", ["route", "status"])
HTTP_LATENCY = Histogram("epd_http_request_seconds", "HTTP request latency", ["route"])

HealthFn = Callable[[], Awaitable[tuple[bool, dict]]]


async def metrics_handler(_request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


def health_handler(health: HealthFn):
    async def handle(_request: web.Request) -> web.Response:
        ok, detail = await health()
        return web.json_response({"status": "ok" if ok else "unavailable", **detail}, status=200 if ok else 503)

    return handle


def http_app(health: HealthFn) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/health", health_handler(health))
    return app
