"""The OpenAI-compatible HTTP API of one frontend (FastAPI), on the frontend's own event loop.

Generation goes through `Frontend.generate`, the same validation, dispatch, failover and abort path as
gRPC: an HTTP request is turned into a GenerateRequest and its token chunks into OpenAI objects. The first
chunk is awaited before the response starts, so an error before any token gets its own status (400, 404, 429,
503, 504); one after streaming started arrives as an SSE error event before `data: [DONE]`. A client that
disconnects (or a `timeout` that passes) ends the request, which the frontend aborts on its instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.frontend import RpcError
from orchestrator.security import DATA, Authenticator
from orchestrator.http.openai import (HTTP_STATUS, MAX_BODY_BYTES, SSE_DONE, ApiError, Formatter, bad, check_model,
                                      decode_body, parse, sse)

if TYPE_CHECKING:
    from orchestrator.frontend import Frontend

log = logging.getLogger(__name__)

DRAIN_BYTES = 64 * 1024 * 1024


class _Deadline:
    """What `Frontend.generate` reads of a gRPC context: the time left."""

    def __init__(self, timeout_s: float | None):
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


def rpc_error(e) -> ApiError:
    """The frontend's RpcError as an HTTP error; a bad field's name comes first in its message."""
    status = HTTP_STATUS.get(e.code.name, 500)
    message = str(e)
    param = message.split(":", 1)[0] if status == 400 and ":" in message else None
    return ApiError(status, message, param if param and " " not in param else None)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES. The rest of an oversized body is read and dropped (up
    to DRAIN_BYTES), so that the client gets the 413 instead of a connection reset while it is still sending."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise ApiError(413, f"body: more than the {MAX_BODY_BYTES} bytes this server takes", "body")
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


OPEN_ROUTES = frozenset({"/health", "/live", "/metrics", "/version"})     # probes and scrapers need no key


class KeyCheck:
    """The HTTP side of orchestrator/security.py: every route but OPEN_ROUTES wants a data-plane key (an ASGI
    middleware, so streamed responses and disconnects pass through untouched)."""

    def __init__(self, app, auth: Authenticator):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.auth.enabled and scope["path"] not in OPEN_ROUTES:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            verdict = self.auth.check(header, DATA)
            if not verdict.ok:
                response = error_response(ApiError(verdict.http_status, verdict.message))
                if verdict.http_status == 401:
                    response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(fe: "Frontend") -> FastAPI:
    app = FastAPI(title="Tidal", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(KeyCheck, auth=fe.auth)
    model = fe.config.engine.model
    try:
        version = importlib.metadata.version("tidal")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        what = f"{request.method} {request.url.path}"
        message = {404: f"{what}: no such route", 405: f"{what}: method not allowed"}.get(e.status_code, e.detail)
        return error_response(ApiError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    async def generate(request: Request, chat: bool):
        try:
            body = decode_body(await read_body(request), request.headers.get("content-type"))
            check_model(body, model)
            parsed = parse(body, chat)
        except ApiError as e:       # refused before the frontend saw it: counted here, as it counts its own
            fe.metrics.requests.labels("not_found" if e.status == 404 else "invalid_argument").inc()
            raise
        if not parsed.request.request_id:
            parsed.request.request_id = uuid.uuid4().hex
        fmt = Formatter(chat, parsed.request.request_id, model, parsed.return_token_ids)
        deadline = _Deadline(parsed.timeout_s)
        chunks = fe.generate(parsed.request, deadline)

        async def next_chunk():
            left = deadline.time_remaining()
            try:
                return await asyncio.wait_for(chunks.__anext__(), left)
            except asyncio.TimeoutError:
                raise ApiError(504, f"timeout: the request did not finish within {parsed.timeout_s:g} s",
                               "timeout") from None
            except RpcError as e:
                raise rpc_error(e) from None

        if not parsed.stream:
            return await _whole(request, fmt, chunks, next_chunk)
        try:
            first = await next_chunk()
        except BaseException:
            await chunks.aclose()
            raise
        return StreamingResponse(_events(fmt, chunks, next_chunk, first, chat, parsed.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models():
        limits = [v.info.max_model_len for v in fe.views.values() if v.info is not None]
        card = {"id": model, "object": "model", "created": int(fe.started_at), "owned_by": "tidal"}
        if limits:
            card["max_model_len"] = min(limits)
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if fe.accepting and not fe.shutting_down:
            return {"status": "serving"}
        why = "shutting down" if fe.shutting_down else "no instance serves yet"
        return JSONResponse({"status": "not serving", "reason": why}, status_code=503)

    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/version")
    async def get_version():
        return {"version": version}

    @app.get("/metrics")
    async def metrics():
        data, content_type = fe.metrics.exposition()
        return Response(data, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = decode_body(await read_body(request), request.headers.get("content-type"))
        if body.get("model") is not None:
            check_model(body, model)
        if "messages" in body:
            parsed = parse({"messages": body["messages"]}, chat=True).request
            messages = [{"role": m.role, "content": m.content} for m in parsed.chat.messages]
            try:
                text = fe.tokenizer.apply_chat_template(messages)
            except ValueError as e:
                raise bad("messages", str(e)) from None
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise bad("prompt", "give a prompt string or chat messages")
        tokens = fe.tokenizer.encode(text)
        limits = [v.info.max_model_len for v in fe.views.values() if v.info is not None]
        return {"count": len(tokens), "max_model_len": min(limits) if limits else None, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = decode_body(await read_body(request), request.headers.get("content-type"))
        if body.get("model") is not None:
            check_model(body, model)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("tokens", "must be a list of token ids")
        vocab = fe.tokenizer.vocab_size
        out = [t for t in tokens if not 0 <= t < vocab]
        if out:
            raise bad("tokens", f"ids must be in [0, {vocab}), got {out[:4]}")
        return {"prompt": fe.tokenizer.decode(tokens)}

    return app


async def _whole(request: Request, fmt: Formatter, chunks, next_chunk) -> JSONResponse:
    """Collect the request's chunks into one response; a client that leaves first aborts it."""

    async def collect():
        text, ids = [], []
        while True:
            chunk = await next_chunk()
            text.append(chunk.text)
            ids += chunk.token_ids
            if chunk.finish_reason is not None:
                return fmt.whole("".join(text), chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens,
                                 ids)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            log.info("client of %s disconnected; aborting it", fmt.id)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await work
            return error_response(ApiError(499, "the client disconnected"))
        return JSONResponse(work.result())
    finally:
        gone.cancel()
        work.cancel()
        await chunks.aclose()


async def _events(fmt: Formatter, chunks, next_chunk, chunk, chat: bool, include_usage: bool):
    """SSE events from the first chunk on. Cancelled when the client disconnects: the request is aborted."""
    first = True
    try:
        while True:
            if first and chat:
                yield sse(fmt.chunk("", None, first=True, with_usage=include_usage))
                first = False
            yield sse(fmt.chunk(chunk.text, chunk.finish_reason, with_usage=include_usage,
                                token_ids=chunk.token_ids))
            if chunk.finish_reason is not None:
                if include_usage:
                    yield sse(fmt.usage_chunk(chunk.prompt_tokens, chunk.completion_tokens))
                break
            try:
                chunk = await next_chunk()
            except ApiError as e:
                log.warning("stream %s ended with an error after it started: %s", fmt.id, e.message)
                yield sse(e.body())
                break
        yield SSE_DONE
    finally:
        await chunks.aclose()
