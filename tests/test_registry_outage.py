"""A Redis registry that stops answering (paused), goes away (killed) and comes back, under a serving engine.

Lookups never wait past the deadline, adapters confirmed recently keep being served, unknown ids are
"unavailable" (not "not found"), nothing a client sees names the registry, and the engine recovers by
itself when the registry is back. Bounds on seconds here are generous: they tell a deadline from a hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lora_helpers import make_versions
from redis_server import RedisServer, redis_server_or_skip

from lorax_lite import LLM, SamplingParams
from lorax_lite.engine.async_llm import AsyncLLM, RegistryHealth
from lorax_lite.lora.errors import AdapterNotFoundError
from lorax_lite.registry import admin
from lorax_lite.registry.base import RegistryUnavailableError
from lorax_lite.registry.redis import RedisRegistry
from lorax_lite.registry.store import AdapterStore

PROMPT = [5, 17, 42, 99, 100, 7]
GREEDY = SamplingParams(max_tokens=6, temperature=0)
HANG = 3.0  # seconds: a lookup slower than this waited for the registry instead of its deadline
FAST = 0.5  # seconds: a lookup faster than this did not wait for the registry at all
ENGINE = dict(dtype="float32", device="cpu", max_loras=2)


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_versions(tiny_llama_dir, tmp_path_factory.mktemp("outage-sources"), 2)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may pause, kill and restart."""
    with redis_server_or_skip() as server:
        yield server


@pytest.fixture
def registry(redis: RedisServer) -> Iterator[RedisRegistry]:
    registry = RedisRegistry(redis.url)
    yield registry
    registry.close()


@pytest.fixture
def register(registry: RedisRegistry, tiny_llama_dir: Path, tmp_path: Path) -> Callable[[str, Path], str]:
    """Register an adapter directory under an id; returns its version."""
    store = AdapterStore(tmp_path / "store")

    def register(adapter_id: str, src: Path) -> str:
        return admin.register(registry, store, adapter_id, src, tiny_llama_dir)[0].version

    return register


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """(what `call` returned, or the exception it raised; seconds it took)."""
    start = time.monotonic()
    try:
        result: object = call()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - start


def assert_names_no_registry(exc: BaseException, server: RedisServer) -> None:
    for part in (server.url, "redis://", "127.0.0.1", str(server.port)):
        assert part not in str(exc), str(exc)


def tokens(llm: LLM, adapter_id: str | None) -> list[int]:
    out = llm.generate([PROMPT], GREEDY, adapter_ids=adapter_id)[0]
    assert out.finish_reason in ("length", "eos"), out.error
    return out.token_ids


def wait_until_resolved(resolve: Callable[[], object], seconds: float = 10.0) -> object:
    """Retry a lookup while the registry is unavailable; what it gave (or raised) once it was not."""
    deadline = time.monotonic() + seconds
    while True:
        result, _ = timed(resolve)
        if not isinstance(result, RegistryUnavailableError) or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_a_paused_registry_costs_a_deadline_once_then_lookups_fail_fast(tiny_llama_dir, sources, redis, registry,
                                                                        register):
    llm = LLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    version = register("pricing", sources["v1"])
    served = tokens(llm, "pricing")  # resolved (and confirmed) once while the registry answered
    redis.pause()
    resolved, seconds = timed(lambda: llm.engine.resolve_adapter("pricing"))
    assert not isinstance(resolved, Exception), resolved
    assert resolved.adapter_key == f"pricing@{version}" and seconds < HANG
    unknown, seconds = timed(lambda: llm.engine.resolve_adapter("unknown"))
    assert isinstance(unknown, RegistryUnavailableError) and seconds < HANG
    assert_names_no_registry(unknown, redis)
    for _ in range(5):  # the registry is known to be down: nobody waits for it any more
        unknown, seconds = timed(lambda: llm.engine.resolve_adapter("unknown"))
        assert isinstance(unknown, RegistryUnavailableError) and seconds < FAST
    assert tokens(llm, "pricing") == served
    redis.resume()
    assert isinstance(wait_until_resolved(lambda: llm.engine.resolve_adapter("unknown")), AdapterNotFoundError)
    newer = register("pricing", sources["v2"])  # and the next request sees a new version again
    assert llm.engine.resolve_adapter("pricing").adapter_key == f"pricing@{newer}"


def test_a_killed_registry_keeps_confirmed_adapters_serving_through_async_llm(tiny_llama_dir, sources, redis,
                                                                             registry, register):
    allm = AsyncLLM(str(tiny_llama_dir), registry=registry, **ENGINE)

    async def generate(adapter_id: str) -> list[int]:
        async for out in allm.generate(PROMPT, GREEDY, adapter_id=adapter_id):
            last = out
        assert last.finish_reason in ("length", "eos"), last.error
        return last.token_ids

    try:
        register("pricing", sources["v1"])
        served = asyncio.run(generate("pricing"))
        redis.kill()
        assert asyncio.run(generate("pricing")) == served
        with pytest.raises(RegistryUnavailableError) as raised:
            asyncio.run(generate("unknown"))
        assert_names_no_registry(raised.value, redis)
        with pytest.raises(RegistryUnavailableError) as listed:
            allm.list_adapters()
        assert_names_no_registry(listed.value, redis)
        health = allm.registry_health()
        assert isinstance(health, RegistryHealth) and health.configured and not health.reachable
        assert health.message.startswith("the adapter registry is unreachable")
        assert_names_no_registry(Exception(health.message), redis)
        assert allm.check_registry().reachable is False
    finally:
        allm.shutdown()


def test_a_restarted_registry_is_used_again_without_a_restart_of_the_engine(tiny_llama_dir, sources, redis,
                                                                            registry, register):
    llm = LLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    register("pricing", sources["v1"])
    tokens(llm, "pricing")
    redis.kill()
    assert isinstance(timed(lambda: llm.engine.resolve_adapter("supply"))[0], RegistryUnavailableError)
    redis.restart()  # empty: "pricing" is unknown there until registered again
    version = register("supply", sources["v2"])
    resolved = wait_until_resolved(lambda: llm.engine.resolve_adapter("supply"), seconds=5.0)
    assert not isinstance(resolved, Exception), resolved
    assert resolved.adapter_key == f"supply@{version}"
    with pytest.raises(AdapterNotFoundError, match="not in the registry") as raised:
        llm.engine.resolve_adapter("pricing")  # the registry answers again: its word counts, not the cache's
    assert_names_no_registry(raised.value, redis)
    assert llm.engine.check_registry().reachable


def test_not_found_names_no_registry(tiny_llama_dir, redis, registry):
    llm = LLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    with pytest.raises(AdapterNotFoundError, match="not in the registry") as raised:
        llm.engine.resolve_adapter("unknown")
    assert_names_no_registry(raised.value, redis)


def test_past_the_staleness_bound_a_confirmed_adapter_is_no_longer_served(tiny_llama_dir, sources, redis, registry,
                                                                         register):
    llm = LLM(str(tiny_llama_dir), registry=registry, registry_stale_s=0.5, **ENGINE)
    never = LLM(str(tiny_llama_dir), registry=registry, registry_stale_s=0, **ENGINE)
    register("pricing", sources["v1"])
    tokens(never, "pricing")
    tokens(llm, "pricing")
    llm.engine.resolve_adapter("pricing")
    redis.kill()
    llm.engine.resolve_adapter("pricing")  # confirmed less than 0.5 s ago
    with pytest.raises(RegistryUnavailableError, match="pricing"):
        never.engine.resolve_adapter("pricing")  # 0: no fallback at all
    time.sleep(0.5)
    with pytest.raises(RegistryUnavailableError, match="pricing") as raised:
        llm.engine.resolve_adapter("pricing")
    assert_names_no_registry(raised.value, redis)


def test_without_a_registry_health_says_so(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE)
    health = llm.engine.registry_health()
    assert not health.configured and not health.reachable and health == llm.engine.check_registry()


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("registry_timeout_s", 0, "registry_timeout_s must be > 0"),
    ("registry_timeout_s", -1.0, "registry_timeout_s must be > 0"),
    ("registry_stale_s", -1, "registry_stale_s must be >= 0"),
])
def test_registry_settings_are_checked(setting: str, value: float, message: str):
    from lorax_lite.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **{setting: value})
    assert EngineConfig(model="m").registry_timeout_s == 1.0 and EngineConfig(model="m").registry_stale_s == 300.0
