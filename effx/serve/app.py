"""The HTTP side of ``effx serve``: a FastAPI app with the OpenAI routes over an engine
(:mod:`effx.serve.engine`).

A completion request is checked (schema, model name, room in the context), its prompt encoded (chat
messages through the tokenizer's chat template, as ``effx chat`` renders them), and submitted to the engine;
its tokens come back as events on an asyncio queue and become text (:class:`effx.serve.text.TextStream`),
sent whole or as server-sent events. A stream whose client goes away cancels its request. Every error is
OpenAI's JSON error shape with its status: 400 for a bad request, 404 for an unknown model or route, 413
for an oversized body, 429 with ``Retry-After`` when the queue is full, 500 (no traceback) otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime.sampling import Sampler
from .engine import Engine, Event, QueueFull
from .engine import Request as EngineRequest
from .metrics import Metrics
from .schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatRequest,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorDetail,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
)
from .text import TextStream

__all__ = ["ApiError", "BodyLimit", "CountRequests", "Limits", "create_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """``max_positions``: the model's context (prompt + new tokens); ``default_max_tokens``: the new tokens
    of a request that does not say (less where the context has less room); ``max_body``: bytes a request
    body may hold; ``retry_after``: seconds a 429 asks the client to wait."""

    max_positions: int
    default_max_tokens: int = 256
    max_body: int = 1 << 20
    retry_after: int = 1


class ApiError(HTTPException):
    """An error answered in OpenAI's shape (an HTTPException, so that FastAPI's body parsing passes it on)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status_code, headers=error.headers)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413, by its ``Content-Length`` before it is
    read, or as it is received."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await _error_response(self._too_large())(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self._too_large()
            return message

        await self.app(scope, limited, send)


class CountRequests:
    """ASGI middleware: counts every answer by status and path (one of ``paths``, else ``other``); a pure
    ASGI middleware, as FastAPI's ``@app.middleware`` wraps ``receive`` and hides a client's disconnect
    from the routes."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in self.paths else "other"  # bounded labels
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _validation_error(error: RequestValidationError) -> ApiError:
    first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx")
        why = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return ApiError(400, f"the body is not valid JSON: {why}".strip(), code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def _install_errors(app: FastAPI, metrics: Metrics) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, ApiError):
            assert isinstance(exc, HTTPException)
            exc = ApiError(
                exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
            )
        return _error_response(exc)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error_response(_validation_error(exc))

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return _error_response(ApiError(500, "internal server error", kind="server_error"))

    app.add_exception_handler(HTTPException, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, internal)


class Server:
    """What the routes share: the engine, the tokenizer (``encode``, ``decode``, ``encode_chat``), the model
    name and the limits."""

    def __init__(self, engine: Engine, tokenizer: Any, model: str, limits: Limits, metrics: Metrics) -> None:
        self.engine, self.tokenizer, self.model = engine, tokenizer, model
        self.limits, self.metrics = limits, metrics
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise ApiError(
                404, f"the model '{name}' does not exist: this server runs '{self.model}'",
                param="model", code="model_not_found",
            )  # fmt: skip

    def request(self, body: CompletionRequest | ChatRequest, prompt: list[int]) -> EngineRequest:
        """The engine's request: ``max_tokens`` checked against the room the prompt leaves."""
        if not prompt:
            raise ApiError(400, "the prompt is empty: it encodes to no tokens", param="prompt")
        room = self.limits.max_positions - len(prompt)
        asked = body.limit if isinstance(body, ChatRequest) else body.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"the prompt ({len(prompt)} tokens) and max_tokens ({asked}) exceed the model's context of "
                f"{self.limits.max_positions} tokens",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        max_new = asked if asked is not None else min(self.limits.default_max_tokens, room)
        temperature = 1.0 if body.temperature is None else body.temperature
        sampler = Sampler(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=1.0 if body.top_p is None else body.top_p,
        )
        return EngineRequest(prompt, max_new, sampler, body.seed, body.ignore_eos)

    def submit(self, request: EngineRequest) -> tuple[Any, asyncio.Queue[Event]]:
        if not self.engine.alive:
            raise ApiError(503, "the engine has stopped: restart the server", kind="server_error")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = self.engine.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise ApiError(
                429, f"the server is busy ({e}): retry later", kind="rate_limit_error", code="queue_full",
                headers={"Retry-After": str(self.limits.retry_after)},
            ) from e  # fmt: skip
        return handle, events


def _pieces(
    server: Server, http: Request, body: CompletionRequest | ChatRequest, prompt: list[int]
) -> AsyncIterator[tuple[str, FinishReason | None, Usage]]:
    """Submit the request now (so that a full queue is answered 429 before any stream starts); the iterator
    yields ``(text piece, finish reason or None, usage so far)`` as tokens come, and cancels the request
    when its consumer stops early or the client goes away (streamed or not)."""
    handle, events = server.submit(server.request(body, prompt))
    return _read(server, http, handle, events, body.stops, prompt)


async def _read(
    server: Server,
    http: Request,
    handle: Any,
    events: asyncio.Queue[Event],
    stops: list[str],
    prompt: list[int],
) -> AsyncIterator[tuple[str, FinishReason | None, Usage]]:
    text = TextStream(lambda ids: str(server.tokenizer.decode(ids)), stops)
    try:
        while True:
            event = await events.get()
            if await http.is_disconnected():
                return
            usage = Usage(
                prompt_tokens=len(prompt), completion_tokens=len(text.tokens),
                total_tokens=len(prompt) + len(text.tokens),
            )  # fmt: skip
            if event.token is not None:
                piece = text.push(event.token)
                if text.stopped:
                    handle.cancel(stopped=True)
                    yield piece, "stop", usage
                    return
                if piece:
                    yield piece, None, usage
                continue
            if event.reason == "error":
                raise ApiError(500, event.error or "generation failed", kind="server_error")
            if event.reason == "cancelled":
                return
            yield text.flush(), "stop" if event.reason == "stop" else "length", usage
            return
    finally:
        handle.cancel()


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # headers are sent: the error goes in the stream, as OpenAI's does
            yield f"data: {e.body.model_dump_json()}\n\n"
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app(engine: Engine, tokenizer: Any, model: str, limits: Limits, metrics: Metrics) -> FastAPI:
    """The app: the routes over ``engine``, which serves ``model`` (the name clients send)."""
    app = FastAPI(title="effx serve", docs_url=None, redoc_url=None, openapi_url=None)
    server = Server(engine, tokenizer, model, limits, metrics)
    _install_errors(app, metrics)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return _error_response(ApiError(503, "the engine has stopped", kind="server_error"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model, created=server.created)])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: Request) -> Completion | Response:
        server.check_model(body.model)
        prompt = list(tokenizer.encode(body.text, special=True))
        return await _complete(server, http, body, prompt)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, http: Request) -> ChatCompletion | Response:
        server.check_model(body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        prompt = list(tokenizer.encode_chat(messages))
        return await _chat(server, http, body, prompt)

    app.add_middleware(BodyLimit, limit=limits.max_body)
    paths = frozenset(str(getattr(route, "path", "")) for route in app.routes)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app


async def _no_answer(http: Request) -> Response:
    """A request that ended before its first token: its client went away (nginx's 499, for the metrics)."""
    if await http.is_disconnected():
        return Response(status_code=499)
    raise ApiError(500, "the request ended without an answer", kind="server_error")


def _ident(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _complete(
    server: Server, http: Request, body: CompletionRequest, prompt: list[int]
) -> Completion | Response:
    ident, created = _ident("cmpl"), int(time.time())
    pieces = _pieces(server, http, body, prompt)

    def completion(text: str, reason: FinishReason | None, usage: Usage | None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=reason)
        return Completion(id=ident, created=created, model=server.model, choices=[choice], usage=usage)

    if body.stream:

        async def chunks() -> AsyncIterator[str]:
            async for piece, reason, _ in pieces:
                yield completion(piece, reason, None).model_dump_json()

        return _sse(chunks())
    parts: list[str] = []
    reason: FinishReason | None = "length"
    usage: Usage | None = None
    async for piece, reason, usage in pieces:  # noqa: B007 (the last one's reason and usage are the answer's)
        parts.append(piece)
    if usage is None:
        return await _no_answer(http)
    return completion("".join(parts), reason, usage)


async def _chat(
    server: Server, http: Request, body: ChatRequest, prompt: list[int]
) -> ChatCompletion | Response:
    ident, created = _ident("chatcmpl"), int(time.time())
    pieces = _pieces(server, http, body, prompt)

    def chunk(delta: Delta, reason: FinishReason | None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        return ChatChunk(id=ident, created=created, model=server.model, choices=[choice]).model_dump_json()

    if body.stream:

        async def chunks() -> AsyncIterator[str]:
            yield chunk(Delta(role="assistant", content=""), None)
            async for piece, reason, _ in pieces:
                yield chunk(Delta(content=piece), reason)

        return _sse(chunks())
    parts: list[str] = []
    reason: FinishReason | None = "length"
    usage: Usage | None = None
    async for piece, reason, usage in pieces:  # noqa: B007
        parts.append(piece)
    if usage is None:
        return await _no_answer(http)
    message = ChatResponseMessage(content="".join(parts))
    choice = ChatChoice(message=message, finish_reason=reason or "length")
    return ChatCompletion(id=ident, created=created, model=server.model, choices=[choice], usage=usage)
