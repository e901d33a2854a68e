"""`lorax-lite serve` starts the HTTP server on a model and a registry; a real client reaches it over TCP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_llama_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tiny_llama_dir), "--port", str(port),
           "--registry", f"sqlite:///{tmp_path / 'registry.db'}", "--served-model-name", "tiny", "--dtype", "float32",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):  # up to a minute for imports and model load
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not become healthy")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_serve_answers_health_info_and_generate(server):
    info = httpx.get(f"{server}/info").json()
    assert info["model_id"] == "tiny"
    resp = httpx.post(f"{server}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["details"]["generated_tokens"] >= 1
    unknown = httpx.post(f"{server}/generate", json={"inputs": "Hello"}, headers={"adapter_id": "nope"}, timeout=30)
    assert unknown.status_code == 404


def test_serve_refuses_bad_options_with_exit_code_2(tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port" in result.stderr
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tmp_path / "missing"), "--registry",
           f"sqlite:///{tmp_path / 'r.db'}", "--port", str(free_port())]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
