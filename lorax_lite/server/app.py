"""The FastAPI app: the native LoRAX routes, the OpenAI routes, the chat pages, /health, /ready, /info and
/metrics over one AsyncLLM, kept with the limits, tenants and metrics on `app.state.server` (a ServerState).

Every request passes BoundaryMiddleware (request id, body limits, drain, last-resort 500), then
TenantMiddleware (Host allow-list, API keys: server/auth.py), then its route."""

from __future__ import annotations

import dataclasses
import re

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from lorax_lite.config import ServerLimits
from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.server.auth import Tenancy, TenantMiddleware, principal_of
from lorax_lite.server.boundary import BoundaryMiddleware
from lorax_lite.server.chat_ui import router as chat_router
from lorax_lite.server.errors import install_error_handlers
from lorax_lite.server.native import router as native_router
from lorax_lite.server.openai import router as openai_router
from lorax_lite.server.pages import STATIC
from lorax_lite.server.state import ServerState


def create_app(llm: AsyncLLM, served_model_name: str, limits: ServerLimits | None = None,
               tenancy: Tenancy | None = None, replica_id: str | None = None) -> FastAPI:
    """An app serving `llm`; the caller owns the engine and the tenancy (starts them before, shuts them down
    after). Without a tenancy nobody needs a key. `replica_id`: this server's name among the replicas of a
    deployment (shown in /info)."""
    app = FastAPI(title="lorax-lite", version="0.1.0")
    tenancy = tenancy or Tenancy()
    state = ServerState(llm, served_model_name, limits or ServerLimits(), tenancy, replica_id)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(native_router)
    app.include_router(openai_router)
    app.include_router(chat_router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_api_route("/", lambda: RedirectResponse("/chat"), methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/info", info, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(TenantMiddleware, tenancy=tenancy)
    app.add_middleware(BoundaryMiddleware, state=state)  # added last: it runs first
    return app


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the engine loop runs (draining included), 503 once it has stopped or crashed."""
    if request.app.state.server.llm.is_running:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"error": "the engine is not running", "error_type": "unavailable"}, status_code=503)


async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when this server should get new requests; 503 (with each check's state) while the engine
    is not running, the server drains, or the adapter registry is unreachable. The registry is pinged in a
    worker thread (at most registry_timeout_s; at once while it is known to be down), which also lets the
    server notice by itself that it came back."""
    checks = await readiness_checks(request.app.state.server)
    is_ready = checks["engine"] == "ok" and not checks["draining"] and checks["registry"] in ("ok", "none")
    if is_ready:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse({"error": "not ready", "error_type": "unavailable", "status": "not_ready",
                         "checks": checks}, status_code=503, headers={"Retry-After": "1"})


async def readiness_checks(state: ServerState) -> dict[str, str | bool]:
    """What /ready reports (and a Ray Serve replica's health check reads): the engine, the drain, the registry."""
    registry = await run_in_threadpool(state.llm.check_registry)
    return {
        "engine": "ok" if state.llm.is_running else "stopped",
        "draining": state.draining,
        "registry": "ok" if registry.reachable else registry.message if registry.configured else "none",
    }


async def info(request: Request) -> dict:
    """The served model, the engine's configuration and where adapters are cached (by adapter key), as far as
    the caller's key may use them."""
    state: ServerState = request.app.state.server
    principal = principal_of(request)
    config = dataclasses.asdict(state.llm.config)
    config.pop("model")  # a filesystem path; the model is named by served_model_name
    snapshot = state.llm.snapshot()
    adapters, prefix_cache = snapshot.adapter_cache, snapshot.prefix_cache

    def visible(keys: list[str | None]) -> list[str | None]:
        """Adapter keys (`<id>@<version>`, `<id>#<n>`) of adapters the key may use; other slots read as empty."""
        return [k if k is not None and principal.may_use_adapter(re.split("[@#]", k, maxsplit=1)[0]) else None
                for k in keys]

    return {
        "model_id": state.served_model_name,
        "replica_id": state.replica_id,  # None: a single server (see docs/deploy.md)
        "max_model_len": state.llm.max_seq_len,  # the effective value, as vLLM reports it
        "engine_config": config,
        "backends": state.llm.backends,
        "quantization": None if state.llm.quantization is None else state.llm.quantization.to_dict(),
        "limits": dataclasses.asdict(state.limits),
        "auth": {"keys_required": principal.key is not None, "tenant": principal.tenant, "key_id": principal.key_id},
        "adapters": {
            "added": [] if adapters is None else [a for a in adapters.added_ids if principal.may_use_adapter(a)],
            "slots": [] if adapters is None else visible(list(adapters.slot_keys)),
            "host": [] if adapters is None else [k for k in visible(list(adapters.host_keys)) if k is not None],
        },
        "prefix_cache": {
            "enabled": prefix_cache.enabled,
            "hit_rate": prefix_cache.hit_rate,
            "cached_blocks": prefix_cache.num_cached_blocks,
            "queried_tokens": prefix_cache.stats.num_queried_tokens,
            "hit_tokens": prefix_cache.stats.num_hit_tokens,
        },
    }


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)
