"""Usage for charge-back and the audit log, both written off the event loop.

UsageRecorder adds each finished request's tokens to in-memory totals per (UTC day, tenant, key, adapter); a
thread writes them to the tenant store every `flush_s` seconds (and at shutdown). A write that fails is kept
and retried with the next one, so an outage of the store loses nothing unless the process dies meanwhile.

AuditLog writes one JSON line per denied request (time, request id, key id, tenant, route, adapter, status,
reason; never a key) to stdout or a file, through a queue drained by its own thread.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable

from lorax_lite.registry.base import RegistryError
from lorax_lite.registry.guard import Guard
from lorax_lite.registry.tenants import TenantStore, UsageRow, utc_day
from lorax_lite.server.errors import REQUEST_ID

logger = logging.getLogger(__name__)

AUDIT_STDOUT = "-"


class UsageRecorder:
    """Totals of requests and tokens not yet in the store, and the thread that writes them."""

    def __init__(self, store: TenantStore | None, guard: Guard | None, flush_s: float = 1.0) -> None:
        self.store = store
        self.guard = guard
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str, str], UsageRow] = {}
        self._stop = threading.Event()
        self._failing = False
        self._thread: threading.Thread | None = None
        if store is not None:
            self._thread = threading.Thread(target=self._run, name="lorax-usage", daemon=True)
            self._thread.start()

    def add(self, tenant: str, key_id: str, adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        """Count one request (cheap: the event loop calls it)."""
        if self.store is None:
            return
        self._merge([UsageRow(utc_day(), tenant, key_id, adapter, 1, prompt_tokens, generated_tokens)])

    def flush(self) -> bool:
        """Write what is pending (blocking); False when the store could not take it (it stays pending)."""
        with self._lock:
            rows, self._pending = list(self._pending.values()), {}
        if not rows or self.store is None:
            return True
        try:
            if self.guard is not None:
                self.guard.call(self.store.add_usage, rows)
            else:
                self.store.add_usage(rows)
        except RegistryError as exc:
            self._merge(rows)
            if not self._failing:
                logger.warning("usage not written yet (the registry is unreachable: %s); kept and retried", exc)
            self._failing = True
            return False
        if self._failing:
            logger.warning("usage written again after the registry came back")
        self._failing = False
        return True

    def close(self) -> None:
        """Stop the thread and write what is left (once more if the first try fails)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.flush():
            self.flush()

    def _merge(self, rows: list[UsageRow]) -> None:
        with self._lock:
            for row in rows:
                total = self._pending.get(row.group)
                if total is None:
                    self._pending[row.group] = UsageRow(*row.group)
                    total = self._pending[row.group]
                total.requests += row.requests
                total.prompt_tokens += row.prompt_tokens
                total.generated_tokens += row.generated_tokens

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # a bug must not end usage recording for the process's life
                logger.exception("writing usage failed")


class AuditLog:
    """JSON lines of denied requests to `destination`: "-" is stdout, a path is a file (appended), None is off."""

    def __init__(self, destination: str | None, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.destination = destination
        self._clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._listener: logging.handlers.QueueListener | None = None
        self._logger: logging.Logger | None = None
        if not destination:
            return
        handler: logging.Handler = (logging.StreamHandler(sys.stdout) if destination == AUDIT_STDOUT
                                    else logging.FileHandler(destination, encoding="utf-8"))  # OSError: bad path
        handler.setFormatter(logging.Formatter("%(message)s"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._logger = logging.Logger(f"lorax_lite.audit.{id(self)}", logging.INFO)  # not in the logging tree
        self._logger.addHandler(logging.handlers.QueueHandler(records))
        self._listener = logging.handlers.QueueListener(records, handler)
        self._listener.start()

    def denied(self, *, status: int, reason: str, route: str, method: str, key_id: str | None, tenant: str | None,
               adapter: str | None, client: str) -> None:
        """One line for a refused request; never blocks on the disk."""
        if self._logger is None:
            return
        entry = {"time": self._clock().isoformat(timespec="milliseconds"), "event": "denied", "status": status,
                 "reason": reason, "method": method, "route": route[:200], "key_id": key_id, "tenant": tenant,
                 "adapter": adapter[:200] if adapter else adapter, "client": client, "request_id": REQUEST_ID.get()}
        self._logger.info(json.dumps(entry))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()  # writes what is queued
            for handler in self._listener.handlers:
                handler.flush()
                if isinstance(handler, logging.FileHandler):
                    handler.close()
            self._listener = None
