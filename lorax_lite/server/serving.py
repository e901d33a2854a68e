"""Running the app under uvicorn the way a production server must: connections capped and timed, a graceful
drain on SIGTERM, and an exit code a supervisor can act on.

- Connections: at most `max_connections` open at once (the next one gets a JSON 503 and is closed); a
  connection that does not complete a request's headers within `header_timeout` is closed (uvicorn has no
  such timer: a client sending half a request line would hold its connection forever).
- SIGTERM (or SIGINT): the server drains. `/ready` turns 503 at once and new generation requests get a 503
  with Retry-After, while the requests in flight finish; the process exits when they are done or after
  `shutdown_timeout` seconds, whichever comes first, stopping what is left (its client is told the server
  is shutting down). A second signal exits at once.
- If the engine thread dies, the server exits with status 1 (`/health` says 503 meanwhile), so a supervisor
  restarts it; a clean drain exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from lorax_lite.config import ServerLimits
from lorax_lite.server.errors import RETRY_AFTER_SECONDS
from lorax_lite.server.state import ServerState

logger = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 2.0  # after stopping the requests left at the deadline: time for their last bytes to go out
EXIT_ENGINE_DIED = 1


def _overloaded_response() -> bytes:
    body = json.dumps({"error": "the server has too many open connections (max_connections); retry later",
                       "error_type": "overloaded"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: {RETRY_AFTER_SECONDS}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_protocol(state: ServerState) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header timeout from `state.limits`."""
    limits = state.limits
    overloaded = _overloaded_response()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                state.metrics.refused_connections.inc()
                self.transport.write(overloaded)
                self.transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection gets the same deadline

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._on_header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                state.metrics.timed_out_connections.inc()
                self.transport.close()

    return GuardedH11Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the drain on the first SIGTERM/SIGINT and an exit when the engine dies."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.engine_died = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._watch_engine())
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain; a second one: exit now."""
        if self.state.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        self.state.draining = True  # /ready says 503 from now on, and new generation requests are refused
        self._loop.call_soon_threadsafe(self._spawn, self.drain())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the requests in flight, up to shutdown_timeout; stop what is left; then exit."""
        state = self.state
        state.draining = True
        timeout = state.limits.shutdown_timeout
        logger.info("draining: %d requests in flight; exiting when they finish or in %g s", state.num_in_flight,
                    timeout)
        deadline = time.monotonic() + timeout
        while state.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.num_in_flight:
            logger.warning("shutdown_timeout passed: stopping %d requests", len(state.calls))
            await state.stop_calls()
            grace = time.monotonic() + STOP_GRACE_S
            while state.num_in_flight and time.monotonic() < grace:
                await asyncio.sleep(0.05)
        self.should_exit = True

    async def _watch_engine(self) -> None:
        while not self.should_exit:
            if not self.state.llm.is_running:
                logger.error("the engine stopped: the server exits with status %d so it can be restarted",
                             EXIT_ENGINE_DIED)
                self.engine_died = True
                self.should_exit = True
                return
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> int:
    """Serve `app` (from `create_app`) until SIGTERM/SIGINT or the engine's death; returns the exit status."""
    state: ServerState = app.state.server
    limits: ServerLimits = state.limits
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=guarded_protocol(state),
        timeout_graceful_shutdown=int(STOP_GRACE_S),  # after the drain: connections still open are cut
    )
    server = DrainingServer(config, state)
    server.run()
    if server.engine_died:
        return EXIT_ENGINE_DIED
    logger.info("stopped (max %g s drain)", limits.shutdown_timeout)
    return 0


__all__ = ["DrainingServer", "guarded_protocol", "run_server"]
