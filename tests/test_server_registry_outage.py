"""A real `lorax-lite serve` on a Redis registry that is paused (SIGSTOP), killed and brought back.

Before: base-model streams stalled for seconds, /health took 6 s, adapters in memory failed, /v1/models and
the chat pages answered plain-text 500s, native routes leaked the registry URL, and an unknown adapter was a
500. Now: nothing waits on the registry but the lookups that need it, adapters already resolved keep being
served, unknown ids get a URL-free 503 with Retry-After, /ready reports the registry, and the server
recovers by itself. Time bounds are generous: they tell a deadline from a hang.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from lora_helpers import make_versions
from redis_server import RedisServer, redis_server_or_skip
from server_helpers import serve_process

from lorax_lite.registry import admin
from lorax_lite.registry.redis import RedisRegistry
from lorax_lite.registry.store import AdapterStore

BASE = "tiny-llama"
STALL = 1.5  # seconds: a gap this long between two stream events, or a probe this slow, waited on the registry


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server_or_skip() as server:
        yield server


@pytest.fixture
def server(redis: RedisServer, tiny_llama_dir: Path, tmp_path: Path) -> Iterator[str]:
    """The tiny model served on the Redis registry, with "pricing" and "late" registered."""
    sources = make_versions(tiny_llama_dir, tmp_path / "sources", 2)
    registry, store = RedisRegistry(redis.url), AdapterStore(tmp_path / "store")
    admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)
    admin.register(registry, store, "late", sources["v2"], tiny_llama_dir)
    registry.close()
    args = ["--model", str(tiny_llama_dir), "--registry", redis.url, "--store", str(tmp_path / "store"),
            "--served-model-name", BASE, "--dtype", "float32", "--device", "cpu", "--max-model-len", "512"]
    with serve_process(*args) as server:
        yield server.url


def generate(base: str, adapter: str | None = None, **kw) -> httpx.Response:
    headers = {"adapter_id": adapter} if adapter else {}
    body = {"inputs": "The price is", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}
    return httpx.post(f"{base}/generate", json=body, headers=headers, timeout=30, **kw)


def largest_stream_gap(base: str) -> float:
    """Seconds of the longest wait between two events of a 200-token base-model stream."""
    body = {"inputs": "Count on", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    gaps, last = [0.0], time.monotonic()
    with httpx.stream("POST", f"{base}/generate_stream", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                assert "error" not in json.loads(line[5:])
                now = time.monotonic()
                gaps.append(now - last)
                last = now
    return max(gaps[2:])  # after the first token (the prefill)


def timed_get(url: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = httpx.get(url, timeout=30)
    return resp, time.monotonic() - start


def assert_unavailable(resp: httpx.Response, redis: RedisServer) -> None:
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["retry-after"]) >= 1 and resp.headers["content-type"] == "application/json"
    for secret in (redis.url, "redis://", str(redis.port)):
        assert secret not in resp.text


def wait_ready(base: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while httpx.get(f"{base}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the server did not become ready again"
        time.sleep(0.2)


def check_outage(base: str, redis: RedisServer, served: str) -> None:
    """What every route does while the registry does not answer."""
    with ThreadPoolExecutor(4) as pool:
        gap = pool.submit(largest_stream_gap, base)
        lookups = [pool.submit(generate, base, adapter) for adapter in ("late", "never-registered")]
        health, health_seconds = timed_get(f"{base}/health")
        assert health.status_code == 200 and health_seconds < STALL
        for lookup in lookups:  # not in the cache: the registry cannot say whether they exist
            assert_unavailable(lookup.result(), redis)
            assert lookup.result().json()["error_type"] == "registry_unavailable"
        assert gap.result() < STALL
    resp = generate(base, "pricing")  # resolved before the outage: served from the record cache
    assert resp.status_code == 200 and resp.json()["generated_text"] == served
    chat = {"model": "pricing", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30).status_code == 200
    unknown = httpx.post(f"{base}/v1/chat/completions", json={**chat, "model": "nope"}, timeout=30)
    assert_unavailable(unknown, redis)
    assert unknown.json()["error"]["type"] == "service_unavailable"
    models = httpx.get(f"{base}/v1/models", timeout=30)
    assert_unavailable(models, redis)
    assert models.json()["error"]["code"] == "registry_unavailable"
    assert_unavailable(httpx.get(f"{base}/chat", timeout=30), redis)
    assert httpx.get(f"{base}/chat/pricing", timeout=30).status_code == 200
    ready, seconds = timed_get(f"{base}/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["registry"] != "ok" and seconds < STALL
    assert str(redis.port) not in ready.text


def test_a_paused_registry_stalls_nothing_and_the_server_recovers(server, redis):
    served = generate(server, "pricing").json()["generated_text"]
    redis.pause()
    check_outage(server, redis, served)
    redis.resume()
    wait_ready(server)
    assert generate(server, "late").status_code == 200


def test_a_killed_registry_keeps_resolved_adapters_serving_and_a_new_one_is_picked_up(server, redis):
    served = generate(server, "pricing").json()["generated_text"]
    redis.kill()
    check_outage(server, redis, served)
    redis.restart()  # empty: nothing is registered there
    wait_ready(server)
    assert generate(server, "never-registered").status_code == 404  # the registry answers again: unknown
