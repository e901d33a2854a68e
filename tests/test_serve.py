"""`lorax-lite serve` starts the HTTP server on a model and a registry; a real client reaches it over TCP."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from server_helpers import free_port, serve


@pytest.fixture
def server(tiny_llama_dir, tmp_path):
    with serve("--model", str(tiny_llama_dir), "--registry", f"sqlite:///{tmp_path / 'registry.db'}",
               "--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu") as base:
        yield base


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


def test_a_full_queue_answers_429_with_retry_after_and_the_server_stays_healthy(tiny_llama_dir, tmp_path):
    """One sequence at a time and one waiting request allowed: a burst gets some 429s, the rest succeed."""
    args = ("--model", str(tiny_llama_dir), "--registry", f"sqlite:///{tmp_path / 'registry.db'}", "--dtype", "float32",
            "--device", "cpu", "--max-num-seqs", "1", "--max-queued-requests", "1")
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(12)))

    with serve(*args) as base:
        responses = asyncio.run(burst(base))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error_type"] == "overloaded"
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.post(f"{base}/generate", json=body, timeout=120).status_code == 200
