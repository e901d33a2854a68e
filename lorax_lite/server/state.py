"""What every route shares: the engine, the served model's name, the limits, the metrics, the queue
admission count, and the drain state (all touched from the event loop thread only).

The server reads the engine only through AsyncLLM's typed reads; adapter lookups (which may read the
registry) run in a worker thread, once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from lorax_lite.config import ServerLimits
from lorax_lite.engine.async_llm import AsyncLLM, ResolvedAdapter
from lorax_lite.lora.errors import AdapterNotFoundError
from lorax_lite.lora.naming import InvalidAdapterIdError, check_adapter_id
from lorax_lite.registry.base import RegistryError
from lorax_lite.server.auth import Tenancy, audit_denial, principal_of
from lorax_lite.server.errors import RETRY_AFTER_SECONDS, ServerError, as_server_error
from lorax_lite.server.metrics import ServerMetrics


class Stoppable(Protocol):
    """An open engine call, as the drain sees it (server/calls.py's EngineCall)."""

    async def stop_for_shutdown(self) -> None: ...


class ServerState:
    """Kept on `app.state.server`."""

    def __init__(self, llm: AsyncLLM, served_model_name: str, limits: ServerLimits, tenancy: Tenancy,
                 replica_id: str | None = None) -> None:
        self.llm = llm
        self.replica_id = replica_id
        self.served_model_name = served_model_name
        self.limits = limits
        self.tenancy = tenancy
        self.metrics = ServerMetrics(llm.snapshot)
        self.special_ids = frozenset(llm.tokenizer.all_special_ids)  # the native API marks these tokens
        self.num_queued = 0  # requests submitted to the engine that have no output yet
        self.num_in_flight = 0  # requests inside the app now (health, readiness and metrics probes aside)
        self.draining = False  # SIGTERM came: not ready, new generation requests get a 503
        self.calls: set[Stoppable] = set()  # engine calls open now (the drain stops what is left at its deadline)
        # Called with the id of every adapter a request resolved to (a Ray Serve replica reports it to the router).
        self.on_adapter_resolved: Callable[[str], None] | None = None

    def admit(self) -> None:
        """Count a request as queued until `release`; a 429 when the queue is full."""
        if self.num_queued >= self.limits.max_queued_requests:
            raise ServerError(
                429, f"the server is overloaded: {self.num_queued} requests are already waiting "
                f"(--max-queued-requests {self.limits.max_queued_requests}); retry later", "overloaded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.num_queued += 1

    def release(self) -> None:
        self.num_queued -= 1

    def is_base_model(self, model: str | None) -> bool:
        return model is None or model == self.served_model_name

    # ---- what one request may cost ------------------------------------------------------------

    def check_prompt_chars(self, num_chars: int, field: str) -> None:
        """Before tokenizing: a 422 (400 on OpenAI routes) for a prompt over max_prompt_chars characters."""
        limit = self.limits.max_prompt_chars
        if num_chars > limit:
            raise ServerError(422, f"{field}: the prompt has {num_chars} characters, more than this server's "
                              f"limit of {limit} (max_prompt_chars); shorten it", "validation", param=field)

    def check_prompt_tokens(self, num_tokens: int, field: str) -> None:
        limit = self.limits.max_prompt_tokens
        if num_tokens > limit:
            raise ServerError(422, f"{field}: the prompt has {num_tokens} tokens, more than this server's limit of "
                              f"{limit} (max_prompt_tokens); shorten it", "validation", param=field)

    def check_max_tokens(self, max_tokens: int | None, name: str) -> None:
        limit = self.limits.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ServerError(422, f"{name} ({max_tokens}) is over this server's limit of {limit} "
                              f"(max_tokens_limit); ask for fewer tokens", "validation", param=name)

    def request_timeout(self, timeout: float | None) -> float:
        """The seconds a request may run: its own `timeout` if given, never more than max_request_seconds."""
        limit = self.limits.max_request_seconds
        return limit if timeout is None else min(float(timeout), limit)

    # ---- adapters -----------------------------------------------------------------------------

    async def resolve_adapter(self, request: Request, adapter_id: str | None,
                              field: str = "adapter_id") -> ResolvedAdapter | None:
        """The version a request for `adapter_id` gets (None: the base model), looked up once, in a worker
        thread. An invalid id is a 400 naming the request's `field`; an unknown one, or one the caller's key may
        not use, the same 404; the base model without the key's permission a 403; an unreachable registry a 503."""
        principal = principal_of(request)
        if adapter_id is None or self.is_base_model(adapter_id):
            if not principal.may_use_base_model:
                audit_denial(request, 403, "base model not allowed", self.served_model_name)
                raise ServerError(403, "this API key may not use the base model without an adapter: name one of its "
                                  "adapters (GET /v1/models lists them)", "forbidden", param="model")
            return None
        try:
            check_adapter_id(adapter_id)
            if not principal.may_use_adapter(adapter_id):  # answered exactly like an unknown id: no oracle
                audit_denial(request, 404, "adapter not allowed", adapter_id)
                raise AdapterNotFoundError(adapter_id)
            resolved = await run_in_threadpool(self.llm.resolve_adapter, adapter_id)
        except InvalidAdapterIdError as exc:
            raise ServerError(400, f"{field}: {exc}", "validation", param="model") from exc
        except Exception as exc:
            raise as_server_error(exc, adapter_id) from exc
        if self.on_adapter_resolved is not None:
            self.on_adapter_resolved(adapter_id)
        return resolved

    async def find_adapter(self, request: Request, adapter_id: str) -> ResolvedAdapter | None:
        """Like `resolve_adapter` for a page: None when the id is invalid or unknown, the caller's key may not
        use it, or LoRA is off; an unreachable registry is a 503."""
        if not principal_of(request).may_use_adapter(adapter_id):
            return None
        try:
            return await run_in_threadpool(self.llm.resolve_adapter, adapter_id)
        except (InvalidAdapterIdError, AdapterNotFoundError):
            return None
        except RegistryError as exc:
            raise as_server_error(exc) from exc
        except ValueError:  # LoRA is off
            return None

    async def list_adapters(self, request: Request) -> list[ResolvedAdapter]:
        """Every adapter the caller's key may use (added by path first, then registered), read in a worker
        thread; an unreachable registry is a 503."""
        principal = principal_of(request)
        try:
            adapters = await run_in_threadpool(self.llm.list_adapters)
        except RegistryError as exc:
            raise as_server_error(exc) from exc
        return [adapter for adapter in adapters if principal.may_use_adapter(adapter.adapter_id)]

    def may_use_base_model(self, request: Request) -> bool:
        return principal_of(request).may_use_base_model

    # ---- shutdown -----------------------------------------------------------------------------

    async def stop_calls(self) -> None:
        """Stop every open engine call (the drain's deadline passed): each ends with a 'shutting down' error."""
        for call in list(self.calls):
            await call.stop_for_shutdown()
