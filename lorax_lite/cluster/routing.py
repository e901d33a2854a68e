"""Adapter-affinity routing in Ray Serve's HTTP proxy: the thin ingress.

Ray Serve routes a request to a replica that already holds its *multiplexed model id* (falling back to the
replica holding the fewest when those are busy), and reads that id from the `serve_multiplexed_model_id`
header. Clients of lorax-lite name their adapter in the LoRAX and OpenAI ways instead, so this ASGI middleware,
running inside Ray's proxy, sets the header from them before the proxy picks a replica:

1. the `adapter_id` or `X-Adapter-Id` header (no body read);
2. else, on the generation routes, the JSON body's `parameters.adapter_id` (native) or `model` (OpenAI).

The body is read once here (up to MAX_PEEK_BYTES, within PEEK_TIMEOUT_S) and replayed to the replica unchanged;
what the proxy cannot read quickly or parse it passes on without an id, and the replica's app gives the answer
it would give anyway (a 4xx, a 408). Ids that are not well-formed adapter ids are never used for routing. The
base model's names are learned from replicas' responses (`x-lorax-base-model`), so base-model requests are
balanced over all replicas instead of being pinned like an adapter.

Install it by setting, on every Ray node before `ray start` (`lorax-lite serve` sets it when it starts Ray):
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=lorax_lite.cluster.routing.proxy_middlewares

This module imports neither torch nor Ray: the proxy process stays light.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorax_lite.lora.naming import ADAPTER_ID_PATTERN

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "lorax_lite.cluster.routing.proxy_middlewares"
MODEL_ID_HEADER = b"serve_multiplexed_model_id"  # Ray Serve's
ADAPTER_HEADERS = (b"adapter_id", b"x-adapter-id")  # lorax-lite's (server/generation.py)
BASE_MODEL_HEADER = b"x-lorax-base-model"  # set by replicas on successful responses
ROUTED_HEADER = b"x-lorax-routed-adapter"  # on the response: the id the proxy routed by ("" for none)
NATIVE_ROUTES = frozenset({"/", "/generate", "/generate_stream"})
OPENAI_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_PEEK_BYTES = 1 << 20  # a generation body larger than this is passed on unread (the replica refuses it)
PEEK_TIMEOUT_S = 10.0
MAX_BASE_NAMES = 16


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(AdapterRoutingMiddleware)]


def adapter_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The adapter a request names in its headers (the first of `adapter_id`, `X-Adapter-Id`), if any."""
    found = {name.lower(): value for name, value in headers if name.lower() in ADAPTER_HEADERS}
    for name in ADAPTER_HEADERS:
        if name in found:
            return found[name].decode("latin-1").strip()
    return None


def adapter_from_body(path: str, body: bytes) -> str | None:
    """The adapter a generation request's JSON body names: `parameters.adapter_id` on the native routes, `model`
    on the OpenAI ones; None when the body is not such JSON."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if path in OPENAI_ROUTES:
        value = data.get("model")
    else:
        parameters = data.get("parameters")
        value = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    return value if isinstance(value, str) else None


def routable(adapter_id: str | None, base_names: Iterable[str]) -> str | None:
    """The id to route by: a well-formed adapter id that is not a base model's name, else None."""
    if adapter_id is None or not ADAPTER_ID_PATTERN.fullmatch(adapter_id) or adapter_id in base_names:
        return None
    return adapter_id


class AdapterRoutingMiddleware:
    """Sets Ray Serve's multiplexed model id from the request's adapter (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.base_names: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        explicit = [value for name, value in scope["headers"] if name.lower() == MODEL_ID_HEADER]
        if explicit:  # the client steers Ray itself: left alone
            await self.app(scope, receive, self._learning(send, explicit[0].decode("latin-1")))
            return
        path = scope["path"]
        named = adapter_from_headers(scope["headers"])
        if named is None and scope["method"] == "POST" and (path in NATIVE_ROUTES or path in OPENAI_ROUTES):
            chunks, complete = await _peek_body(receive)
            if complete:
                named = adapter_from_body(path, b"".join(m.get("body", b"") for m in chunks))
            receive = _replay(chunks, receive)
        adapter_id = routable(named, self.base_names)
        if adapter_id is not None:
            scope = {**scope, "headers": [*scope["headers"], (MODEL_ID_HEADER, adapter_id.encode())]}
        await self.app(scope, receive, self._learning(send, adapter_id or ""))

    def _learning(self, send: Send, routed: str) -> Send:
        """`send`, noting base model names the replicas announce and saying which id the request was routed by."""

        async def learn(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name.lower() == BASE_MODEL_HEADER and len(self.base_names) < MAX_BASE_NAMES:
                        self.base_names.add(value.decode("latin-1"))
                message = {**message, "headers": [*headers, (ROUTED_HEADER, routed.encode())]}
            await send(message)

        return learn


async def _peek_body(receive: Receive) -> tuple[list[Message], bool]:
    """The body messages received (up to MAX_PEEK_BYTES and PEEK_TIMEOUT_S), and whether that was the whole
    body. A disconnect ends the peek; it is replayed like the rest."""
    messages: list[Message] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PEEK_TIMEOUT_S
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return messages, False
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if size > MAX_PEEK_BYTES:  # also when the last chunk takes it over: that body is not parsed
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` first, then reads on."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


__all__ = [
    "PROXY_CALLBACK", "PROXY_CALLBACK_ENV", "AdapterRoutingMiddleware", "adapter_from_body", "adapter_from_headers",
    "proxy_middlewares", "routable",
]
