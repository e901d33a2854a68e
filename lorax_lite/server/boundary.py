"""The ASGI middleware every HTTP request passes first: a request id, the body read (size limit, deadline),
the drain's refusals, the count of requests in flight, and the last line of defence: an exception no route
handled becomes a JSON 500 in the route family's format, counted and logged with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorax_lite.server.errors import OPENAI_PATH_PREFIX, REQUEST_ID, RETRY_AFTER_SECONDS, ServerError, cut
from lorax_lite.server.state import ServerState

logger = logging.getLogger(__name__)

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PROBES = frozenset({"/health", "/ready", "/metrics"})  # never counted in flight: a drain does not wait for them
GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})


class BoundaryMiddleware:
    """Wraps the app: each response carries `x-request-id` (the client's, if it sent a sane one); bodies over
    max_body_bytes get a 413 (by Content-Length before reading, else once the read passes the limit); a body
    that does not arrive within body_timeout gets a 408; while draining, generation requests get a 503;
    error statuses are counted by status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)
        openai = scope["path"].startswith(OPENAI_PATH_PREFIX)
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
                if message["status"] >= 400:
                    self.state.metrics.observe_error_status(message["status"])
            await send(message)

        async def refuse(error: ServerError) -> None:
            await error.to_response(openai)(scope, receive, guarded_send)

        if self.state.draining and scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES:
            await refuse(ServerError(503, "the server is shutting down and takes no new requests; retry (another "
                                     "replica will answer)", "shutting_down",
                                     headers={"Retry-After": str(RETRY_AFTER_SECONDS)}))
            return
        body = await self._read_body(scope, receive)
        if isinstance(body, ServerError):
            await refuse(body)
            return
        if body is None:
            return  # the client left while sending
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        probe = scope["path"] in PROBES
        self.state.num_in_flight += not probe
        try:
            await self.app(scope, replay_receive, guarded_send)
        except Exception:
            self.state.metrics.unhandled.inc()
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], cut(scope["path"]),
                             request_id)
            if not started:  # else the response is under way: the server closes the connection
                await refuse(ServerError(500, f"internal server error (request id {request_id}); the server log "
                                         "has the details", "internal"))
        finally:
            self.state.num_in_flight -= not probe

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | ServerError | None:
        """The body; a ServerError (413 too large, 408 too slow); None if the client left while sending."""
        limits = self.state.limits
        too_large = ServerError(413, f"the request body is larger than the limit of {limits.max_body_bytes} bytes",
                                "payload_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            return too_large
        try:
            body = await asyncio.wait_for(_read_body(receive, limits.max_body_bytes), limits.body_timeout)
        except asyncio.TimeoutError:
            self.state.metrics.timed_out_connections.inc()
            return ServerError(408, f"the request body did not arrive within {limits.body_timeout:g} s "
                               "(body_timeout)", "request_timeout")
        if body is _TOO_LARGE:
            return too_large
        return None if body is _CLIENT_GONE else body  # type: ignore[return-value]


_CLIENT_GONE = object()  # _read_body: the client left while sending
_TOO_LARGE = object()  # _read_body: the body passed the limit


async def _read_body(receive: Receive, limit: int) -> bytes | object:
    """The whole body, _TOO_LARGE once it passes `limit` bytes, or _CLIENT_GONE if the client left while sending."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _CLIENT_GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _request_id(scope: Scope) -> str:
    """The client's `x-request-id` when it is a short plain token, else a new one."""
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
