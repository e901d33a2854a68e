"""What every route shares: the engine, the served model's name, the limits, the metrics, and the
queue admission count (all touched from the event loop thread only).

The server reads the engine only through AsyncLLM's typed reads; adapter lookups (which may read the
registry) run in a worker thread, once per request.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool

from lorax_lite.config import ServerLimits
from lorax_lite.engine.async_llm import AsyncLLM, ResolvedAdapter
from lorax_lite.lora.naming import InvalidAdapterIdError
from lorax_lite.server.errors import ServerError, as_server_error
from lorax_lite.server.metrics import ServerMetrics

RETRY_AFTER_SECONDS = 1


class ServerState:
    """Kept on `app.state.server`."""

    def __init__(self, llm: AsyncLLM, served_model_name: str, limits: ServerLimits) -> None:
        self.llm = llm
        self.served_model_name = served_model_name
        self.limits = limits
        self.metrics = ServerMetrics(llm.snapshot)
        self.special_ids = frozenset(llm.tokenizer.all_special_ids)  # the native API marks these tokens
        self.num_queued = 0  # requests submitted to the engine that have no output yet

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

    async def resolve_adapter(self, adapter_id: str | None, field: str = "adapter_id") -> ResolvedAdapter | None:
        """The version a request for `adapter_id` gets (None: the base model), looked up once, in a worker
        thread; an unknown or invalid id is a ServerError (404 / 400 naming the request's `field`)."""
        if adapter_id is None or self.is_base_model(adapter_id):
            return None
        try:
            return await run_in_threadpool(self.llm.resolve_adapter, adapter_id)
        except InvalidAdapterIdError as exc:
            raise ServerError(400, f"{field}: {exc}", "validation", param="model") from exc
        except Exception as exc:
            raise as_server_error(exc, adapter_id) from exc

    async def find_adapter(self, adapter_id: str) -> ResolvedAdapter | None:
        """Like `resolve_adapter` for a page: None when the id is invalid or unknown (or LoRA is off)."""
        try:
            return await run_in_threadpool(self.llm.resolve_adapter, adapter_id)
        except ValueError:  # InvalidAdapterIdError, AdapterNotFoundError, LoRA off
            return None

    async def list_adapters(self) -> list[ResolvedAdapter]:
        """Every adapter a request can name (added by path first, then registered), read in a worker thread."""
        return await run_in_threadpool(self.llm.list_adapters)
