"""OpenAI-format errors and the middleware that guarantees every failure uses them.

Any `APIError` raised by a handler becomes `{"error": {"message", "type", "param", "code"}}`
with its HTTP status; aiohttp's own HTTP errors (404 route, 405 method, 413 body) are
rewritten to the same shape; anything unexpected is a logged 500 without a stack trace.
"""

from __future__ import annotations

from aiohttp import web

from shared import metrics
from shared.logging import get_logger

log = get_logger("gateway")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body, as sent in a response or inside a failed SSE stream."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_object(status, message, param, code), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except APIError as exc:
        status = exc.status
        return error_response(exc.status, exc.message, exc.param, exc.code)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        message = {404: f"no route {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}",
                   413: "request body too large"}.get(exc.status, exc.reason)
        return error_response(exc.status, message)
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(500, "internal server error")
    finally:
        metrics.HTTP_REQUESTS.labels(route, str(status)).inc()


def auth_middleware(api_keys: tuple[str, ...]):
    keys = frozenset(api_keys)

    @web.middleware
    async def check(request: web.Request, handler):
        if keys and request.path.startswith("/v1/"):
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if token not in keys:
                raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check
