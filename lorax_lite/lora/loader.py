"""AdapterLoader: reads adapters from disk on a background thread, so the engine step never waits for disk.

The engine thread `submit`s keys and `collect`s what has landed (weights, or the exception that
loading raised); `wait` blocks until something lands. One daemon thread, started on first use.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from lorax_lite.lora.weights import LoRAWeights

logger = logging.getLogger(__name__)

Landed = tuple[str, "LoRAWeights | Exception", float]  # key, weights or the error, seconds spent


class AdapterLoader:
    """A queue of adapter keys to read, a queue of results, and the thread between them."""

    def __init__(self, load_fn: Callable[[str], LoRAWeights], pin_memory: bool = False) -> None:
        self._load_fn = load_fn
        self._pin_memory = pin_memory
        self._todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._landed: queue.SimpleQueue[Landed] = queue.SimpleQueue()
        self._landed_event = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, key: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorax-adapter-loader", daemon=True)
            self._thread.start()
        self._todo.put(key)

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
            key = self._todo.get()
            start = time.perf_counter()
            try:
                weights = self._load_fn(key)
                result: LoRAWeights | Exception = weights.pin_memory() if self._pin_memory else weights
            except Exception as exc:  # reported to the requests for this adapter, never raised here
                logger.warning("adapter %s failed to load: %s", key, exc)
                result = exc
            self._landed.put((key, result, time.perf_counter() - start))
            self._landed_event.set()
