"""Reaching a server in tests: `serve` runs `lorax-lite serve` as a subprocess on a free port until
it is healthy (`serve_process` too, exposing the process and its log); `serve_in_thread` runs an app
with uvicorn in a thread of this process; `call` sends one request to an app in-process through
httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(*args: str, startup_timeout: float = 180.0) -> Iterator[str]:
    """Run `lorax-lite serve ARGS --port P`; yields its base URL; terminates it (and fails loudly if it died)."""
    with serve_process(*args, startup_timeout=startup_timeout) as server:
        yield server.url


@dataclass
class ServerProcess:
    """A running `lorax-lite serve`: its base URL, its Popen, and its log (stdout and stderr) in a file."""

    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-num_chars:]


@contextmanager
def serve_process(*args: str, log: Path | None = None, startup_timeout: float = 180.0) -> Iterator[ServerProcess]:
    """`serve`, yielding a ServerProcess (to signal it, read its pid or its output). Its output goes to the file
    `log` (default: a temporary one), not a pipe, so a long run that logs every request never blocks on a full
    pipe nobody reads."""
    with tempfile.TemporaryDirectory(prefix="lorax-serve-") as scratch:
        log = log or Path(scratch) / "server.log"
        port = free_port()
        cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", *args, "--port", str(port)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
        try:
            _wait_healthy(server, startup_timeout)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(server: ServerProcess, startup_timeout: float) -> None:
    deadline = time.time() + startup_timeout
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}: {server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            server.proc.kill()
            pytest.fail(f"server did not become healthy in {startup_timeout:.0f} s: {server.log_tail()}")
        time.sleep(0.2)


def call(app, method: str, url: str, **kw) -> httpx.Response:
    """One request to the ASGI `app`, in a fresh event loop."""

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, url, **kw)

    return asyncio.run(go())


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """uvicorn serving `app` in a thread, on a socket bound here to a free loopback port; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
