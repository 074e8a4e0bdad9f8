"""A cap on request bodies, enforced before the app reads them.

Without it one client can make the server buffer, parse and tokenise tens of megabytes while
everyone else waits. A declared ``Content-Length`` over the cap is refused before a byte of the body
is read; a body without one (chunked) is counted as it arrives and refused as soon as it passes
the cap, so the server never holds more than the cap of it. Either way the answer is a 413 with
OpenAI's error body; the rest of an oversized body is drained and dropped by the HTTP server.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bonbench.server.errors import RequestTooLarge


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get a 413 before the app sees them."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:  # the HTTP server holds the client to it
            if declared > self.max_bytes:
                await self._refuse(send, f"the request body is {_mb(declared)}")
            else:
                await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left: the app will see it
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, f"the request body passed {_mb(self.max_bytes)} and was still coming")
                return
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str) -> None:
        error = RequestTooLarge(f"{what}; this server accepts at most {_mb(self.max_bytes)} "
                                f"(bonbench serve --max-body-mb)", code="request_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f}".rstrip("0").rstrip(".") + " MB"
