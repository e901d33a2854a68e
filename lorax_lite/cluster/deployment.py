"""The Ray Serve deployment: each replica is the single-process server (server/build.py: the same FastAPI app
and AsyncLLM engine), wrapped with `serve.ingress`, so every route, both wire formats, streaming, API keys and
metrics behave as on one server.

What the replica adds for Ray:
- adapter affinity: the adapter a request resolves to is reported to Ray's router through a
  `serve.multiplexed` loader (an LRU of `max_models_per_replica` ids, default max_cpu_loras: the adapters the
  replica keeps in memory). The loader loads nothing itself; the engine's two-tier adapter cache stays the
  cache. The id a request is routed by comes from the proxy (cluster/routing.py).
- `x-replica-id` on every response, `replica_id` in /info, and `x-lorax-base-model` on successful responses
  (the proxy learns the base model's names from it, to balance base-model requests instead of pinning them).
- health: Ray calls `check_health` every few seconds; it fails when the engine stopped (the replica is
  replaced). The registry being unreachable does not fail it: every replica shares the registry, so replacing
  them would not help; /ready reports it.
- stopping: Ray stops routing to the replica and waits up to graceful_shutdown_timeout_s (the server's
  shutdown_timeout) for its requests; then `__del__` stops what is left (`shutting_down`) and the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorax_lite.cluster.launch import MAX_CONSTRUCTOR_RETRIES, ReplicaOptions
from lorax_lite.cluster.routing import BASE_MODEL_HEADER
from lorax_lite.server.app import readiness_checks
from lorax_lite.server.build import ServerParts, ServerSpec, build_server

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "lorax-lite"
APP_NAME = "lorax-lite"
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0


@serve.ingress()
class LoraxReplica:
    """One replica: a whole lorax-lite server built from a ServerSpec."""

    def __init__(self, spec: ServerSpec, options: ReplicaOptions) -> None:
        context = serve.get_replica_context()
        self.replica_id = f"{os.uname().nodename}-{context.replica_id.unique_id}"
        _set_threads(options.cpus)
        self.parts: ServerParts = build_server(replace(spec, replica_id=self.replica_id))
        self.served_model_name = spec.served_model_name
        self._tasks: set[asyncio.Task] = set()

        async def hold(adapter_id: str) -> str:  # Ray's multiplexing LRU; the engine's cache holds the weights
            return adapter_id

        self.hold_adapter = serve.multiplexed(max_num_models_per_replica=options.max_models_per_replica)(hold)
        self.parts.app.state.server.on_adapter_resolved = self._adapter_resolved
        logger.info("replica %s serving %s (pid %d)", self.replica_id, spec.served_model_name, os.getpid())

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ReplicaHeaders(self.parts.app, self.replica_id, self.served_model_name)

    def _adapter_resolved(self, adapter_id: str) -> None:
        """Report the adapter to Ray's router (runs on the replica's event loop, in the request's task): when the
        request was routed by it, or by nothing (a proxy without the middleware). A request steered here by another
        id (an explicit `serve_multiplexed_model_id`) reports nothing, so it does not change where that adapter's
        requests go."""
        routed = serve.get_multiplexed_model_id()
        if routed and routed != adapter_id:
            return
        task = asyncio.get_running_loop().create_task(self.hold_adapter(adapter_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_health(self) -> None:
        """Ray's health check: the server's readiness checks, failing only when the engine stopped (a drain is
        Ray's own doing, and a registry outage is shared by every replica: replacing them would not help)."""
        checks = await readiness_checks(self.parts.app.state.server)
        if checks["engine"] != "ok":
            raise RuntimeError(f"replica {self.replica_id}: the engine stopped ({checks})")

    async def __del__(self) -> None:
        """Ray drained this replica (its requests finished, or graceful_shutdown_timeout_s passed): stop what is
        left, flush usage, stop the engine."""
        parts: ServerParts | None = getattr(self, "parts", None)
        if parts is None:  # __init__ failed (Ray still calls __del__)
            return
        state = parts.app.state.server
        state.draining = True
        if state.calls:
            logger.warning("replica %s: stopping %d requests at shutdown", self.replica_id, len(state.calls))
            await state.stop_calls()
        await asyncio.get_running_loop().run_in_executor(None, parts.close)


class ReplicaHeaders:
    """Adds `x-replica-id` to every response, and the base model's name to successful ones. Ray's proxy adds the
    request's `x-request-id` to every response itself, so the app's copy is left out."""

    def __init__(self, app: ASGIApp, replica_id: str, served_model_name: str) -> None:
        self.app = app
        self.replica_header = (b"x-replica-id", replica_id.encode())
        self.base_header = (BASE_MODEL_HEADER, served_model_name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append(self.replica_header)
                if message["status"] < 400:
                    headers.append(self.base_header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _set_threads(cpus: float) -> None:
    """torch's intra-op threads: the CPUs Ray gave this replica (at least one)."""
    import torch

    threads = max(1, int(cpus))
    if ray.is_initialized():
        threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", threads)))
    torch.set_num_threads(threads)


def application(spec: ServerSpec, options: ReplicaOptions, shutdown_timeout: float) -> Any:
    """The Ray Serve application: `options.num_replicas` replicas of `spec`."""
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=MAX_CONSTRUCTOR_RETRIES,
    )(LoraxReplica)
    return deployment.bind(spec, options)


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "LoraxReplica", "ReplicaHeaders", "application"]
