"""AsyncLLM: the engine loop in a background thread, with one asyncio stream per request.

The event loop never waits on the engine: building a request (tokenizing a text prompt, resolving
an adapter id against the registry) runs in a worker thread; new requests, aborts and adapter
changes go to the engine thread as typed messages on a queue; outputs come back with
`loop.call_soon_threadsafe`. The thread sleeps while idle.

What the server reads of the engine goes through the few typed reads here (`config`, `tokenizer`,
`max_seq_len`, `resolve_adapter`, `list_adapters`, `snapshot`), never the engine's internals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.catalog import ResolvedAdapter
from lorax_lite.engine.engine import LLMEngine, Prompt
from lorax_lite.engine.request import OutputKind, Request, RequestOutput, SamplingParams, deadline_after
from lorax_lite.engine.stats import (
    BATCH_SIZE_BUCKETS,
    AdapterCacheSnapshot,
    EngineSnapshot,
    EngineStats,
    PrefixCacheSnapshot,
)
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.lora.weights import LoRAWeights
from lorax_lite.quantize import QuantizationReport
from lorax_lite.registry.base import Registry, RegistryUnavailableError
from lorax_lite.registry.factory import as_registry, as_store
from lorax_lite.registry.guard import RegistryHealth
from lorax_lite.registry.store import AdapterStore

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or crashed); no request can be served."""


# ---- messages to the engine thread ---------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class CacheAdapter:
    adapter_key: str
    weights: LoRAWeights


@dataclass(frozen=True)
class DiscardAdapter:
    adapter_key: str


EngineMessage = AddRequest | AbortRequest | CacheAdapter | DiscardAdapter


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    submitted: bool = False  # its AddRequest is sent (before: the request is being built in a worker thread)
    abort_requested: bool = False  # `abort` came before the request was submitted

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """`async for out in llm.generate(prompt, params)` yields outputs (cumulative by default); the last is finished."""

    def __init__(
        self,
        model: str | None = None,
        registry: Registry | str | None = None,
        store: AdapterStore | str | os.PathLike | None = None,
        **engine_config: object,
    ) -> None:
        config = EngineConfig.from_kwargs(model, **engine_config)
        self.engine = LLMEngine(config, registry=as_registry(registry), store=as_store(store))
        self._messages: queue.SimpleQueue[EngineMessage] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._snapshot = self.engine.snapshot()
        self._thread = threading.Thread(target=self._run_loop, name="lorax-engine", daemon=True)
        self._thread.start()

    # ---- typed reads ---------------------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def backends(self) -> dict[str, object]:
        """The engine's resolved device, dtype and backends (see LLMEngine.backends); set at start-up."""
        return self.engine.backends()

    @property
    def quantization(self) -> QuantizationReport | None:
        """What the base model's quantization did (None: full precision); set at start-up, never changes."""
        return self.engine.quantization

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        """The longest prompt + output served: `max_model_len` when given, else the model's context, capped by
        the KV cache."""
        return self.engine.max_seq_len

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def resolve_adapter(self, adapter_id: str) -> ResolvedAdapter:
        """The version of `adapter_id` a new request gets; AdapterNotFoundError if unknown, RegistryUnavailableError
        if the registry cannot say now. Blocking (it may read the registry, for at most `config.registry_timeout_s`):
        from async code, run it in a worker thread."""
        return self.engine.resolve_adapter(adapter_id)

    def list_adapters(self) -> list[ResolvedAdapter]:
        """Every adapter a request can name; RegistryUnavailableError while the registry is unreachable. Blocking
        (it may read the registry, for at most `config.registry_timeout_s`): from async code, run it in a thread."""
        return self.engine.list_adapters()

    def snapshot(self) -> EngineSnapshot:
        """The engine's state and counters as of its last step (never waits for the engine)."""
        return self._snapshot

    def registry_health(self) -> RegistryHealth:
        """Whether the adapter registry answered its last call, and since when it has not (a URL-free message);
        never calls the registry, never blocks."""
        return self.engine.registry_health()

    def check_registry(self) -> RegistryHealth:
        """Ping the registry, then `registry_health()`. Blocking for at most `config.registry_timeout_s` (at once
        while the registry is known to be down): from async code, run it in a worker thread."""
        return self.engine.check_registry()

    # ---- requests ------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        prompt_text: str | None = None,
        *,
        adapter: ResolvedAdapter | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        timeout: float | None = None,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request. Bad input raises ValueError (an unknown adapter: AdapterNotFoundError); leaving
        the loop early aborts the request. The adapter is `adapter_id` (resolved here, in a worker thread) or
        an `adapter` already resolved with `resolve_adapter`; neither means the base model. `timeout`: seconds
        from this call after which the request ends with finish_reason "timeout" and what it generated so
        far, waiting or running (> 0 and finite; None: no deadline). `cache_salt`: prefix-cached K/V is shared
        only between requests with the same salt (a tenant, say) and adapter version."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self._error or 'shut down'}")
        if adapter_id is not None and adapter is not None:
            raise ValueError("give adapter_id or a resolved adapter, not both")
        deadline = deadline_after(timeout)  # counts from now, not from when a worker thread built the request
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if request_id is not None:
            self._claim(request_id, stream)  # the id is taken from now on, across the worker-thread hop
        args = (prompt, sampling_params, request_id, adapter_id, adapter, prompt_text, output_kind, cache_salt)
        try:
            if isinstance(prompt, str) or adapter_id is not None:  # tokenizer or registry work: off the event loop
                request = await asyncio.to_thread(self._make_request, *args)
            else:
                request = self._make_request(*args)
        except BaseException:
            if request_id is not None:
                self._streams.pop(request_id, None)
            raise
        if request_id is None:
            self._claim(request.request_id, stream)
        request.deadline = deadline
        self._submit(request, stream)
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

    def _make_request(self, prompt: Prompt, sampling_params: SamplingParams | None, request_id: str | None,
                      adapter_id: str | None, adapter: ResolvedAdapter | None, prompt_text: str | None,
                      output_kind: OutputKind, cache_salt: str | None) -> Request:
        if adapter_id is not None:
            adapter = self.engine.resolve_adapter(adapter_id)
        return self.engine.make_request(prompt, sampling_params, request_id, adapter, prompt_text, output_kind,
                                        cache_salt=cache_salt)

    def _claim(self, request_id: str, stream: _Stream) -> None:
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._streams[request_id] = stream

    def _submit(self, request: Request, stream: _Stream) -> None:
        stream.submitted = True
        self._send(AddRequest(request))
        if stream.abort_requested:
            self._send(AbortRequest(request.request_id))
        if not self.is_running:  # the loop stopped while the request was built: nothing would ever answer it
            self._streams.pop(request.request_id, None)
            raise EngineDeadError(f"the engine stopped: {self._error or 'shut down'}")

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its stream ends with finish_reason "abort"."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.submitted:
            stream.abort_requested = True  # still being built: aborted as soon as it is submitted
            return
        self._send(AbortRequest(request_id))

    def _abort_now(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(AbortRequest(request_id))

    # ---- adapters ------------------------------------------------------------------------------

    def add_adapter(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Validate a PEFT adapter (in the caller's thread: it reads the disk) and make it usable at once."""
        check_adapter_id(adapter_id)
        weights = self.engine.read_adapter(path)
        adapter = self.engine.add_adapter_path(adapter_id, path)  # the next request can name it
        self._send(CacheAdapter(adapter.adapter_key, weights))

    def remove_adapter(self, adapter_id: str) -> None:
        """New requests cannot name it any more; running ones finish with it, waiting ones fail."""
        self._send(DiscardAdapter(self.engine.remove_adapter_path(adapter_id)))

    # ---- the engine thread ---------------------------------------------------------------------

    def _send(self, message: EngineMessage) -> None:
        """Queue a message for the engine thread; anything but an EngineMessage is refused here, in the caller."""
        if not isinstance(message, EngineMessage):
            raise TypeError(f"unknown engine message {message!r}")
        self._messages.put(message)
        self._wakeup.set()

    def shutdown(self) -> None:
        """Stop the engine thread; open streams end with EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                outputs = self._apply_messages()
                if self.engine.has_unfinished_requests():
                    outputs += self.engine.step()
                self._snapshot = self.engine.snapshot()  # before delivering: a client that saw an output sees its step
                self._deliver(outputs)
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
        except BaseException as exc:  # a bug in the loop: say so to every waiting client
            logger.exception("engine loop crashed")
            self._error = exc
        finally:
            self._stopping = True
            self._fail_all(EngineDeadError(f"the engine stopped: {self._error or 'shut down'}"))

    def _apply_messages(self) -> list[RequestOutput]:
        """Apply every queued message; returns the outputs they produced (of aborted requests)."""
        outputs: list[RequestOutput] = []
        while True:
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                return outputs
            self._apply(message, outputs)

    def _apply(self, message: EngineMessage, outputs: list[RequestOutput]) -> None:
        match message:
            case AddRequest(request):
                self._add(request)
            case AbortRequest(request_id):
                aborted = self.engine.abort_request(request_id)
                if aborted is not None:
                    outputs.append(aborted)
            case CacheAdapter(adapter_key, weights):
                self.engine.cache_adapter(adapter_key, weights)
            case DiscardAdapter(adapter_key):
                self.engine.discard_adapter(adapter_key)
            case _:  # _send admits none: a bug here stops the loop loudly
                raise TypeError(f"unknown engine message {message!r}")

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


# The server's one door into the engine: AsyncLLM and the types its reads return.
__all__ = [
    "BATCH_SIZE_BUCKETS", "AdapterCacheSnapshot", "AsyncLLM", "EngineDeadError", "EngineSnapshot", "EngineStats",
    "OutputKind", "PrefixCacheSnapshot", "RegistryHealth", "RegistryUnavailableError", "ResolvedAdapter",
]
