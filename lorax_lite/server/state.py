"""What every route shares: the engine, the served model's name, the limits, the metrics, and the
queue admission count (all touched from the event loop thread only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.registry.base import AdapterRecord
from lorax_lite.server.errors import ServerError
from lorax_lite.server.metrics import ServerMetrics

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServerLimits:
    """Refusals that protect the server: 429 past `max_queued_requests`, 413 past `max_body_bytes`."""

    max_queued_requests: int = field(default=256, metadata={"help": "Requests waiting for the engine before new ones get a 429."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body; larger ones get a 413."})

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


class ServerState:
    """Kept on `app.state.server`."""

    def __init__(self, llm: AsyncLLM, served_model_name: str, limits: ServerLimits) -> None:
        self.llm = llm
        self.served_model_name = served_model_name
        self.limits = limits
        self.metrics = ServerMetrics(llm.engine)
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

    def adapter_record(self, adapter_id: str) -> AdapterRecord | None:
        """The registry's record of an adapter (None when it was added by path or there is no registry)."""
        catalog = self.llm.engine.catalog
        if catalog is None or catalog.registry is None:
            return None
        return catalog.registry.get(adapter_id)

    def adapter_records(self) -> list[AdapterRecord]:
        catalog = self.llm.engine.catalog
        if catalog is None or catalog.registry is None:
            return []
        return catalog.registry.list()

    def adapters(self) -> list[tuple[str, AdapterRecord | None]]:
        """Every adapter a request can name, with its registry record: those added by path first (no
        record; they shadow a registered id of the same name, as in the engine), then the registered ones."""
        added = self.llm.engine.adapter_ids
        return [(a, None) for a in added] + [(r.adapter_id, r) for r in self.adapter_records() if r.adapter_id not in added]

    def find_adapter(self, adapter_id: str) -> tuple[bool, AdapterRecord | None]:
        """(whether a request can name `adapter_id`, its registry record); invalid ids are unknown."""
        try:
            check_adapter_id(adapter_id)
        except ValueError:
            return False, None
        if adapter_id in self.llm.engine.adapter_ids:
            return True, None
        record = self.adapter_record(adapter_id)
        return record is not None, record
