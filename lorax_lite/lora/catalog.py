"""AdapterCatalog: where each adapter id's weights come from, and which cache key a request uses.

Two sources: adapters added by path (`LLM.add_adapter`; key = the id) and, when the engine has
one, a registry (`registry/`), whose current version of an id is looked up for every new request
(key = `id@version`). So an id registered while serving is usable by the next request; a
removed id is unknown to new requests; a new version serves new requests while running ones keep
the version they were admitted with, and the old version leaves the cache once unused. A
registry version's checksum is verified when it is loaded; a mismatch refuses that adapter only.

`resolve` may run in any thread (it only reads the registry and records sources); `admit` and
the cache changes it makes run in the engine thread; `load` runs on the loader thread.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lorax_lite.lora.errors import AdapterNotFoundError, CorruptWeightsError
from lorax_lite.lora.manager import AdapterManager, check_adapter_id
from lorax_lite.lora.weights import LoRAWeights
from lorax_lite.registry.base import AdapterRecord, Registry
from lorax_lite.registry.store import AdapterStore, compute_version

logger = logging.getLogger(__name__)


class AdapterCatalog:
    """Adapter ids -> cache keys and sources; keeps the adapter cache in step with the registry."""

    def __init__(
        self,
        manager: AdapterManager,
        load_weights: Callable[[str], LoRAWeights],
        registry: Registry | None = None,
        store: AdapterStore | None = None,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.store = store  # when given, registry versions are read from this store, whatever path the record names
        self._load_weights = load_weights
        self._paths: dict[str, str] = {}  # added by path: id -> directory
        self._records: dict[str, AdapterRecord] = {}  # registry versions seen: key -> record
        self._current: dict[str, str] = {}  # registry id -> key of the version last admitted
        self._live: Counter[str] = Counter()  # key -> requests in the engine (waiting or running) that use it

    # ---- adapters added by path --------------------------------------------------------------

    def add(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Record where an adapter is (safe from any thread; the cache is untouched)."""
        check_adapter_id(adapter_id)
        if adapter_id in self._paths:
            raise ValueError(f"adapter {adapter_id!r} is already added; remove it first to replace it")
        self._paths[adapter_id] = os.fspath(path)

    def discard(self, adapter_id: str) -> None:
        if self._paths.pop(adapter_id, None) is None:
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}")

    @property
    def added_ids(self) -> list[str]:
        return sorted(self._paths)

    # ---- requests ----------------------------------------------------------------------------

    def resolve(self, adapter_id: str) -> str:
        """The cache key a new request for `adapter_id` uses; AdapterNotFoundError if unknown."""
        check_adapter_id(adapter_id)
        if adapter_id in self._paths:
            return adapter_id
        record = self.registry.get(adapter_id) if self.registry is not None else None
        if record is None:
            where = "add it first" if self.registry is None else f"not added and not in the registry {self.registry.url}"
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}; {where} (added: {', '.join(self.added_ids) or 'none'})")
        key = f"{adapter_id}@{record.version}"
        self._records[key] = record
        return key

    def admit(self, adapter_id: str, key: str) -> None:
        """Engine thread, as a request enters: a newer registry version supersedes the previous one,
        which leaves the cache once no request in the engine uses it; the pin flag is followed."""
        self._live[key] += 1
        record = self._records.get(key)
        if record is None:
            return
        previous = self._current.get(adapter_id)
        self._current[adapter_id] = key
        if previous is not None and previous != key:
            self._retire_if_unused(previous)
        if record.pinned != self.manager.is_pinned(key):
            self._follow_pin(key, record.pinned)

    def finished(self, key: str) -> None:
        """Engine thread: a request admitted with `key` left the engine."""
        self._live[key] -= 1
        if self._live[key] == 0:
            del self._live[key]
            self._retire_if_unused(key)

    def _retire_if_unused(self, key: str) -> None:
        # The record stays (a few hundred bytes per version seen): a request resolved in another
        # thread just before a newer version was admitted can still load the version it was given.
        if key in self._records and not self._live.get(key) and key not in self._current.values():
            self.manager.remove(key)

    def _follow_pin(self, key: str, pinned: bool) -> None:
        if not pinned:
            self.manager.unpin(key)
            return
        try:
            self.manager.pin(key)
        except ValueError as exc:  # too many pins for this cache: serve it unpinned
            logger.warning("%s", exc)

    # ---- loader thread -----------------------------------------------------------------------

    def load(self, key: str) -> LoRAWeights:
        """Read an adapter's weights for the cache (runs on the loader thread)."""
        if key in self._paths:
            return self._load_weights(self._paths[key])
        record = self._records.get(key)
        if record is None:
            raise AdapterNotFoundError(f"adapter {key.split('@')[0]!r} was removed")
        path = self._path(record)
        self._verify(record, path)
        return self._load_weights(os.fspath(path))

    def _path(self, record: AdapterRecord) -> Path:
        if self.store is None:
            return Path(record.store_path)
        return self.store.path(record.adapter_id, record.version)

    @staticmethod
    def _verify(record: AdapterRecord, path: Path) -> None:
        try:
            actual = compute_version(path)
        except OSError as exc:
            raise CorruptWeightsError(f"adapter {record.adapter_id!r} version {record.version[:12]}: files unreadable in the store ({exc})") from exc
        if actual != record.version:
            raise CorruptWeightsError(
                f"adapter {record.adapter_id!r} version {record.version[:12]}: checksum mismatch in the store "
                f"(files at {path} hash to {actual[:12]}); re-register the adapter"
            )
