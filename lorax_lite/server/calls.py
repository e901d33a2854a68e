"""EngineCall: one request in the engine as the HTTP layer sees it, shared by the native and OpenAI routes.

Starting one admits it against the queue limit (429), submits it and waits for its first output, so
validation and adapter errors (404 unknown adapter, 400 refused adapter) still become a status code.
The engine streams DELTA outputs (only what is new); the call keeps the text and the totals, so a
response costs time linear in its length.
Closing it aborts an unfinished request (its KV blocks and adapter reference are freed at once) and
counts it in the metrics. A client that disconnects cancels whichever of these awaits is running.

A request runs for at most its timeout (its own, capped by max_request_seconds): past it the engine
finishes it with finish reason "timeout", a 504 when no token was generated yet. While the server
drains, the open calls are registered on the state, so the drain can stop the ones left at its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request

from lorax_lite.engine.async_llm import OutputKind, ResolvedAdapter
from lorax_lite.engine.request import RequestOutput, SamplingParams
from lorax_lite.server.auth import Principal, audit_denial, principal_of
from lorax_lite.server.errors import RETRY_AFTER_SECONDS, ServerError, as_server_error, brief
from lorax_lite.server.state import ServerState

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
ADAPTER_HEADERS = ("adapter_id", "x-adapter-id")
LEASE_MARGIN_S = 60.0  # a rate-limit lease outlives its request's deadline by this much (then it expires)


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its request was aborted."""


class EngineCall:
    """A started request: `first` is its first output; iterate `outputs()` for the rest (each carries only
    what is new); `text` is everything generated so far."""

    def __init__(
        self, state: ServerState, adapter: ResolvedAdapter | None, outputs: AsyncGenerator[RequestOutput, None],
        first: RequestOutput, principal: Principal, lease: str | None,
    ) -> None:
        self.state = state
        self.adapter = adapter
        self.principal = principal
        self.lease = lease  # the rate limiter's, released when the call closes
        self._outputs = outputs
        self.first = first
        self.last = first
        self._text_parts: list[str] = []
        self._closed = False
        self._stopped_for_shutdown = False

    @property
    def adapter_name(self) -> str:
        """What responses and metrics call the adapter: its id, or the base model's name."""
        return self.adapter.adapter_id if self.adapter is not None else self.state.served_model_name

    @property
    def text(self) -> str:
        """The text of every output iterated so far."""
        return "".join(self._text_parts)

    @classmethod
    async def start(
        cls,
        state: ServerState,
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | None,
        prompt_text: str | None,
        max_tokens_name: str = "max_new_tokens",
        timeout: float | None = None,
    ) -> EngineCall:
        """Admit the request under its key's rate limits, submit it and wait for the first output; raises
        ServerError with the right status. `timeout`: the request's own, in seconds (capped by
        max_request_seconds)."""
        state.check_prompt_tokens(len(prompt_ids), "prompt" if max_tokens_name == "max_tokens" else "inputs")
        state.check_max_tokens(params.max_tokens, max_tokens_name)
        check_length(len(prompt_ids), params.max_tokens, state.llm.max_seq_len, max_tokens_name)
        adapter_id = adapter.adapter_id if adapter is not None else None
        adapter_name = adapter_id or state.served_model_name
        principal = principal_of(request)
        run_for = state.request_timeout(timeout)
        try:
            lease = await state.tenancy.acquire(principal, len(prompt_ids), run_for + LEASE_MARGIN_S)
        except ServerError as exc:
            audit_denial(request, exc.status, f"rate limit: {exc.error_type}", adapter_id)
            state.metrics.observe_rate_limited(principal.tenant, principal.key_id)
            raise
        try:
            state.admit()
            try:
                outputs = state.llm.generate(prompt_ids, params, adapter=adapter, prompt_text=prompt_text,
                                             output_kind=OutputKind.DELTA, timeout=run_for,
                                             cache_salt=principal.cache_salt)
                try:
                    first = await next_output(outputs)
                except BaseException as exc:
                    await _shielded_close(outputs)
                    state.metrics.observe_unanswered(adapter_name, exc)
                    raise
            except Exception as exc:
                raise as_server_error(exc, adapter_id) from exc
            finally:
                state.release()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await state.tenancy.release(principal, lease, 0)
            raise
        call = cls(state, adapter, outputs, first, principal, lease)
        try:
            call.raise_if_failed(first)
        except ServerError:
            await call.close()
            raise
        state.calls.add(call)
        return call

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The first output, then each new one until the request finishes; a failure raises ServerError."""
        out = self.first
        while True:
            self.raise_if_failed(out)
            self.last = out
            self._text_parts.append(out.text)
            yield out
            if out.finished:
                return
            out = await next_output(self._outputs)

    async def close(self) -> None:
        """Leave the request (aborting it if unfinished) and count it, once."""
        if self._closed:
            return
        self._closed = True
        self.state.calls.discard(self)
        await _shielded_close(self._outputs)
        outcome = "shutdown" if self._stopped_for_shutdown else None
        self.state.metrics.observe_finished(self.adapter_name, self.last, outcome)
        prompt, generated = len(self.last.prompt_token_ids), self.last.num_generated_tokens
        self.state.metrics.observe_usage(self.principal.tenant, self.principal.key_id, self.adapter_name, prompt,
                                         generated)
        self.state.tenancy.usage.add(self.principal.tenant, self.principal.key_id, self.adapter_name, prompt,
                                     generated)
        with anyio.CancelScope(shield=True):
            await self.state.tenancy.release(self.principal, self.lease, generated)

    async def stop_for_shutdown(self) -> None:
        """The drain's deadline passed: abort the request; its client is told the server is shutting down."""
        if not self._closed and not self.last.finished:
            self._stopped_for_shutdown = True
            await self.state.llm.abort(self.first.request_id)

    def raise_if_failed(self, out: RequestOutput) -> None:
        """A ServerError for an output that ends the request without an answer (failed, aborted, timed out
        before its first token)."""
        if out.finish_reason == "error":
            raise as_server_error(out.exception or RuntimeError(out.error or "unknown error"), out.adapter_id)
        if out.finish_reason == "abort" and self._stopped_for_shutdown:
            raise ServerError(503, f"the server is shutting down: the request was stopped after "
                              f"{out.num_generated_tokens} generated tokens; retry it", "shutting_down",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if out.finish_reason == "abort":
            raise ServerError(500, "the request was aborted before it finished", "incomplete_generation")
        if out.finish_reason == "timeout" and out.num_generated_tokens == 0:
            raise ServerError(504, "the request timed out before its first token (its timeout, at most "
                              f"{self.state.limits.max_request_seconds:g} s: max_request_seconds); retry later or "
                              "give it more time", "timeout")

    def headers(self) -> dict[str, str]:
        """x-* headers; once the request finished they include token counts and timings (ms)."""
        out = self.last
        headers = {"x-adapter-id": self.adapter_name, "x-prompt-tokens": str(len(out.prompt_token_ids))}
        if not out.finished or out.metrics is None:
            return headers
        m = out.metrics
        headers["x-generated-tokens"] = str(out.num_generated_tokens)
        headers["x-queue-time"] = _ms(m.queue_time)
        headers["x-time-to-first-token"] = _ms(m.time_to_first_token)
        if m.first_scheduled_time is not None and m.finished_time is not None:
            headers["x-inference-time"] = _ms(m.finished_time - m.first_scheduled_time)
        return headers


async def run_to_end_or_abort(
    call: EngineCall, request: Request, on_output: Callable[[RequestOutput], object] | None = None
) -> RequestOutput:
    """The finished output of a non-streaming request (`on_output` sees each one); the call is closed
    either way. Raises ServerError, or ClientDisconnected when the client left (the request was aborted)."""

    async def consume() -> RequestOutput:
        async for out in call.outputs():
            if on_output is not None:
                on_output(out)
        return call.last

    try:
        return await unless_disconnected(consume(), request)
    except (ServerError, ClientDisconnected):
        raise
    except Exception as exc:
        raise as_server_error(exc) from exc
    finally:
        await call.close()


async def _shielded_close(outputs: AsyncGenerator[RequestOutput, None]) -> None:
    with anyio.CancelScope(shield=True):
        await outputs.aclose()


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`, cancelling it (which aborts its engine request) if the client disconnects first;
    then raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        raise RuntimeError("the engine closed the stream before the request finished") from None


def finish_reason_of(out: RequestOutput) -> str:
    """The finish reason of a finished output (responses are built from those only)."""
    if out.finish_reason is None:
        raise RuntimeError(f"request {out.request_id} has not finished")
    return out.finish_reason


def adapter_from_headers(request: Request) -> tuple[str, str] | None:
    """(header name, adapter id) from the `adapter_id` / `X-Adapter-Id` headers, or None; different values
    (in two headers, or one header given twice) are a 400."""
    given = [(name, value) for name in ADAPTER_HEADERS for value in request.headers.getlist(name) if value]
    if len({value for _, value in given}) > 1:
        listed = ", ".join(f"{name}: {brief(value)}" for name, value in given)
        raise ServerError(400, f"conflicting adapter headers ({listed}); give one adapter id", "validation",
                          param="adapter_id")
    return given[0] if given else None


def check_length(num_prompt_tokens: int, max_new_tokens: int, max_seq_len: int, name: str) -> None:
    """A 422 (400 on OpenAI routes) when the answer could not fit in the model's context."""
    if num_prompt_tokens + max_new_tokens > max_seq_len:
        raise ServerError(
            422,
            f"the prompt ({num_prompt_tokens} tokens) + {name} ({max_new_tokens}) must be <= "
            f"{max_seq_len} (max_model_len); lower {name} or shorten the prompt",
            "validation", param=name,
        )


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(round(seconds * 1000))
