"""ASGI middleware: the body limit and the API key, both answered with OpenAI's error body."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from .api import ApiError

OPEN_PATHS = ("/health", "/")  # answered without the API key


class BodyLimit:
    """A request body over `max_bytes` is refused (413) before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(scope, receive, send)
        chunks, size = [], 0
        while True:  # the body is read whole here anyway (JSON): counted as it comes
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if given:
                return await receive()  # a disconnect, for streamed replies
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        err = ApiError(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                            "(serve --max-body-mib)", code="body_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


class ApiKey:
    """Every path but `OPEN_PATHS` needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and \
                dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") != self.expected:
            err = ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", kind="authentication_error",
                           code="invalid_api_key")
            return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)
