"""The FastAPI app: the native LoRAX routes, the OpenAI routes, the chat pages, /health, /info and
/metrics over one AsyncLLM, kept with the limits and metrics on `app.state.server` (a ServerState)."""

from __future__ import annotations

import dataclasses

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorax_lite.config import ServerLimits
from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.server.chat_ui import STATIC
from lorax_lite.server.chat_ui import router as chat_router
from lorax_lite.server.errors import OPENAI_PATH_PREFIX, ServerError, install_error_handlers
from lorax_lite.server.native import router as native_router
from lorax_lite.server.openai import router as openai_router
from lorax_lite.server.state import ServerState


def create_app(llm: AsyncLLM, served_model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """An app serving `llm`; the caller owns the engine (starts it before, shuts it down after)."""
    app = FastAPI(title="lorax-lite", version="0.1.0")
    state = ServerState(llm, served_model_name, limits or ServerLimits())
    app.state.server = state
    install_error_handlers(app)
    app.include_router(native_router)
    app.include_router(openai_router)
    app.include_router(chat_router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_api_route("/", lambda: RedirectResponse("/chat"), methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/info", info, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(BoundaryMiddleware, state=state)
    return app


async def health(request: Request) -> JSONResponse:
    """200 while the engine loop runs, 503 once it has stopped or crashed."""
    if request.app.state.server.llm.is_running:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"error": "the engine is not running", "error_type": "unavailable"}, status_code=503)


async def info(request: Request) -> dict:
    """The served model, the engine's configuration and where adapters are cached (by adapter key)."""
    state: ServerState = request.app.state.server
    config = dataclasses.asdict(state.llm.config)
    config.pop("model")  # a filesystem path; the model is named by served_model_name
    adapters = state.llm.snapshot().adapter_cache
    return {
        "model_id": state.served_model_name,
        "max_model_len": state.llm.max_seq_len,  # the effective value, as vLLM reports it
        "engine_config": config,
        "limits": dataclasses.asdict(state.limits),
        "adapters": {
            "added": [] if adapters is None else adapters.added_ids,
            "slots": [] if adapters is None else adapters.slot_keys,
            "host": [] if adapters is None else adapters.host_keys,
        },
    }


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class BoundaryMiddleware:
    """Refuses request bodies over the size limit with a 413 (by Content-Length before reading, and
    by reading at most limit + 1 bytes of a chunked body) and counts error responses by status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.state.metrics.observe_error_status(message["status"])
            await send(message)

        limit = self.state.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        body = None
        if not (declared.isdigit() and int(declared) > limit):
            body = await _read_body(receive, limit)
        if body is _CLIENT_GONE:
            return
        if body is None:
            too_large = ServerError(
                413, f"the request body is larger than the limit of {limit} bytes", "payload_too_large"
            )
            await too_large.to_response(scope["path"].startswith(OPENAI_PATH_PREFIX))(scope, receive, counting_send)
            return
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay_receive, counting_send)


_CLIENT_GONE = object()  # _read_body: the client left while sending


async def _read_body(receive: Receive, limit: int) -> bytes | object | None:
    """The whole body, None once it passes `limit` bytes, or _CLIENT_GONE if the client left while sending."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _CLIENT_GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
