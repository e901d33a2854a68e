"""A real `redis-server` for tests: started on a free loopback port in a temp dir, stopped after.

`make install` installs redis-server (apt-get). Without it the Redis tests are skipped, except
under `make test` / CI (LORAX_REQUIRE_REDIS=1), where a missing server is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0


class RedisServer:
    """One `redis-server` process: no persistence, bound to 127.0.0.1 on a free port."""

    def __init__(self, executable: str = "redis-server") -> None:
        self.executable = executable
        self.port = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 3) -> RedisServer:
        """Start and wait until it answers PING; a port taken in between is retried with another."""
        self._dir = tempfile.TemporaryDirectory(prefix="lorax-redis-")
        for _ in range(attempts):
            self.port = _free_port()
            self._process = self._spawn(Path(self._dir.name))
            if self._wait_ready():
                return self
            self._process.wait()
        log = (Path(self._dir.name) / "redis.log").read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"redis-server did not start: {log[-2000:]}")

    def stop(self) -> None:
        self.resume()  # a stopped process would ignore the SIGTERM
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung registry)."""
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the registry is gone (connections refused)."""
        self._process.kill()
        self._process.wait()

    def restart(self) -> None:
        """A new, empty redis-server on the same port (nothing persisted: adapters must be registered again)."""
        self._process = self._spawn(Path(self._dir.name))
        assert self._wait_ready()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, workdir: Path) -> subprocess.Popen:
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir)]
        log = open(workdir / "redis.log", "ab")
        with log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _wait_ready(self) -> bool:
        """True once the server answers PING; False if it exited (port taken) or never answered."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        if self._process.poll() is None:
            self._process.kill()
        return False


@contextmanager
def redis_server_or_skip() -> Iterator[RedisServer]:
    """A running RedisServer for a fixture to yield; skips (or fails under LORAX_REQUIRE_REDIS=1) without one."""
    executable = shutil.which("redis-server")
    if executable is None:
        message = "redis-server is not installed (`make install` installs it with apt-get)"
        if os.environ.get("LORAX_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with RedisServer(executable) as server:
        yield server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
