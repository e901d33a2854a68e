"""Joining a Ray cluster, as Compose does: `ray start --head` (token authentication, the proxy's callback set in
its environment), then `lorax-lite serve --ray-address HOST:PORT` deploys onto it. Requests through Ray Serve's
proxy are routed by adapter; SIGTERM deletes the application and serve exits 0. A head started without the
callback still serves, unrouted, and serve warns about it.

Each head runs in its own temp dir with its own random token; teardown kills exactly the processes that carry
that token in their environment (`ray stop` would stop every Ray cluster on the machine, other tests' too).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port, serve_process
from test_server_tenants import (
    PROMPT,
    Deployment,
    make_deployment,
    sources,  # noqa: F401 (a fixture: the units' random adapters)
)

from lorax_lite.cluster.routing import PROXY_CALLBACK, PROXY_CALLBACK_ENV

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra `lorax-lite[cluster]` (make install has it)")

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_START_TIMEOUT_S = 120
SERVE_START_TIMEOUT_S = 240


@contextmanager
def ray_head(log: Path, routing: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`ray start --head` on a free port with token authentication (and the proxy's callback if `routing`); the
    same environment is set in this process for `serve` to inherit. Yields the head's address."""
    token = secrets.token_hex(16)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    if routing:
        monkeypatch.setenv(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    else:
        monkeypatch.delenv(PROXY_CALLBACK_ENV, raising=False)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
           "--disable-usage-stats", "--temp-dir", temp_dir]
    try:
        with open(log, "w") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=HEAD_START_TIMEOUT_S)
        assert done.returncode == 0, log.read_text()[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        _kill_processes_with(f"RAY_AUTH_TOKEN={token}".encode())
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_processes_with(marker: bytes) -> None:
    """SIGKILL every process of ours whose environment holds `marker` (this head's token), and wait them out."""
    def holders() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:  # gone, or not ours
                    pass
        return pids

    deadline = time.monotonic() + 30
    while pids := holders():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"Ray processes {pids} survive SIGKILL"
        time.sleep(0.2)  # a zombie keeps its environ until reaped: its parent (dead too) hands it to init


@pytest.fixture(scope="module")
def deployment(redis_url: str, sources: dict[str, Path], default_model_dir: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("join")
    return make_deployment(f"{redis_url}?prefix=join-{uuid.uuid4().hex[:8]}", root, sources, default_model_dir)


def join_args(deployment: Deployment, address: str) -> list[str]:
    return [*deployment.serve_args(), "--ray-address", address, "--num-replicas", "1", "--replica-cpus", "1"]


def wait_for_log(server, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in the serve log: {server.log_tail()}"
        time.sleep(0.2)


def generate(url: str, adapter: str) -> httpx.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}}
    return httpx.post(f"{url}/generate", json=body, headers={"adapter_id": adapter}, timeout=120)


def test_serve_joins_a_head_started_with_the_callback(deployment: Deployment, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    with ray_head(tmp_path / "ray.log", True, monkeypatch) as address:
        with serve_process(*join_args(deployment, address), log=tmp_path / "serve.log",
                           startup_timeout=SERVE_START_TIMEOUT_S) as server:
            response = generate(server.url, "pricing")
            assert response.status_code == 200, response.text
            assert response.headers["x-lorax-routed-adapter"] == "pricing" and response.headers["x-replica-id"]
            wait_for_log(server, "(joined)")  # serve says so once the proxy check is done (after /health answers)
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=120) == 0, server.log_tail()
        assert PROXY_CALLBACK_ENV not in server.log.read_text()  # no warning: the proxy routes


def test_a_head_without_the_callback_serves_unrouted_and_serve_warns(deployment: Deployment, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    with ray_head(tmp_path / "ray.log", False, monkeypatch) as address:
        with serve_process(*join_args(deployment, address), log=tmp_path / "serve.log",
                           startup_timeout=SERVE_START_TIMEOUT_S) as server:
            response = generate(server.url, "pricing")
            assert response.status_code == 200, response.text
            assert "x-lorax-routed-adapter" not in response.headers and response.headers["x-replica-id"]
            wait_for_log(server, f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK}", 30)  # once serve has probed the proxy
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=120) == 0, server.log_tail()
