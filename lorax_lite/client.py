"""Python client for a lorax-lite server: `Client` (sync) and `AsyncClient` (async, with `generate_many`).

    with Client("http://127.0.0.1:8080", api_key="llk_...") as client:
        result = client.generate("The capital of France is", adapter_id="pricing", max_new_tokens=16)
        print(result.generated_text, result.details.generated_tokens)

`generate`/`generate_stream` use the native LoRAX API (parameters under LoRAX's names: max_new_tokens,
temperature, top_k, top_p, repetition_penalty, seed, stop, do_sample, ignore_eos_token, ...); `chat`/
`chat_stream` use the OpenAI API. On a server with API keys, pass `api_key=` (default: `$LORAX_API_KEY`);
it is sent as `Authorization: Bearer KEY` on every request and never shown in messages.

Every failure raises a LoraxLiteError subclass: UnknownAdapterError (404, also an adapter the key may not
use), InvalidRequestError (400/413/422), AuthenticationError (401), PermissionDeniedError (403),
OverloadedError (429; RateLimitError when the key passed a rate limit), ServerUnavailableError (503 or no
answer), RequestTimeoutError (504/408).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
API_KEY_ENV = "LORAX_API_KEY"
Message = dict[str, str]


class LoraxLiteError(Exception):
    """A request failed: `status` is the HTTP status (None for a failure mid-stream or without an
    answer), `error_type` the server's error type, `param` the field to blame when the server names one,
    `retry_after` the seconds the server asked to wait before retrying (None when not said)."""

    def __init__(
        self, message: str, status: int | None = None, error_type: str | None = None, param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after


class UnknownAdapterError(LoraxLiteError):
    """404: the adapter is not registered on the server."""


class InvalidRequestError(LoraxLiteError):
    """400/413/422: a parameter, the prompt or the adapter was refused; the message says what to change."""


class OverloadedError(LoraxLiteError):
    """429: the server's queue is full; retry after `retry_after` seconds (None when not said)."""


class RateLimitError(OverloadedError):
    """429 with error type rate_limited: the API key passed one of its rate limits (requests or tokens per
    minute, concurrent requests); retry after `retry_after` seconds."""


class AuthenticationError(LoraxLiteError):
    """401: the API key is missing, malformed, unknown, revoked or expired; pass `api_key=` or set
    LORAX_API_KEY."""


class PermissionDeniedError(LoraxLiteError):
    """403: the API key may not do this (the base model without an adapter, or an admin route with a user
    key)."""


class ServerUnavailableError(LoraxLiteError):
    """503, or no answer at all: the server cannot be reached, its engine is not running, it is shutting down,
    its adapter registry is unreachable, or the adapter's stored files are damaged; retry (after
    `retry_after` seconds when said), on another replica if you have one."""


class RequestTimeoutError(LoraxLiteError):
    """504: the request passed its timeout before its first token (or 408: the body was sent too slowly)."""


_BY_STATUS: dict[int, type[LoraxLiteError]] = {
    404: UnknownAdapterError, 400: InvalidRequestError, 413: InvalidRequestError, 422: InvalidRequestError,
    401: AuthenticationError, 403: PermissionDeniedError, 429: OverloadedError, 503: ServerUnavailableError,
    408: RequestTimeoutError, 504: RequestTimeoutError}
# Native bodies name the type in `error_type`, OpenAI bodies in `code` (invalid_api_key for a 401).
_BY_ERROR_TYPE: dict[str, type[LoraxLiteError]] = {
    "not_found": UnknownAdapterError, "validation": InvalidRequestError, "adapter": InvalidRequestError,
    "payload_too_large": InvalidRequestError, "overloaded": OverloadedError, "rate_limited": RateLimitError,
    "unauthorized": AuthenticationError, "invalid_api_key": AuthenticationError, "forbidden": PermissionDeniedError,
    "unavailable": ServerUnavailableError, "registry_unavailable": ServerUnavailableError,
    "adapter_unavailable": ServerUnavailableError, "shutting_down": ServerUnavailableError,
    "timeout": RequestTimeoutError}


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class Details:
    """finish_reason is "length", "eos_token", "stop_sequence" or "timeout"; `tokens` is empty in stream details."""

    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    generated_text: str
    details: Details


@dataclass(frozen=True)
class StreamItem:
    """One generated token; the last item also carries `generated_text` and `details`."""

    token: Token
    generated_text: str | None = None
    details: Details | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # prompt tokens the server's prefix cache held (usage.prompt_tokens_details)

    @classmethod
    def from_json(cls, data: dict) -> Usage:
        """From an OpenAI `usage` object; fields this client does not know are ignored."""
        details = data.get("prompt_tokens_details") or {}
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"],
                   int(details.get("cached_tokens") or 0))


@dataclass(frozen=True)
class ChatResult:
    """finish_reason is "stop" (end of turn or a stop sequence), "length" or "timeout"."""

    content: str
    finish_reason: str
    usage: Usage


class Client:
    """Blocking client; `api_key` (None: `$LORAX_API_KEY`; empty or unset: none) is sent as a bearer token;
    `transport` replaces httpx's network transport (tests, proxies)."""

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0, headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None, api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=_with_api_key(headers, api_key), transport=transport
        )
        self._base_model: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(self, prompt: str, adapter_id: str | None = None, **params: Any) -> GenerateResult:
        """Generate for `prompt` with the adapter (None: the base model); `params` are LoRAX's parameters."""
        return _generate_result(self._post("/generate", _generate_body(prompt, params), adapter_id))

    def generate_stream(self, prompt: str, adapter_id: str | None = None, **params: Any) -> Iterator[StreamItem]:
        """Like `generate`, one StreamItem per token as it is generated."""
        for event in self._post_stream("/generate_stream", _generate_body(prompt, params), adapter_id):
            yield _stream_item(event)

    def chat(
        self, messages: list[Message], adapter_id: str | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        """Answer a conversation ([{"role", "content"}, ...]) through /v1/chat/completions (OpenAI defaults:
        temperature 1; pass temperature=0 for greedy)."""
        body = _chat_body(self._model(adapter_id), messages, max_tokens, temperature, top_p, seed, stop)
        return _chat_result(self._post("/v1/chat/completions", body))

    def chat_stream(
        self, messages: list[Message], adapter_id: str | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        """Like `chat`, yielding the answer's text as it is generated."""
        body = _chat_body(self._model(adapter_id), messages, max_tokens, temperature, top_p, seed, stop, stream=True)
        for event in self._post_stream("/v1/chat/completions", body):
            if delta := _chat_delta(event):
                yield delta

    def health(self) -> bool:
        """True when the server answers and its engine runs."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> list[str]:
        """The served base model's name, then every adapter id."""
        with _transport_errors(self.base_url):
            response = self._http.get("/v1/models")
        return [card["id"] for card in _json_or_raise(response)["data"]]

    def _model(self, adapter_id: str | None) -> str:
        if adapter_id:
            return adapter_id
        if self._base_model is None:
            self._base_model = self.models()[0]
        return self._base_model

    def _post(self, path: str, body: dict, adapter_id: str | None = None) -> dict:
        with _transport_errors(self.base_url):
            response = self._http.post(path, json=body, headers=_adapter_header(adapter_id))
        return _json_or_raise(response)

    def _post_stream(self, path: str, body: dict, adapter_id: str | None = None) -> Iterator[dict]:
        with _transport_errors(self.base_url), self._http.stream(
            "POST", path, json=body, headers=_adapter_header(adapter_id)
        ) as response:
            if response.is_error:
                response.read()
                raise _response_error(response)
            for line in response.iter_lines():
                if (event := _sse_event(line)) is not None:
                    yield event


class AsyncClient:
    """Async client; `api_key` as in Client; `transport` replaces httpx's network transport (e.g.
    httpx.ASGITransport(app=app))."""

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0, headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None, api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # No pool limit: generate_many's semaphore bounds the connections, and a pool wait would time out.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=_with_api_key(headers, api_key), transport=transport,
            limits=limits,
        )
        self._base_model: str | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, prompt: str, adapter_id: str | None = None, **params: Any) -> GenerateResult:
        """Generate for `prompt` with the adapter (None: the base model); `params` are LoRAX's parameters."""
        return _generate_result(await self._post("/generate", _generate_body(prompt, params), adapter_id))

    async def generate_stream(
        self, prompt: str, adapter_id: str | None = None, **params: Any
    ) -> AsyncIterator[StreamItem]:
        """Like `generate`, one StreamItem per token as it is generated."""
        async for event in self._post_stream("/generate_stream", _generate_body(prompt, params), adapter_id):
            yield _stream_item(event)

    async def generate_many(
        self, prompts: Sequence[str], adapter_id: str | None | Sequence[str | None] = None, concurrency: int = 16,
        return_exceptions: bool = False, **params: Any,
    ) -> list[GenerateResult | BaseException]:
        """Generate for every prompt with at most `concurrency` requests in flight; results in prompt order.

        `adapter_id`: one for all prompts, or one per prompt (None: the base model). As in asyncio.gather,
        the first failure raises (and the requests still running are cancelled) unless `return_exceptions`,
        which puts each failure in its prompt's place instead.
        """
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        adapter_ids = _per_prompt(adapter_id, len(prompts))
        semaphore = asyncio.Semaphore(concurrency)

        async def generate_one(prompt: str, adapter: str | None) -> GenerateResult:
            async with semaphore:
                return await self.generate(prompt, adapter, **params)

        tasks = [asyncio.ensure_future(generate_one(p, a)) for p, a in zip(prompts, adapter_ids, strict=True)]
        try:
            return await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        finally:
            for task in tasks:
                task.cancel()

    async def chat(
        self, messages: list[Message], adapter_id: str | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        """Answer a conversation through /v1/chat/completions (OpenAI defaults: temperature 1)."""
        body = _chat_body(await self._model(adapter_id), messages, max_tokens, temperature, top_p, seed, stop)
        return _chat_result(await self._post("/v1/chat/completions", body))

    async def chat_stream(
        self, messages: list[Message], adapter_id: str | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Like `chat`, yielding the answer's text as it is generated."""
        body = _chat_body(
            await self._model(adapter_id), messages, max_tokens, temperature, top_p, seed, stop, stream=True
        )
        async for event in self._post_stream("/v1/chat/completions", body):
            if delta := _chat_delta(event):
                yield delta

    async def health(self) -> bool:
        """True when the server answers and its engine runs."""
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def models(self) -> list[str]:
        """The served base model's name, then every adapter id."""
        with _transport_errors(self.base_url):
            response = await self._http.get("/v1/models")
        return [card["id"] for card in _json_or_raise(response)["data"]]

    async def _model(self, adapter_id: str | None) -> str:
        if adapter_id:
            return adapter_id
        if self._base_model is None:
            self._base_model = (await self.models())[0]
        return self._base_model

    async def _post(self, path: str, body: dict, adapter_id: str | None = None) -> dict:
        with _transport_errors(self.base_url):
            response = await self._http.post(path, json=body, headers=_adapter_header(adapter_id))
        return _json_or_raise(response)

    async def _post_stream(self, path: str, body: dict, adapter_id: str | None = None) -> AsyncIterator[dict]:
        with _transport_errors(self.base_url):
            async with self._http.stream("POST", path, json=body, headers=_adapter_header(adapter_id)) as response:
                if response.is_error:
                    await response.aread()
                    raise _response_error(response)
                async for line in response.aiter_lines():
                    if (event := _sse_event(line)) is not None:
                        yield event


def _with_api_key(headers: dict[str, str] | None, api_key: str | None) -> dict[str, str] | None:
    """`headers` plus `Authorization: Bearer KEY` when there is a key (`api_key`, else `$LORAX_API_KEY`)."""
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    return {**(headers or {}), "Authorization": f"Bearer {key}"} if key else headers


def _generate_body(prompt: str, params: dict[str, Any]) -> dict:
    # details always: results carry token counts and the finish reason.
    parameters = {name: value for name, value in params.items() if value is not None}
    return {"inputs": prompt, "parameters": {**parameters, "details": True}}


def _adapter_header(adapter_id: str | None) -> dict[str, str]:
    return {"adapter_id": adapter_id} if adapter_id else {}


def _chat_body(
    model: str, messages: list[Message], max_tokens: int | None, temperature: float | None, top_p: float | None,
    seed: int | None, stop: list[str] | None, stream: bool = False,
) -> dict:
    options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}
    body = {
        "model": model, "messages": messages, **{name: value for name, value in options.items() if value is not None}
    }
    return {**body, "stream": True} if stream else body


def _per_prompt(adapter_id: str | None | Sequence[str | None], num_prompts: int) -> list[str | None]:
    if adapter_id is None or isinstance(adapter_id, str):
        return [adapter_id] * num_prompts
    if len(adapter_id) != num_prompts:
        raise ValueError(
            f"adapter_id: got {len(adapter_id)} adapter ids for {num_prompts} prompts; give one, or one per prompt"
        )
    return list(adapter_id)


def _token(data: dict) -> Token:
    return Token(id=data["id"], text=data["text"], logprob=data["logprob"], special=data["special"])


def _details(data: dict) -> Details:
    tokens = tuple(_token(t) for t in data.get("tokens", ()))
    return Details(data["finish_reason"], data["prompt_tokens"], data["generated_tokens"], data.get("seed"), tokens)


def _generate_result(data: dict) -> GenerateResult:
    return GenerateResult(generated_text=data["generated_text"], details=_details(data["details"]))


def _stream_item(event: dict) -> StreamItem:
    details = event.get("details")
    return StreamItem(_token(event["token"]), event.get("generated_text"), _details(details) if details else None)


def _chat_result(data: dict) -> ChatResult:
    choice = data["choices"][0]
    return ChatResult(choice["message"]["content"] or "", choice["finish_reason"], Usage.from_json(data["usage"]))


def _chat_delta(event: dict) -> str:
    """The text a chat chunk adds ("" for the role chunk, the finish chunk and the usage chunk)."""
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def _sse_event(line: str) -> dict | None:
    """The JSON of a `data:` line (None for other lines and for `[DONE]`); an error event raises."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return None
    event = json.loads(payload)
    if "error" in event:
        raise _error(event, status=None)
    return event


def _json_or_raise(response: httpx.Response) -> dict:
    if response.is_success:
        return response.json()
    raise _response_error(response)


def _response_error(response: httpx.Response) -> LoraxLiteError:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:500] or response.reason_phrase}
    retry_after = response.headers.get("retry-after", "")  # seconds; an HTTP date is not parsed
    return _error(body, response.status_code, float(retry_after) if retry_after.isdigit() else None)


def _error(body: Any, status: int | None, retry_after: float | None = None) -> LoraxLiteError:
    """The exception for an error body: native `{"error", "error_type"}` or OpenAI's `{"error": {...}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI's body: the server's error type is in `code`
        message, error_type, param = (
            error.get("message", ""), error.get("code") or error.get("type"), error.get("param")
        )
    elif error is not None:
        message, error_type, param = str(error), body.get("error_type"), None
    else:  # not a lorax-lite body (a proxy's page, FastAPI's own 404, ...)
        message, error_type, param = str(body.get("detail", body) if isinstance(body, dict) else body), None, None
    by_status = _BY_STATUS.get(status) if status is not None else None
    by_type = _BY_ERROR_TYPE.get(error_type) if error_type else None
    cls = by_status or by_type or LoraxLiteError
    if by_status and by_type and issubclass(by_type, by_status):  # a 429 that names a rate limit
        cls = by_type
    if cls is UnknownAdapterError and error_type != "not_found":  # a route, not an adapter, is missing: a wrong URL
        cls = LoraxLiteError
    prefix = f"HTTP {status}: " if status else ""
    return cls(prefix + message, status, error_type, param, retry_after=retry_after)


@contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    """Turn httpx's network failures into ServerUnavailableError."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise ServerUnavailableError(f"cannot reach the lorax-lite server at {base_url}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise ServerUnavailableError(
            f"the lorax-lite server at {base_url} did not answer in time ({type(exc).__name__}): {exc}"
        ) from exc
    except httpx.TransportError as exc:
        raise ServerUnavailableError(
            f"lost the connection to the lorax-lite server at {base_url} ({type(exc).__name__}): {exc}"
        ) from exc
