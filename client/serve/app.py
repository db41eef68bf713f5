"""The site endpoint: an OpenAI-compatible HTTP API on FastAPI (served by uvicorn).

    POST /v1/chat/completions   non-streaming, or server-sent events with `stream: true`
    GET  /v1/models             the one stable served name
    GET  /health, /ready        alive; model loaded (or upstream reachable)
    GET  /metrics               Prometheus
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter
                                vLLM's runtime LoRA API, with runtime_lora (embedded only),
                                so one fleetmind endpoint can stand in as another's upstream

Every refusal is JSON in OpenAI's error shape: 400 malformed, 404 unknown model, 413 body
over max_request_bytes, 429 over max_concurrency requests in flight (refused at once, not
queued: the caller's retry policy decides), 502/504 upstream failures. A completed
exchange is handed to capture once its last chunk is out (a put on a queue: a worker thread
writes the store, so no response waits for a disk); a failed or cut-off one never is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from fleetmind.client.serve.capture import (
    Capture,
    Exchange,
    StreamTranscript,
    reply_from_completion,
)
from fleetmind.client.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from fleetmind.client.serve.protocol import ApiError, ChatRequest
from fleetmind.client.serve.settings import ServeConfig
from fleetmind.client.store import ChatFormat

log = logging.getLogger(__name__)


class _Slots:
    """At most `limit` requests in flight; the next is refused, not queued."""

    def __init__(self, limit: int, metrics: ServeMetrics) -> None:
        self.limit, self.used, self.metrics = limit, 0, metrics

    def take(self) -> None:
        if self.used >= self.limit:
            raise ApiError(429, f"{self.limit} requests are in flight, the most this endpoint "
                                "takes (max_concurrency): retry shortly",
                           type="rate_limit_error", code="too_many_requests")
        self.used += 1
        self.metrics.in_flight.set(self.used)

    def release(self) -> None:
        self.used -= 1
        self.metrics.in_flight.set(self.used)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is over {limit} bytes (max_request_bytes): "
                            "send fewer or shorter messages", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def make_engine(config: ServeConfig, metrics: ServeMetrics) -> Any:
    if config.proxy:
        from fleetmind.client.serve.proxy import ProxyEngine

        return ProxyEngine(config, metrics)
    from fleetmind.client.serve.engine import EmbeddedEngine

    return EmbeddedEngine(config, metrics)


def create_app(config: ServeConfig, engine: Any = None) -> FastAPI:
    """The endpoint for `config`: embedded or proxy by `config.upstream`, capturing into
    `config.data_dir` when set. `app.state` holds engine, capture and metrics."""
    metrics = ServeMetrics() if engine is None else engine.metrics
    engine = engine or make_engine(config, metrics)
    fmt = ChatFormat(tools=config.tools, max_session_bytes=config.max_session_bytes)
    capture = Capture(config.data_dir, metrics, enabled=config.capture, fmt=fmt,
                      ttl_s=config.ttl_s)
    slots = _Slots(config.max_concurrency, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        capture.start()
        await engine.start()
        try:
            yield
        finally:
            await engine.close()
            await anyio.to_thread.run_sync(capture.close)

    app = FastAPI(title="fleetmind site endpoint", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine, app.state.capture, app.state.metrics = engine, capture, metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        headers = {"retry-after": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"the endpoint failed: {type(error).__name__}: "
                                          f"{error}", type="server_error").body(),
                            status_code=500)

    def exchange(request: Request, chat: ChatRequest, reply: Any) -> Exchange | None:
        """What capture gets, or None (and why, counted) when it gets nothing."""
        if not chat.store:
            capture.skipped("opted_out")
            return None
        if reply is None:
            capture.skipped("invalid")
            return None
        user = (request.headers.get(config.user_header) if config.user_header else None) \
            or chat.user
        conversation = request.headers.get(config.conversation_header) or chat.conversation_id
        return Exchange(chat.messages, reply, user, conversation)

    def done(status: int, started: float, usage: dict[str, Any] | None) -> None:
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        if usage:
            metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            metrics.completion_tokens.inc(usage.get("completion_tokens", 0))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        try:
            slots.take()
        except ApiError as error:
            done(error.status, started, None)
            raise
        stack = AsyncExitStack()
        streaming = False
        try:
            chat = ChatRequest.parse(await _read_body(request, config.max_request_bytes), fmt)
            served = await stack.enter_async_context(engine.serving(chat.model))
            if not chat.stream:
                completion = await engine.complete(chat, served)
                done(200, started, completion.get("usage"))
                got = exchange(request, chat, reply_from_completion(completion))
                if got is not None:
                    capture.submit(got)  # a put on a queue: the store is written off this path
                return JSONResponse(completion)
            chunks = engine.stream(chat, served)
            first = await anext(chunks)  # refusals before the first byte are HTTP errors
            streaming = True
            return StreamingResponse(
                _events(request, chat, chunks, first, stack, started),
                media_type="text/event-stream", headers={"cache-control": "no-cache"})
        except ApiError as error:
            done(error.status, started, None)
            raise
        except Exception:
            done(500, started, None)
            raise
        finally:
            if not streaming:
                await stack.aclose()
                slots.release()

    async def _events(request: Request, chat: ChatRequest, chunks: AsyncGenerator[dict, None],
                      first: dict, stack: AsyncExitStack, started: float
                      ) -> AsyncIterator[bytes]:
        # 499 (nginx's "client closed the request") unless the stream ends otherwise.
        transcript, status = StreamTranscript(), 499
        try:
            transcript.add(first)
            yield _sse(first)
            async for chunk in chunks:
                transcript.add(chunk)
                yield _sse(chunk)
            status = 200
            # Handed over before [DONE], so a client that saw the end can count on it.
            got = exchange(request, chat, transcript.reply()) if transcript.finished else None
            if got is not None:
                capture.submit(got)
            yield b"data: [DONE]\n\n"
        except ApiError as error:  # the status line is gone: say it in the stream
            status = error.status
            yield _sse(error.body())
        except Exception as error:
            status = 500
            log.exception("stream failed")
            yield _sse(ApiError(500, f"the endpoint failed mid-stream: {type(error).__name__}",
                                type="server_error").body())
        finally:
            # A client that hung up cancels this generator; the slot, the version's pin and
            # the engine's stream are given back all the same.
            slots.release()
            done(status, started, transcript.usage)
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
                await stack.aclose()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetmind"}
            for name in engine.model_names()]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        current = engine.versions.current().version
        body = {"status": "ready" if engine.ready else "starting", "mode": engine.kind,
                "version": current, "adapters": list(engine.versions.adapters)}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def lora_body(request: Request) -> dict[str, Any]:
        if not config.runtime_lora or config.proxy:
            raise ApiError(404, "runtime LoRA loading is off here: start the endpoint with "
                                "runtime_lora = true (embedded mode) to allow it",
                           code="not_found")
        try:
            body = json.loads(await _read_body(request, config.max_request_bytes))
        except json.JSONDecodeError as error:
            raise ApiError(400, f"the body is not valid JSON ({error})") from None
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) \
                or not body["lora_name"]:
            raise ApiError(400, "send {\"lora_name\": ..., \"lora_path\": ...}",
                           param="lora_name")
        return body

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await lora_body(request)
        if not isinstance(body.get("lora_path"), str):
            raise ApiError(400, "lora_path is missing: the adapter folder's path",
                           param="lora_path")
        await engine.load_named(body["lora_name"], Path(body["lora_path"]))
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added "
                                 "successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await lora_body(request)
        await engine.unload_named(body["lora_name"])
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed "
                                 "successfully.")

    return app
