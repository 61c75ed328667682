"""ASGI middlewares of the HTTP API: the body guard (cap and strict JSON before any route) and the
request counter (every answer by route and status, 413s and 500s included).
What this does not do: routes, keys, or anything with the engine (api.py, service.py).
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from .protocol import APIError, error_body, parse_json_body


class BodyGuard:
    """ASGI middleware: a POST body over `max_bytes` gets 413 (by its Content-Length, or as soon as the
    bytes read pass the cap); a body that is not strict JSON gets 400. Either way the route never runs.
    A good body is handed on as it came; later `receive` calls reach the client (disconnects)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            parse_json_body(body)
        except APIError as e:
            response = JSONResponse(error_body(e.status, str(e), e.param), e.status)
            return await response(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"] = headers + [(b"content-type", b"application/json")]      # curl -d sends a form type
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes:
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                                "(--max-request-bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


class CountRequests:
    """ASGI middleware, outermost: every answer counted by route and status (413s and 500s included)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.counter.labels(getattr(scope.get("route"), "path", "other"), str(status)).inc()
