"""Reading adapters for the cache: where an adapter's files are (AdapterSource), how they are read and
checked for one base model (AdapterReader), and the thread that reads them so the engine step never
waits for disk (AdapterLoader).

The engine thread `submit`s sources and `collect`s what has landed (weights, or the exception that
reading raised); `wait` blocks until something lands. One daemon thread, started on first use.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lorax_lite.lora.checksum import compute_version
from lorax_lite.lora.errors import CorruptWeightsError
from lorax_lite.lora.weights import LoRAWeights, load_lora_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSource:
    """Where the weights cached under `adapter_key` come from.

    `version` is the registered content checksum, verified before the files are read (a mismatch
    refuses the adapter with CorruptWeightsError); None for an adapter added by path.
    """

    adapter_key: str
    adapter_id: str
    path: str  # the PEFT adapter directory
    version: str | None = None


class AdapterReader:
    """Reads and validates adapters for one base model: its LoRA targets, `max_lora_rank` and dtype."""

    def __init__(self, targets: Mapping[str, tuple[int, int]], max_lora_rank: int, dtype: torch.dtype) -> None:
        self.targets = dict(targets)
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype

    def read_dir(self, path: str | os.PathLike) -> LoRAWeights:
        """Read a PEFT adapter directory; raises the specific AdapterError of the first problem."""
        return load_lora_weights(path, self.targets, self.max_lora_rank, dtype=self.dtype)

    def read(self, source: AdapterSource) -> LoRAWeights:
        """Read a source, verifying a registered version's checksum first."""
        if source.version is not None:
            _verify(source, source.version)
        return self.read_dir(source.path)


def _verify(source: AdapterSource, version: str) -> None:
    what = f"adapter {source.adapter_id!r} version {version[:12]}"
    try:
        actual = compute_version(source.path)
    except (OSError, ValueError) as exc:
        raise CorruptWeightsError(f"{what}: files unreadable in the store ({exc})") from exc
    if actual != version:
        raise CorruptWeightsError(f"{what}: checksum mismatch in the store (files at {source.path} hash to "
                                  f"{actual[:12]}); re-register the adapter")


Landed = tuple[str, "LoRAWeights | Exception", float]  # adapter_key, weights or the error, seconds spent


class AdapterLoader:
    """A queue of sources to read, a queue of results, and the thread between them."""

    def __init__(self, read_fn: Callable[[AdapterSource], LoRAWeights], pin_memory: bool = False) -> None:
        self._read_fn = read_fn
        self._pin_memory = pin_memory
        self._todo: queue.SimpleQueue[AdapterSource] = queue.SimpleQueue()
        self._landed: queue.SimpleQueue[Landed] = queue.SimpleQueue()
        self._landed_event = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, source: AdapterSource) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorax-adapter-loader", daemon=True)
            self._thread.start()
        self._todo.put(source)

    def collect(self) -> list[Landed]:
        """Everything that has landed since the last call."""
        landed = []
        while True:
            try:
                landed.append(self._landed.get_nowait())
            except queue.Empty:
                return landed

    def wait(self, timeout: float) -> None:
        """Block until a load lands (or `timeout` seconds pass)."""
        if self._landed_event.wait(timeout):
            self._landed_event.clear()

    def _run(self) -> None:
        while True:
            source = self._todo.get()
            start = time.perf_counter()
            try:
                weights = self._read_fn(source)
                result: LoRAWeights | Exception = weights.pin_memory() if self._pin_memory else weights
            except Exception as exc:  # reported to the requests for this adapter, never raised here
                logger.warning("adapter %s failed to load: %s", source.adapter_key, exc)
                result = exc
            self._landed.put((source.adapter_key, result, time.perf_counter() - start))
            self._landed_event.set()
