"""The HTTP layer: routes, API-key check, errors as OpenAI JSON, streaming and client disconnects."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bonbench.server import protocol as P
from bonbench.server.body_limit import BodyLimit
from bonbench.server.errors import APIError, InvalidRequest, NotFound, Unauthorized
from bonbench.server.service import BestOfNService

log = logging.getLogger(__name__)
T = TypeVar("T")
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")

# Every error status the API answers with, as the OpenAPI document states it.
_ERROR_STATUSES = {
    400: "Invalid request: malformed JSON, a field out of range, or a prompt too long "
         "(code context_length_exceeded)",
    401: "Missing or wrong API key (only when the server was started with --api-key)",
    404: "The model is not the one this server serves (code model_not_found)",
    413: "The request body is larger than --max-body-mb (code request_too_large)",
    500: "Generation or the reward model failed",
    502: "The upstream server failed (--upstream)",
    503: "The server already holds --max-in-flight requests; retry later",
}
# With stream=true: one server-sent event per chunk, its data a chunk's JSON, the last one "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE] at the end"}}}
_STREAM = {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
           "description": "The reply, or with stream=true its chunks as server-sent events"}


def _responses(*statuses: int) -> dict:
    return {status: {"model": P.ErrorResponse, "description": _ERROR_STATUSES[status]} for status in statuses}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    # Wait for the ASGI disconnect message itself. Polling request.is_disconnected() never sees it
    # behind the @app.middleware("http") guard: Starlette's BaseHTTPMiddleware swallows the message
    # when the receive is cancelled at once, as is_disconnected does.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it so the model stops working for it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in errors[:5])
    return text, param


def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async def gen():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as err:  # headers are sent already: the error travels as an event
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return gen()


def build_app(service: BestOfNService, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    app = FastAPI(title="bonbench", summary="Best-of-N behind an OpenAI-compatible API", lifespan=lifespan)
    metrics = service.metrics
    _document_errors_only_as_sent(app)
    # Added before the guard, so it runs inside it: the API key is checked first and 413s are counted.
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        if api_key and path.startswith("/v1/") and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            response = JSONResponse(Unauthorized("missing or wrong API key", code="invalid_api_key").body(), 401)
        else:
            response = await call_next(request)
        if path.startswith("/v1/"):
            # Unknown paths share one label: a series per path a client invents would grow without bound.
            endpoint = path if path in _ENDPOINTS else "other"
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(InvalidRequest(message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = NotFound(f"no route {request.method} {request.url.path}") if exc.status_code == 404 else \
            InvalidRequest(str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=_responses(401))
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=service.model_name)])

    generation_errors = {200: _STREAM, **_responses(400, 401, 404, 413, 500, 502, 503)}

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, response_model_exclude_none=True,
              responses=generation_errors)
    async def chat(req: P.ChatCompletionRequest, request: Request):
        if req.stream:
            return await _stream(request, service.stream_chat(req))
        return await _unless_disconnected(request, service.chat(req))

    @app.post("/v1/completions", response_model=P.CompletionResponse, response_model_exclude_none=True,
              responses=generation_errors)
    async def complete(req: P.CompletionRequest, request: Request):
        if req.stream:
            return await _stream(request, service.stream_completion(req))
        return await _unless_disconnected(request, service.complete(req))

    return app


def _document_errors_only_as_sent(app: FastAPI) -> None:
    """Drop FastAPI's 422 from the OpenAPI document: the server answers invalid requests with a 400."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


async def _stream(request: Request, chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Start the stream only once the first chunk exists, so that validation errors, a full
    queue or a failed reward still answer with a proper status instead of a broken stream."""
    first = await _unless_disconnected(request, chunks.__anext__())

    async def replay():
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(_sse(replay()), media_type="text/event-stream")
