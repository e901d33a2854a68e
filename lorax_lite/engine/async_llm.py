"""AsyncLLM: the engine loop in a background thread, with one asyncio stream per request.

The event loop never waits on the engine: new requests and aborts go to the engine thread through
a queue, and outputs come back with `loop.call_soon_threadsafe`. The thread sleeps while idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.engine import LLMEngine, Prompt
from lorax_lite.engine.request import Request, RequestOutput, SamplingParams
from lorax_lite.lora.manager import check_adapter_id
from lorax_lite.registry.base import Registry
from lorax_lite.registry.factory import as_registry, as_store

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or crashed); no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """`async for out in llm.generate(prompt, params)` yields cumulative outputs; the last is finished."""

    def __init__(
        self, model: str | None = None, registry: Registry | str | None = None, store: AdapterStore | str | os.PathLike | None = None,
        **engine_config: object,
    ) -> None:
        config = EngineConfig.from_kwargs(model, **engine_config)
        self.engine = LLMEngine(config, registry=as_registry(registry), store=as_store(store))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name="lorax-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        prompt_text: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request. Bad input raises ValueError (an unknown adapter: AdapterNotFoundError);
        leaving the loop early aborts the request. `adapter_id` None means the base model."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self._error or 'shut down'}")
        if request_id is not None and request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = self.engine.make_request(prompt, sampling_params, request_id, adapter_id, prompt_text)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request.request_id] = stream
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort_now(request.request_id)

    def add_adapter(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Validate a PEFT adapter (in the caller's thread: it reads the disk) and make it usable at once."""
        check_adapter_id(adapter_id)
        weights = self.engine.load_adapter_weights(path)
        self.engine.register_adapter(adapter_id, path)
        self._send(("cache_adapter", (adapter_id, weights)))

    def remove_adapter(self, adapter_id: str) -> None:
        """New requests cannot use it any more; running ones finish with it."""
        self.engine.unregister_adapter(adapter_id)
        self._send(("drop_adapter", adapter_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its stream ends with finish_reason "abort"."""
        self._send(("abort", request_id))

    def _abort_now(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def _send(self, command: tuple[str, object]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def shutdown(self) -> None:
        """Stop the engine thread; open streams end with EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._deliver(self.engine.step())
        except BaseException as exc:  # a bug in the loop: say so to every waiting client
            logger.exception("engine loop crashed")
            self._error = exc
        finally:
            self._stopping = True
            self._fail_all(EngineDeadError(f"the engine stopped: {self._error or 'shut down'}"))

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(arg)
            elif kind == "cache_adapter":
                self.engine.adapters.put(*arg)
            elif kind == "drop_adapter":
                self.engine.adapters.remove(arg)
            else:
                aborted = self.engine.abort_request(arg)
                if aborted is not None:
                    self._deliver([aborted.to_output()])

    def _add(self, request: Request) -> None:
        if request.request_id not in self._streams:
            return  # the client left before the engine saw the request
        try:
            self.engine.add(request)
        except ValueError as exc:
            self._streams.pop(request.request_id).put(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)
