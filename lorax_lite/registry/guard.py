"""Guard and GuardedRegistry: every call to a registry backend with a deadline, behind a circuit breaker (Guard;
GuardedRegistry is the adapter Registry with each call guarded, and the server guards its tenant store calls).

A call runs in a small pool of threads; the caller waits at most `timeout_s`. A call that fails or
misses its deadline marks the registry unreachable: from then on calls fail fast with
RegistryUnavailableError, except one probe every `probe_interval_s`, and the first call that
succeeds marks it reachable again. A hung call keeps its thread until the backend's own socket
timeout; at most `max_pending` calls run or wait at once, and beyond that calls fail fast, so a
registry that stops answering never piles up threads.

Messages of the errors raised here never name the registry (they may reach clients); the logs
name it by its `url`, which the backends keep free of passwords.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from lorax_lite.registry.base import (
    AdapterRecord,
    CorruptRecordError,
    Registry,
    RegistryError,
    RegistryUnavailableError,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
PROBE_INTERVAL_S = 1.0
MAX_WORKERS = 8
MAX_PENDING = 64
UNREACHABLE = "the adapter registry is unreachable"

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryHealth:
    """The registry as an engine last saw it. `message` never names the registry's URL."""

    configured: bool  # the engine has a registry (else adapters come only from paths)
    reachable: bool  # its last call succeeded (False when not configured)
    unreachable_for_s: float | None = None  # since the first failure of the current outage
    last_error_age_s: float | None = None  # since the last failed call, outage or not
    message: str = ""


NO_REGISTRY = RegistryHealth(configured=False, reachable=False, message="no adapter registry is configured")


class Guard:
    """Calls to one backend (named by `url`, never with a password) with a deadline each and a circuit breaker
    (see the module docstring)."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 probe_interval_s: float = PROBE_INTERVAL_S, max_workers: int = MAX_WORKERS,
                 max_pending: int = MAX_PENDING) -> None:
        if not timeout_s > 0:
            raise ValueError(f"registry timeout must be > 0 seconds, got {timeout_s}")
        self.url = url
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="lorax-registry")
        self._pending = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()  # guards the breaker's state below
        self._down_since: float | None = None  # monotonic time of the outage's first failure
        self._last_error_at: float | None = None
        self._next_probe_at = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- state -----------------------------------------------------------------------------------

    @property
    def is_reachable(self) -> bool:
        return self._down_since is None

    def health(self) -> RegistryHealth:
        """The breaker's state now; never calls the registry."""
        with self._lock:
            down_since, last_error_at = self._down_since, self._last_error_at
        now = time.monotonic()
        last_error_age = None if last_error_at is None else now - last_error_at
        if down_since is None:
            return RegistryHealth(True, True, None, last_error_age, "the adapter registry is reachable")
        down_for = now - down_since
        return RegistryHealth(True, False, down_for, last_error_age, f"{UNREACHABLE} (for {down_for:.0f} s)")

    # ---- one call --------------------------------------------------------------------------------

    def call(self, method: Callable[..., T], *args: object) -> T:
        """`method(*args)` in the pool, waiting at most timeout_s; RegistryUnavailableError when it fails, hangs
        or the breaker is open."""
        is_probe = self._admit()
        future = self._submit(method, *args, is_probe=is_probe)
        if not wait([future], timeout=self.timeout_s).done:
            future.cancel()  # still queued: it never runs; running: its thread is back at the socket timeout
            self._failed(f"no answer within {self.timeout_s:g} s")
            raise RegistryUnavailableError(f"{UNREACHABLE}: no answer within {self.timeout_s:g} s",
                                           self.probe_interval_s)
        try:
            result = future.result()
        except CorruptRecordError as exc:  # the registry answered: it is reachable, one record is bad
            self._succeeded()
            logger.error("%s", exc)
            raise CorruptRecordError("the adapter registry holds a record that cannot be read") from None
        except RegistryError as exc:
            self._failed(str(exc))
            raise RegistryUnavailableError(UNREACHABLE, self.probe_interval_s) from None
        self._succeeded()
        return result

    def _admit(self) -> bool:
        """Let the call through while reachable, or as the probe when one is due (True); else fail fast."""
        with self._lock:
            if self._down_since is None:
                return False
            now = time.monotonic()
            if now < self._next_probe_at:
                raise RegistryUnavailableError(UNREACHABLE, self._next_probe_at - now)
            self._next_probe_at = now + self.probe_interval_s + self.timeout_s  # no other call until it is back
            return True

    def _submit(self, method: Callable[..., T], *args: object, is_probe: bool) -> Future[T]:
        if not self._pending.acquire(blocking=False):  # earlier calls still hang: no new thread for this one
            if is_probe:
                self._failed("earlier calls still hang")
            raise RegistryUnavailableError(f"{UNREACHABLE}: too many lookups are waiting for it", self.probe_interval_s)
        try:
            future = self._pool.submit(method, *args)
        except BaseException:
            self._pending.release()
            raise
        future.add_done_callback(lambda _: self._pending.release())  # cancelled ones too
        return future

    def _failed(self, error: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._last_error_at = now
            self._next_probe_at = now + self.probe_interval_s
            if self._down_since is not None:
                return
            self._down_since = now
        logger.warning("adapter registry %s is unreachable (%s); lookups fail fast, with one probe every %g s",
                       self.url, error, self.probe_interval_s)

    def _succeeded(self) -> None:
        with self._lock:
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            logger.warning("adapter registry %s is reachable again (after %.1f s)", self.url,
                           time.monotonic() - down_since)


class GuardedRegistry(Guard, Registry):
    """`registry` with a deadline on every call and a circuit breaker."""

    def __init__(self, registry: Registry, timeout_s: float = DEFAULT_TIMEOUT_S,
                 probe_interval_s: float = PROBE_INTERVAL_S, max_workers: int = MAX_WORKERS,
                 max_pending: int = MAX_PENDING) -> None:
        super().__init__(registry.url, timeout_s, probe_interval_s, max_workers, max_pending)
        self.registry = registry

    # ---- the Registry interface, each call guarded ----------------------------------------------

    def add_version(self, record: AdapterRecord) -> bool:
        return self.call(self.registry.add_version, record)

    def get(self, adapter_id: str) -> AdapterRecord | None:
        return self.call(self.registry.get, adapter_id)

    def get_version(self, adapter_id: str, version: str) -> AdapterRecord | None:
        return self.call(self.registry.get_version, adapter_id, version)

    def list_current(self) -> list[AdapterRecord]:
        return self.call(self.registry.list_current)

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        return self.call(self.registry.versions, adapter_id)

    def remove(self, adapter_id: str) -> bool:
        return self.call(self.registry.remove, adapter_id)

    def set_pinned(self, adapter_id: str, pinned: bool) -> bool:
        return self.call(self.registry.set_pinned, adapter_id, pinned)

    def ping(self) -> None:
        self.call(self.registry.ping)

    def close(self) -> None:
        super().close()
        self.registry.close()


def guarded(registry: Registry, timeout_s: float = DEFAULT_TIMEOUT_S) -> GuardedRegistry:
    """`registry` behind a deadline and a breaker (itself when it is guarded already)."""
    return registry if isinstance(registry, GuardedRegistry) else GuardedRegistry(registry, timeout_s)
