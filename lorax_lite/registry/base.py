"""AdapterRecord and the Registry interface shared by the SQLite and Redis backends.

The registry says which adapters exist and which version of each is current; the store
(`registry/store.py`) holds each version's files at `<store>/<adapter_id>/<version>/`. A version is
the sha256 over the adapter's weights and its canonical config, so it never changes once written.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class RegistryError(Exception):
    """The registry could not be used (unreachable, corrupt); the backends' messages name its URL (redacted)."""


class CorruptRecordError(RegistryError):
    """The registry answered, but with a record that cannot be read."""


class RegistryUnavailableError(RegistryError):
    """The registry did not answer (down, too slow, or failing fast while it is known to be down).

    The message never names the registry's URL, host, port or password: it may reach clients.
    `retry_after_s` is when a new attempt may get through (the next probe of the registry).
    """

    def __init__(self, message: str = "the adapter registry is unreachable", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class AdapterRecord:
    """One version of one adapter, as registered."""

    adapter_id: str
    version: str  # sha256 hex over the weights file and the canonical config
    base_model: str  # what it was validated against (model name or path as given)
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    store_path: str  # directory of this version's files in the store
    created_at: float = 0.0  # time.time() when this version was registered
    owner: str = ""  # business unit
    description: str = ""
    system_prompt: str = ""  # what the chatbots put first when a conversation has none
    pinned: bool = False  # per adapter id: kept in host memory by the engine
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Registry(ABC):
    """Which adapters exist and their versions. Safe for several processes writing at once."""

    url: str

    @abstractmethod
    def add_version(self, record: AdapterRecord) -> bool:
        """Add `record` as a version of its adapter and make it current, in one transaction.

        Registering the current version again is a no-op (returns False). Registering an older
        version again makes it current (returns True). The id's `pinned` flag is kept.
        """

    @abstractmethod
    def get(self, adapter_id: str) -> AdapterRecord | None:
        """The current version of the adapter, or None if the id is not registered."""

    @abstractmethod
    def get_version(self, adapter_id: str, version: str) -> AdapterRecord | None:
        """A specific version (current or not) of a registered adapter, or None."""

    @abstractmethod
    def list_current(self) -> list[AdapterRecord]:
        """The current version of every registered adapter, sorted by adapter_id."""

    @abstractmethod
    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        """Every version of the adapter, oldest first (empty if unknown)."""

    @abstractmethod
    def remove(self, adapter_id: str) -> bool:
        """Forget the adapter and all its versions; False if it was not registered."""

    @abstractmethod
    def set_pinned(self, adapter_id: str, pinned: bool) -> bool:
        """Set the adapter's pinned flag; False if it is not registered."""

    @abstractmethod
    def ping(self) -> None:
        """Raise RegistryError unless the registry answers (one trivial round trip: a health probe)."""

    def close(self) -> None:  # noqa: B027 (optional: a backend with nothing to release keeps this)
        """Release connections (idempotent)."""
