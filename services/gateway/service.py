"""The gateway: the OpenAI-compatible HTTP front door.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics. Requests are parsed and validated here; requests that pass are handed to the
stage queues by the pipeline (until a model is served, completions answer 503 in OpenAI's
error format).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aiohttp import web

from services.gateway.errors import APIError, auth_middleware, error_middleware
from shared.config import GatewayConfig
from shared.service import ServiceContext


class GatewayService:
    name = "gateway"

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.model_id = cfg.served_model_name or Path(cfg.model).name
        self.created = int(time.time())
        self.ctx: ServiceContext | None = None
        self.app = web.Application(client_max_size=int(cfg.max_body_mb * 1024 * 1024),
                                   middlewares=[error_middleware, auth_middleware(cfg.api_keys)])
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model}", self.model)
        self.app.router.add_post("/v1/chat/completions", self.completions)
        self.app.router.add_post("/v1/completions", self.completions)

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "epdserve"}

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_id:
            raise APIError(404, f"model {request.match_info['model']!r} does not exist", param="model",
                           code="model_not_found")
        return web.json_response(self._model_card())

    async def read_json(self, request: web.Request) -> dict:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required and must be a string", param="model")
        if model != self.model_id:
            raise APIError(404, f"model {model!r} does not exist (served: {self.model_id!r})",
                           param="model", code="model_not_found")
        return body

    async def completions(self, request: web.Request) -> web.Response:
        await self.read_json(request)
        raise APIError(503, "no model is being served yet: the E/P/D pipeline is not wired in this build",
                       code="service_unavailable")

    async def health(self) -> tuple[bool, dict]:
        ok = bool(self.ctx and self.ctx.nc.is_connected)
        return ok, {"model": self.model_id, "nats": "connected" if ok else "disconnected"}

    async def drain(self) -> None:
        return None
