"""A real `lorax-lite serve` under a bad day: poison sampling values beside streaming bystanders, slow and
stalled clients, too many connections, huge prompts, SIGTERM with streams in flight, and an engine that
dies. Each test fails on the server before the fault-isolation work (see docs/reliability.md)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from lora_helpers import register_adapters
from server_helpers import call, serve_process

from lorax_lite import AsyncLLM
from lorax_lite.config import ServerLimits
from lorax_lite.server import create_app
from lorax_lite.server.serving import DrainingServer, guarded_protocol

BASE = "tiny-llama"
ADAPTERS = ("pricing", "supply", "legal")


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`serve` arguments for the tiny model with three registered adapters."""
    root = tmp_path_factory.mktemp("lifecycle")
    return [*register_adapters(tiny_llama_dir, root, ADAPTERS, first_seed=10), "--served-model-name", BASE,
            "--dtype", "float32", "--device", "cpu",
            "--max-model-len", "512", "--max-num-batched-tokens", "128"]


def stream_tokens(client: httpx.Client, base: str, adapter: str | None, prompt: str, n: int, **params) -> list[int]:
    """Greedy token ids of a /generate_stream answer; fails on an error event."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "ignore_eos_token": True, **params}}
    headers = {"adapter_id": adapter} if adapter else {}
    tokens = []
    with client.stream("POST", f"{base}/generate_stream", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                tokens.append(event["token"]["id"])
    return tokens


# ---- one request cannot poison the batch ---------------------------------------------------------

POISON = [  # inside the ranges the API accepted, but overflowing or vanishing in float32
    {"do_sample": True, "temperature": 1e-300},
    {"do_sample": True, "temperature": 1e-39},
    {"do_sample": True, "top_p": 1e-300},
    {"do_sample": True, "repetition_penalty": 1e-300},
    {"do_sample": True, "repetition_penalty": 1e300},
]


def test_poison_sampling_values_never_disturb_streaming_bystanders(deployment):
    bystanders = [(adapter, f"Bystander {i} asks about the price.") for i, adapter in enumerate([*ADAPTERS, None])]
    with serve_process(*deployment) as server, httpx.Client() as client:
        base = server.url
        solo = {key: stream_tokens(client, base, *key, n=48) for key in bystanders}
        with ThreadPoolExecutor(len(bystanders) + len(POISON)) as pool:
            streams = {key: pool.submit(stream_tokens, httpx.Client(), base, *key, n=48) for key in bystanders}
            time.sleep(0.2)  # the bystanders are streaming: the poison lands in their batches
            poisoned = [pool.submit(client.post, f"{base}/generate", timeout=60, headers={"adapter_id": adapter},
                                    json={"inputs": "Poison", "parameters": {"max_new_tokens": 16, **params}})
                        for adapter, params in zip([*ADAPTERS, *ADAPTERS], POISON, strict=False)]
            answers = [f.result() for f in poisoned]
            together = {key: f.result() for key, f in streams.items()}
        assert together == solo
        for params, resp in zip(POISON, answers, strict=True):
            assert resp.status_code in (200, 422), (params, resp.status_code, resp.text)  # served, or refused
        assert client.get(f"{base}/health").status_code == 200
        assert "forward pass failed" not in server.log_tail(10**6)


# ---- slow clients, too many clients, huge prompts -------------------------------------------------


def raw_connection(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_and_stalled_clients_are_timed_out_and_connections_are_capped(deployment):
    args = [*deployment, "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "6"]
    with serve_process(*args) as server:
        base = server.url
        half_headers = raw_connection(base)
        half_headers.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-")  # and never more
        half_body = raw_connection(base)
        half_body.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        start = time.monotonic()
        assert read_all(half_headers) == b""  # closed by the server
        response = read_all(half_body)
        assert time.monotonic() - start < 8
        assert response.startswith(b"HTTP/1.1 408") and b'"error_type":"request_timeout"' in response.replace(b" ", b"")
        idle = [raw_connection(base) for _ in range(6)]
        refused = read_all(raw_connection(base))
        assert refused.startswith(b"HTTP/1.1 503") and b"max_connections" in refused
        for sock in (half_headers, half_body, *idle):
            sock.close()
        time.sleep(0.5)
        metrics = httpx.get(f"{base}/metrics").text
        assert "lorax_refused_connections_total 1.0" in metrics
        assert httpx.get(f"{base}/health").status_code == 200


def test_huge_prompts_are_refused_without_stalling_the_server(deployment):
    huge = "word " * 180_000  # 900 KB: under the body limit, far over max_prompt_chars
    with serve_process(*deployment) as server, ThreadPoolExecutor(8) as pool:
        base = server.url
        refusals = [pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                                json={"model": BASE, "prompt": huge, "max_tokens": 4}) for _ in range(4)]
        slowest_health = 0.0
        while not all(f.done() for f in refusals):
            start = time.monotonic()
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
            slowest_health = max(slowest_health, time.monotonic() - start)
        for f in refusals:
            assert f.result().status_code == 400 and "max_prompt_chars" in f.result().json()["error"]["message"]
        assert slowest_health < 1.0  # was 2.5 s: the prompts were tokenized on the event loop


# ---- SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_lets_streams_finish_refuses_new_requests_and_exits(deployment):
    with serve_process(*deployment, "--shutdown-timeout", "30") as server, ThreadPoolExecutor(4) as pool:
        base, proc = server.url, server.proc
        streams = [pool.submit(stream_tokens, httpx.Client(), base, adapter, "Long answer please", 400)
                   for adapter in ("pricing", None)]
        stalled = raw_connection(base)  # a client that never finishes its body
        stalled.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{base}/generate", json={"inputs": "new", "parameters": {"max_new_tokens": 2}})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error_type"] == "shutting_down"
        assert httpx.get(f"{base}/ready").status_code == 503
        assert httpx.get(f"{base}/health").status_code == 200  # alive: it is finishing its work
        assert [len(f.result()) for f in streams] == [400, 400]
        stopped = time.monotonic()
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - stopped < 10
        stalled.close()


def test_requests_left_at_the_shutdown_deadline_are_stopped_with_a_clear_reason(deployment):
    with serve_process(*deployment, "--shutdown-timeout", "0") as server:  # stop everything at once
        base, proc = server.url, server.proc
        body = {"inputs": "Go on", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
        with httpx.stream("POST", f"{base}/generate_stream", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert events[-1]["error_type"] == "shutting_down" and "retry" in events[-1]["error"]
        assert len(events) < 480
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 2 + 3  # the grace for last bytes, and slack


# ---- the engine dies ------------------------------------------------------------------------------


def test_when_the_engine_dies_health_says_503_and_the_server_exits_with_status_1(tiny_llama_dir):
    llm = AsyncLLM(str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=128)
    app = create_app(llm, BASE, ServerLimits())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", http=guarded_protocol(app.state.server))
    server = DrainingServer(config, app.state.server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{base}/health").status_code == 200

    def crash() -> bool:
        raise RuntimeError("a bug in the engine loop")

    llm.engine.has_unfinished_requests = crash  # the loop's next turn raises: the engine thread dies
    llm._wakeup.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and server.engine_died
    assert call(app, "GET", "/health").status_code == 503
    sock.close()
    llm.shutdown()
