"""AdapterCatalog: which adapters a request can name, and which version (adapter key) each request gets.

Two sources: adapters added by path (`LLM.add_adapter`; adapter key = the id, or `id#n` when the id
is added for the n-th time, so a key's weights never change) and, when the engine has one, a
registry (`registry/`), whose current version of an id is looked up for every new request (adapter
key = `id@version`). So an id registered while serving is usable by the next
request; a removed id is unknown to new requests; a new version serves new requests while running
ones keep the version they were resolved to, and the old version leaves the cache once unused.

The registry is read through a GuardedRegistry (`registry/guard.py`): no lookup waits longer than
`registry_timeout_s`, and while the registry is unreachable lookups fail fast. Then a request gets
the version of its id that the registry confirmed last, if that was at most `registry_stale_s` ago;
any other id is RegistryUnavailableError (not AdapterNotFoundError: the registry did not say it is
unknown). Listing during an outage is RegistryUnavailableError too, not a partial list.

A request resolves its adapter once (`resolve`, in any thread: it reads the registry) into a
ResolvedAdapter that carries everything the engine needs later: the adapter key, where its files
are (with the version to verify), and the registry record (owner, system prompt, pin flag). The
engine thread then `admit`s it and reports when its request is `finished`; the catalog keeps the
adapter cache (AdapterManager) in step: superseded versions leave it, the pin flag is followed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

from lorax_lite.lora.errors import AdapterNotFoundError
from lorax_lite.lora.loader import AdapterSource
from lorax_lite.lora.manager import AdapterManager
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.registry.base import AdapterRecord, Registry, RegistryError, RegistryUnavailableError
from lorax_lite.registry.guard import DEFAULT_TIMEOUT_S, NO_REGISTRY, RegistryHealth, guarded
from lorax_lite.registry.store import AdapterStore

logger = logging.getLogger(__name__)

DEFAULT_STALE_S = 300.0


@dataclass(frozen=True)
class ResolvedAdapter:
    """One request's adapter: the id it named, the version it gets (`source`), and its registry record
    (None for an adapter added by path)."""

    adapter_id: str
    source: AdapterSource
    record: AdapterRecord | None = None

    @property
    def adapter_key(self) -> str:
        return self.source.adapter_key

    @property
    def system_prompt(self) -> str:
        return self.record.system_prompt if self.record is not None else ""


class AdapterCatalog:
    """Adapter ids -> resolved versions; keeps the adapter cache in step with the registry.

    `add_path`, `remove_path`, `resolve` and `list_adapters` are safe from any thread; `admit` and
    `finished` (which change the cache) run in the engine thread.
    """

    def __init__(
        self, manager: AdapterManager, registry: Registry | None = None, store: AdapterStore | None = None,
        registry_timeout_s: float = DEFAULT_TIMEOUT_S, registry_stale_s: float = DEFAULT_STALE_S,
    ) -> None:
        self.manager = manager
        self.registry = None if registry is None else guarded(registry, registry_timeout_s)
        self.registry_stale_s = registry_stale_s
        self.store = store  # when given, registry versions are read from this store, whatever path the record names
        self._lock = threading.Lock()  # guards _paths, _num_adds and _confirmed
        self._paths: dict[str, ResolvedAdapter] = {}  # added by path: id -> what it names now
        self._num_adds: Counter[str] = Counter()  # id -> times it was added by path
        # registry id -> what the registry last said it is, and when (time.monotonic()): served during outages
        self._confirmed: dict[str, tuple[ResolvedAdapter, float]] = {}
        self._current: dict[str, ResolvedAdapter] = {}  # registry id -> the version last admitted
        self._live: Counter[str] = Counter()  # adapter key -> requests in the engine (waiting or running) using it

    # ---- adapters added by path (any thread) --------------------------------------------------

    def add_path(self, adapter_id: str, path: str | os.PathLike) -> ResolvedAdapter:
        """Make `adapter_id` name the adapter directory `path` (the cache is untouched)."""
        check_adapter_id(adapter_id)
        with self._lock:
            if adapter_id in self._paths:
                raise ValueError(f"adapter {adapter_id!r} is already added; remove it first to replace it")
            self._num_adds[adapter_id] += 1
            n = self._num_adds[adapter_id]
            key = adapter_id if n == 1 else f"{adapter_id}#{n}"  # a re-added id may name new weights: a new key
            added = ResolvedAdapter(adapter_id, AdapterSource(key, adapter_id, os.fspath(path)))
            self._paths[adapter_id] = added
        return added

    def remove_path(self, adapter_id: str) -> str:
        """Forget an adapter added by path; returns its adapter key. AdapterNotFoundError if not added."""
        with self._lock:
            added = self._paths.pop(adapter_id, None)
        if added is None:
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}")
        return added.adapter_key

    @property
    def added_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    # ---- lookups (any thread; may read the registry) ------------------------------------------

    def resolve(self, adapter_id: str) -> ResolvedAdapter:
        """The version a new request for `adapter_id` gets; AdapterNotFoundError if the id is unknown,
        RegistryUnavailableError if the registry cannot say and has not confirmed it recently.

        An added id shadows a registered one of the same name."""
        check_adapter_id(adapter_id)
        with self._lock:
            added = self._paths.get(adapter_id)
        if added is not None:
            return added
        if self.registry is None:
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}; add it first (added: {self._added_list()})")
        try:
            record = self.registry.get(adapter_id)
        except RegistryUnavailableError as exc:
            return self._last_confirmed(adapter_id, exc)
        if record is None:
            with self._lock:
                self._confirmed.pop(adapter_id, None)
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}; not added and not in the registry "
                                       f"(added: {self._added_list()})")
        return self._confirm([record])[0]

    def list_adapters(self) -> list[ResolvedAdapter]:
        """Every adapter a request can name: those added by path first, then the registered ones they do not shadow.

        RegistryUnavailableError while the registry is unreachable: a list of only what this engine saw
        recently would look complete and is not."""
        with self._lock:
            added = [self._paths[adapter_id] for adapter_id in sorted(self._paths)]
        registered = [] if self.registry is None else self._confirm(self.registry.list_current(), complete=True)
        shadowed = {a.adapter_id for a in added}
        return added + [r for r in registered if r.adapter_id not in shadowed]

    def registry_health(self) -> RegistryHealth:
        """The registry as the last call saw it; never calls it."""
        return NO_REGISTRY if self.registry is None else self.registry.health()

    def check_registry(self) -> RegistryHealth:
        """Ping the registry (at most `registry_timeout_s`; at once while it is known to be down), then its health."""
        if self.registry is None:
            return NO_REGISTRY
        try:
            self.registry.ping()
        except RegistryError:
            pass  # what it means is in the health
        return self.registry.health()

    def _confirm(self, records: list[AdapterRecord], complete: bool = False) -> list[ResolvedAdapter]:
        """Remember what the registry just said about these ids (`complete`: and that no other id exists)."""
        resolved = [self._registered(record) for record in records]
        now = time.monotonic()
        with self._lock:
            if complete:
                self._confirmed.clear()
            self._confirmed.update((r.adapter_id, (r, now)) for r in resolved)
        return resolved

    def _last_confirmed(self, adapter_id: str, exc: RegistryUnavailableError) -> ResolvedAdapter:
        with self._lock:
            adapter, confirmed_at = self._confirmed.get(adapter_id, (None, 0.0))
        if adapter is not None and time.monotonic() - confirmed_at < self.registry_stale_s:
            return adapter
        raise RegistryUnavailableError(f"adapter {adapter_id!r} cannot be looked up now: {exc}; retry later",
                                       exc.retry_after_s) from None

    def _added_list(self) -> str:
        return ", ".join(self.added_ids) or "none"

    def _registered(self, record: AdapterRecord) -> ResolvedAdapter:
        path = (
            record.store_path if self.store is None else os.fspath(self.store.path(record.adapter_id, record.version))
        )
        key = f"{record.adapter_id}@{record.version}"
        return ResolvedAdapter(record.adapter_id, AdapterSource(key, record.adapter_id, path, record.version), record)

    # ---- the engine thread --------------------------------------------------------------------

    def admit(self, adapter: ResolvedAdapter) -> None:
        """A request for `adapter` enters the engine. A newer registry version supersedes the previous one,
        which leaves the cache once no request in the engine uses it; the pin flag is followed. An adapter
        added by path that was removed (or replaced) since the request resolved it is refused:
        AdapterNotFoundError, as for the requests that were waiting for it when it was removed."""
        if adapter.record is None:
            with self._lock:
                current = self._paths.get(adapter.adapter_id)
            if current is None or current.adapter_key != adapter.adapter_key:
                raise AdapterNotFoundError(f"adapter {adapter.adapter_id!r} was removed")
        self._live[adapter.adapter_key] += 1
        if adapter.record is None:
            return
        previous = self._current.get(adapter.adapter_id)
        self._current[adapter.adapter_id] = adapter
        if previous is not None and previous.adapter_key != adapter.adapter_key:
            self._drop_if_unused(previous.adapter_key)
        if adapter.record.pinned != self.manager.is_pinned(adapter.adapter_key):
            self._follow_pin(adapter, adapter.record.pinned)

    def finished(self, adapter: ResolvedAdapter) -> None:
        """A request admitted with `adapter` left the engine."""
        key = adapter.adapter_key
        self._live[key] -= 1
        if self._live[key] == 0:
            del self._live[key]
            if adapter.record is not None:
                self._drop_if_unused(key)

    def _drop_if_unused(self, adapter_key: str) -> None:
        """Remove a registry version from the cache unless a request uses it or it is its id's current one."""
        if not self._live.get(adapter_key) and all(c.adapter_key != adapter_key for c in self._current.values()):
            self.manager.remove(adapter_key)

    def _follow_pin(self, adapter: ResolvedAdapter, pinned: bool) -> None:
        if not pinned:
            self.manager.unpin(adapter.adapter_key)
            return
        try:
            self.manager.pin(adapter.source)
        except ValueError as exc:  # too many pins for this cache: serve it unpinned
            logger.warning("%s", exc)
