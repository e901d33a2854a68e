"""The FastAPI app: the native LoRAX routes, /health and /info over one AsyncLLM kept on `app.state`."""

from __future__ import annotations

import dataclasses

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.server.errors import install_error_handlers
from lorax_lite.server.native import router as native_router


def create_app(llm: AsyncLLM, served_model_name: str) -> FastAPI:
    """An app serving `llm`; the caller owns the engine (starts it before, shuts it down after)."""
    app = FastAPI(title="lorax-lite", version="0.1.0")
    app.state.llm = llm
    app.state.served_model_name = served_model_name
    install_error_handlers(app)
    app.include_router(native_router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/info", info, methods=["GET"])
    return app


async def health(request: Request) -> JSONResponse:
    """200 while the engine loop runs, 503 once it has stopped or crashed."""
    if request.app.state.llm.is_running:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"error": "the engine is not running", "error_type": "unavailable"}, status_code=503)


async def info(request: Request) -> dict:
    """The served model, the engine's configuration and where adapters are cached."""
    llm: AsyncLLM = request.app.state.llm
    engine = llm.engine
    config = dataclasses.asdict(engine.config)
    config.pop("model")  # a filesystem path; the model is named by served_model_name
    adapters = engine.adapters
    return {
        "model_id": request.app.state.served_model_name,
        "max_model_len": engine.max_model_len,
        "engine_config": config,
        "adapters": {
            "added": engine.adapter_ids,
            "slots": [] if adapters is None else adapters.slot_adapters,
            "host": [] if adapters is None else adapters.host_adapters,
        },
    }
