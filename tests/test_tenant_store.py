"""Tenants: the key and usage store on both backends (SQLite file, real redis-server), both rate limiters, the URL
factory, and the helpers of registry/tenants.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lorax_lite.registry import tenants
from lorax_lite.registry.base import CorruptRecordError, RegistryError
from lorax_lite.registry.factory import open_registry, open_tenant_store
from lorax_lite.registry.redis import RedisRegistry
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.tenants import (
    Decision,
    KeyExistsError,
    KeyRecord,
    LocalRateLimiter,
    RateLimiter,
    TenantError,
    TenantStore,
    UsageRow,
    new_key,
    parse_expiry,
    parse_key_id,
    secret_matches,
    split_key,
)
from lorax_lite.registry.tenants_redis import IDLE_EXPIRY_S, RedisRateLimiter, RedisTenantStore
from lorax_lite.registry.tenants_sqlite import SQLiteTenantStore


@pytest.fixture
def store(registry_url: str) -> Iterator[TenantStore]:
    store = open_tenant_store(registry_url)
    yield store
    store.close()


def make_key(tenant: str = "pricing", **settings: object) -> tuple[str, KeyRecord]:
    values: dict = {"adapters": ["pricing"], **settings}
    return new_key(tenant, **values)


# ---- keys --------------------------------------------------------------------------------------


def test_a_key_round_trips_every_field(store: TenantStore) -> None:
    _, record = make_key(adapters=["pricing", "supply_chain"], base_model=True, role="admin", name="ops — ünïcode",
                         rpm=60, tpm=10_000, max_concurrent=4, expires_at=4_102_444_800.5)
    store.add_key(record)
    assert store.get_key(record.key_id) == record
    assert store.list_keys() == [record]


def test_the_key_life_cycle(store: TenantStore) -> None:
    assert store.has_keys() is False and store.list_keys() == [] and store.get_key("0123456789ab") is None
    _, first = make_key(now=1_000.0)
    _, second = make_key("supply", adapters=["*"], now=2_000.0)
    _, third = make_key("admins", adapters=[], role="admin", now=1_500.0)
    for record in (first, second, third):
        store.add_key(record)
    assert store.has_keys() is True
    assert store.list_keys() == [first, third, second]  # oldest first

    revoked = dataclasses.replace(first, revoked_at=3_000.0)
    assert store.update_key(revoked) is True
    assert store.get_key(first.key_id) == revoked and store.get_key(first.key_id).status() == "revoked"
    for record in (second, third):
        store.update_key(dataclasses.replace(record, revoked_at=3_000.0))
    assert store.has_keys() is True  # revoking every key never opens the server
    assert [r.status() for r in store.list_keys()] == ["revoked"] * 3

    rotated = dataclasses.replace(first, secret_hash=tenants.new_secret()[1])  # read before the revocation
    assert store.update_key(rotated) is False  # a rotation racing a revocation cannot revive the key
    assert store.get_key(first.key_id) == revoked

    _, stranger = make_key()
    assert store.update_key(stranger) is False
    assert store.get_key(stranger.key_id) is None and len(store.list_keys()) == 3


def test_rotating_changes_the_hash_and_keeps_the_settings(store: TenantStore) -> None:
    key, record = make_key(rpm=5)
    store.add_key(record)
    secret, secret_hash = tenants.new_secret()
    assert store.update_key(dataclasses.replace(record, secret_hash=secret_hash, rotated_at=5.0))
    stored = store.get_key(record.key_id)
    assert stored.rpm == 5 and stored.rotated_at == 5.0
    assert secret_matches(secret, stored.secret_hash)
    assert not secret_matches(split_key(key)[1], stored.secret_hash)


def test_a_taken_key_id_is_key_exists_error_and_the_first_key_stays(store: TenantStore) -> None:
    _, record = make_key()
    store.add_key(record)
    with pytest.raises(KeyExistsError, match=record.display_id):
        store.add_key(dataclasses.replace(record, tenant="intruder", secret_hash=tenants.hash_secret("x")))
    assert store.get_key(record.key_id) == record and len(store.list_keys()) == 1


def test_a_corrupt_key_record_is_a_corrupt_record_error(store: TenantStore) -> None:
    _, record = make_key()
    store.add_key(record)
    if isinstance(store, SQLiteTenantStore):
        store._connection().execute("UPDATE api_keys SET record_json = '{\"tenant\": '")
    else:
        store._client.hset(f"{store.prefix}:apikeys", record.key_id, '{"tenant": ')
    with pytest.raises(CorruptRecordError, match="corrupt key record"):
        store.get_key(record.key_id)
    with pytest.raises(CorruptRecordError):
        store.list_keys()
    store.ping()


def _everything_stored(store: TenantStore, tmp_path: Path) -> bytes:
    """Every byte the backend holds: the SQLite files (database, WAL), or every Redis key and value."""
    if isinstance(store, SQLiteTenantStore):
        return b"".join(path.read_bytes() for path in sorted(tmp_path.iterdir()) if path.name.startswith("registry"))
    raw = redis.Redis.from_url(_raw_url(store))
    chunks = []
    for name in raw.scan_iter("*"):
        chunks.append(name)
        kind = raw.type(name)
        if kind == b"hash":
            chunks += [b"%s=%s" % item for item in raw.hgetall(name).items()]
        elif kind == b"zset":
            chunks += [member for member, _ in raw.zrange(name, 0, -1, withscores=True)]
        else:
            chunks.append(raw.dump(name) or b"")
    raw.close()
    return b"\n".join(chunks)


def _raw_url(store: RedisTenantStore) -> str:
    kwargs = store._client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def test_only_hashes_are_stored_never_the_secret_or_the_key(store: TenantStore, tmp_path: Path) -> None:
    key, record = make_key(rpm=10, tpm=1000, max_concurrent=2)
    store.add_key(record)
    secret = split_key(key)[1]
    limiter = store.rate_limiter()
    assert limiter.acquire(record, "lease-1", 10, 60.0).admitted
    store.add_usage([UsageRow(tenants.utc_day(), record.tenant, record.display_id, "pricing", 1, 10, 5)])
    store.close()  # the SQLite WAL stays on disk (it holds the recent writes)
    stored = _everything_stored(store, tmp_path)
    assert record.key_id.encode() in stored and record.secret_hash.encode() in stored  # we read the right place
    assert secret.encode() not in stored and key.encode() not in stored
    assert secret[:16].encode() not in stored


def test_the_keys_live_beside_the_adapters(registry_url: str) -> None:
    registry, store = open_registry(registry_url), open_tenant_store(registry_url)
    assert type(store).__name__.removesuffix("TenantStore") == type(registry).__name__.removesuffix("Registry")
    assert store.url == registry.url
    _, record = make_key()
    store.add_key(record)
    assert registry.list_current() == [] and registry.get(record.key_id) is None
    registry.ping()
    store.ping()
    registry.close()
    store.close()
    store.close()  # idempotent
    reopened = open_tenant_store(registry_url)
    assert reopened.get_key(record.key_id) == record
    reopened.close()


def test_every_redis_key_of_the_store_is_under_the_prefix(redis_url: str) -> None:
    prefix = "tenants-" + uuid.uuid4().hex
    store = RedisTenantStore(redis_url, prefix=prefix)
    _, record = make_key(rpm=5, tpm=50, max_concurrent=1)
    store.add_key(record)
    store.add_usage([UsageRow("2026-12-01", "pricing", record.display_id, "pricing", 1, 2, 3)])
    store.rate_limiter().acquire(record, "lease", 3, 30.0)
    keys = store._client.keys(f"{prefix}*")
    assert len(keys) == 6 and all(key.startswith(f"{prefix}:") for key in keys)
    store.close()


# ---- usage -------------------------------------------------------------------------------------


def test_usage_adds_up_per_day_tenant_key_and_adapter(store: TenantStore) -> None:
    assert store.usage() == []
    store.add_usage([])
    store.add_usage([
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "pricing", 1, 10, 20),
        UsageRow("2026-12-01", "supply", "llk_bbbbbbbbbbbb", "supply_chain", 2, 5, 6),
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "pricing", 1, 1, 2),  # same group, same batch
    ])
    store.add_usage([
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "pricing", 3, 100, 200),
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "SmolLM2-135M-Instruct", 1, 7, 0),
        UsageRow("2026-12-03", "anonymous", "-", "pricing", 0, 0, 0),
    ])
    assert store.usage() == [
        UsageRow("2026-12-01", "supply", "llk_bbbbbbbbbbbb", "supply_chain", 2, 5, 6),
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "SmolLM2-135M-Instruct", 1, 7, 0),
        UsageRow("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "pricing", 5, 111, 222),
        UsageRow("2026-12-03", "anonymous", "-", "pricing", 0, 0, 0),
    ]
    assert [r.group for r in store.usage(since_day="2026-12-02")] == [
        ("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "SmolLM2-135M-Instruct"),
        ("2026-12-02", "pricing", "llk_aaaaaaaaaaaa", "pricing"),
        ("2026-12-03", "anonymous", "-", "pricing"),
    ]
    assert store.usage(since_day="2026-12-04") == []
    assert [r.day for r in store.usage(tenant="pricing")] == ["2026-12-02", "2026-12-02"]
    assert store.usage(since_day="2026-12-03", tenant="pricing") == []
    assert store.usage(tenant="nobody") == []


def test_usage_groups_never_run_into_each_other(store: TenantStore) -> None:
    odd = [("a|b", "c", "d"), ("a", "b|c", "d"), ("a\tb", "c", "d"), ("a", "b\tc", "d"), ('a", "b', "c", "d"),
           ("a", "b", 'c"]'), ("a:b", "c", "d"), ("a", "b:c", "d")]
    store.add_usage([UsageRow("2026-12-01", t, k, a, i + 1, 0, 0) for i, (t, k, a) in enumerate(odd)])
    found = {(r.tenant, r.key_id, r.adapter): r.requests for r in store.usage()}
    assert found == {group: i + 1 for i, group in enumerate(odd)}


USAGE_WORKERS = 5
USAGE_BATCHES = 20


def _add_usage_at_once(url: str, worker: int, barrier) -> None:
    store = open_tenant_store(url)
    barrier.wait(timeout=60)
    for batch in range(USAGE_BATCHES):
        store.add_usage([UsageRow("2026-12-01", "shared", "-", "pricing", 1, 10, 100),
                         UsageRow("2026-12-01", "own", f"llk_{worker:012x}", "pricing", 1, batch, 0)])
    store.close()


def test_processes_and_threads_adding_usage_at_once_lose_nothing(store: TenantStore, registry_url: str) -> None:
    ctx = multiprocessing.get_context("fork")  # see test_registry.py: spawn would re-import torch in each child
    barrier = ctx.Barrier(USAGE_WORKERS)
    workers = [ctx.Process(target=_add_usage_at_once, args=(registry_url, w, barrier)) for w in range(USAGE_WORKERS)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0] * USAGE_WORKERS

    threads = [threading.Thread(target=lambda: store.add_usage([UsageRow("2026-12-01", "shared", "-", "pricing", 1,
                                                                         10, 100)] * 3)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = {r.key_id: r for r in store.usage(tenant="own")}
    expected_shared = USAGE_WORKERS * USAGE_BATCHES + 8 * 3
    assert store.usage(tenant="shared") == [UsageRow("2026-12-01", "shared", "-", "pricing", expected_shared,
                                                     10 * expected_shared, 100 * expected_shared)]
    assert sorted(rows) == [f"llk_{w:012x}" for w in range(USAGE_WORKERS)]
    assert all(r.requests == USAGE_BATCHES and r.prompt_tokens == sum(range(USAGE_BATCHES)) for r in rows.values())


def test_corrupt_usage_is_a_corrupt_record_error(redis_url: str) -> None:
    store = RedisTenantStore(redis_url, prefix="corrupt-" + uuid.uuid4().hex)
    store.add_usage([UsageRow("2026-12-01", "t", "-", "a", 1, 1, 1)])
    store._client.hset(f"{store.prefix}:usage:2026-12-01", "not json", 3)
    with pytest.raises(CorruptRecordError, match="corrupt usage of 2026-12-01"):
        store.usage()
    store.close()


# ---- the rate limiters: behaviour every limiter shares (no timing: limits whose refill a test cannot notice) ----


@pytest.fixture
def limiter(store: TenantStore) -> RateLimiter:
    return store.rate_limiter()


def limits(**settings: object) -> KeyRecord:
    return make_key(**settings)[1]


def test_the_store_gives_its_backends_limiter(store: TenantStore) -> None:
    expected = LocalRateLimiter if isinstance(store, SQLiteTenantStore) else RedisRateLimiter
    assert isinstance(store.rate_limiter(), expected)


def test_a_key_without_limits_is_always_admitted(limiter: RateLimiter) -> None:
    key = limits()
    for i in range(50):
        assert limiter.acquire(key, f"lease-{i}", 10_000, 60.0) == Decision(True)
    limiter.release(key, "lease-0", 10_000)
    limiter.release(key, "never-acquired", 5)  # harmless


def test_rpm_admits_a_full_bucket_then_refuses_for_the_refill_time(limiter: RateLimiter) -> None:
    key = limits(rpm=3)
    assert all(limiter.acquire(key, f"l{i}", 1, 60.0).admitted for i in range(3))
    refused = limiter.acquire(key, "l3", 1, 60.0)
    assert refused.admitted is False and refused.limit == "rpm"
    assert 15 < refused.retry_after_s <= 20  # one token at 3 per minute: 20 s, less what refilled meanwhile


def test_tpm_charges_prompt_tokens_at_admission_and_may_go_into_debt(limiter: RateLimiter) -> None:
    key = limits(tpm=60)  # one token a second
    assert limiter.acquire(key, "big", 100, 60.0).admitted  # the bucket (60) was above zero: 60 - 100 = -40
    refused = limiter.acquire(key, "next", 1, 60.0)
    assert refused.limit == "tpm" and 35 < refused.retry_after_s <= 41  # up to +1 token: 41 s


def test_tpm_charges_generated_tokens_at_release(limiter: RateLimiter) -> None:
    key = limits(tpm=60)
    assert limiter.acquire(key, "a", 1, 60.0).admitted  # 59 left
    limiter.release(key, "a", 100)  # -41
    refused = limiter.acquire(key, "b", 1, 60.0)
    assert refused.limit == "tpm" and 36 < refused.retry_after_s <= 42


def test_concurrency_counts_leases_until_released(limiter: RateLimiter) -> None:
    key = limits(max_concurrent=2)
    assert limiter.acquire(key, "a", 1, 60.0).admitted and limiter.acquire(key, "b", 1, 60.0).admitted
    assert limiter.acquire(key, "c", 1, 60.0) == Decision(False, "concurrent", 1.0)
    limiter.release(key, "a", 0)
    assert limiter.acquire(key, "c", 1, 60.0).admitted
    assert limiter.acquire(key, "d", 1, 60.0).limit == "concurrent"
    other = limits(max_concurrent=1)  # limits are per key
    assert limiter.acquire(other, "a", 1, 60.0).admitted


def test_an_expired_lease_frees_its_slot(limiter: RateLimiter) -> None:
    import time

    key = limits(max_concurrent=1)
    assert limiter.acquire(key, "crashed", 1, 0.2).admitted  # never released
    assert limiter.acquire(key, "b", 1, 60.0).limit == "concurrent"
    time.sleep(0.3)
    assert limiter.acquire(key, "b", 1, 60.0).admitted


def test_a_request_refused_by_one_limit_takes_nothing_from_the_others(limiter: RateLimiter) -> None:
    key = limits(rpm=2, tpm=10, max_concurrent=1)
    assert limiter.acquire(key, "a", 20, 60.0).admitted  # rpm 1 left, tpm -10
    assert limiter.acquire(key, "b", 1, 60.0).limit == "concurrent"  # takes no request token
    limiter.release(key, "a", 0)
    assert limiter.acquire(key, "c", 1, 60.0).limit == "tpm"  # takes no request token, no slot
    no_tpm = dataclasses.replace(key, tpm=None)  # the same key's buckets, with its token limit lifted
    assert limiter.acquire(no_tpm, "d", 1, 60.0).admitted  # the request token b and c did not take
    limiter.release(no_tpm, "d", 0)
    assert limiter.acquire(no_tpm, "e", 1, 60.0).limit == "rpm"


def test_racing_requests_get_exactly_the_limit(store: TenantStore) -> None:
    limiters = [store.rate_limiter()] * 2 if isinstance(store, SQLiteTenantStore) else \
        [store.rate_limiter(), RedisTenantStore(_raw_url(store), store.prefix).rate_limiter()]  # two replicas
    by_rpm, by_slots = limits(rpm=7), limits(max_concurrent=5)
    decisions: list[tuple[str, Decision]] = []
    barrier = threading.Barrier(24)

    def request(i: int) -> None:
        barrier.wait(timeout=30)
        for key in (by_rpm, by_slots):
            decisions.append((key.key_id, limiters[i % 2].acquire(key, f"lease-{i}", 1, 60.0)))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted = {key.key_id: sum(d.admitted for k, d in decisions if k == key.key_id) for key in (by_rpm, by_slots)}
    assert admitted == {by_rpm.key_id: 7, by_slots.key_id: 5}
    assert {d.limit for _, d in decisions if not d.admitted} == {"rpm", "concurrent"}


def test_the_redis_limiter_is_shared_by_replicas(redis_url: str) -> None:
    prefix = "replicas-" + uuid.uuid4().hex
    first, second = RedisTenantStore(redis_url, prefix), RedisTenantStore(redis_url, prefix)
    one, two = first.rate_limiter(), second.rate_limiter()
    key = limits(rpm=3, max_concurrent=2)
    assert one.acquire(key, "a", 1, 60.0).admitted and two.acquire(key, "b", 1, 60.0).admitted
    assert one.acquire(key, "c", 1, 60.0).limit == "concurrent"
    two.release(key, "a", 0)  # released by another replica than the one that admitted it
    assert one.acquire(key, "c", 1, 60.0).admitted
    two.release(key, "b", 0)
    assert two.acquire(key, "d", 1, 60.0).limit == "rpm"  # three requests across both replicas
    first.close()
    second.close()


def test_redis_bucket_keys_expire_once_idle(redis_url: str) -> None:
    store = RedisTenantStore(redis_url, "ttl-" + uuid.uuid4().hex)
    key = limits(rpm=60, tpm=60, max_concurrent=3)
    limiter = store.rate_limiter()
    assert limiter.acquire(key, "a", 600, 30.0).admitted  # tpm 60 - 600 = -540: ten minutes until full
    ttls = {name.rsplit(":", 1)[1]: store._client.ttl(name) for name in store._client.keys(f"{store.prefix}:*")}
    assert 0 < ttls["rpm"] <= 1 + IDLE_EXPIRY_S
    assert 600 + IDLE_EXPIRY_S - 5 < ttls["tpm"] <= 601 + IDLE_EXPIRY_S  # never before the debt is paid off
    assert 0 < ttls["leases"] <= 30 + IDLE_EXPIRY_S
    limiter.release(key, "a", 0)
    assert store._client.exists(f"{store.prefix}:ratelimit:{key.key_id}:leases") == 0
    store.close()


# ---- the in-process limiter, on a clock the test moves ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_local_rpm_refills_evenly_up_to_the_limit(clock: Clock) -> None:
    limiter, key = LocalRateLimiter(clock), limits(rpm=2)
    assert limiter.acquire(key, "a", 0, 60.0).admitted and limiter.acquire(key, "b", 0, 60.0).admitted
    assert limiter.acquire(key, "c", 0, 60.0) == Decision(False, "rpm", 30.0)
    clock.now += 15  # half a token
    assert limiter.acquire(key, "c", 0, 60.0) == Decision(False, "rpm", 15.0)
    clock.now += 15
    assert limiter.acquire(key, "c", 0, 60.0).admitted
    clock.now += 3600  # an hour idle: full (2), not 120
    assert limiter.acquire(key, "d", 0, 60.0).admitted and limiter.acquire(key, "e", 0, 60.0).admitted
    assert limiter.acquire(key, "f", 0, 60.0).limit == "rpm"


def test_local_tpm_debt_and_retry_after(clock: Clock) -> None:
    limiter, key = LocalRateLimiter(clock), limits(tpm=100)
    assert limiter.acquire(key, "a", 150, 60.0).admitted  # -50
    assert limiter.acquire(key, "b", 1, 60.0) == Decision(False, "tpm", pytest.approx(30.6))  # (1 + 50) * 60 / 100
    clock.now += 30  # -50 + 50 = 0: still not above zero
    assert limiter.acquire(key, "b", 1, 60.0).limit == "tpm"
    clock.now += 0.6
    assert limiter.acquire(key, "b", 1, 60.0).admitted  # 1 - 1 = 0
    limiter.release(key, "b", 30)  # -30
    assert limiter.acquire(key, "c", 1, 60.0) == Decision(False, "tpm", pytest.approx(18.6))


def test_local_leases_expire_on_the_clock(clock: Clock) -> None:
    limiter, key = LocalRateLimiter(clock), limits(max_concurrent=1)
    assert limiter.acquire(key, "a", 0, 4.0).admitted
    clock.now += 3.5
    assert limiter.acquire(key, "b", 0, 4.0) == Decision(False, "concurrent", 1.0)
    clock.now += 0.5  # expiry <= now: gone
    assert limiter.acquire(key, "b", 0, 5.0).admitted


# ---- the URL factory -------------------------------------------------------------------------------


def test_open_tenant_store_reads_urls_as_open_registry_does(tmp_path: Path, redis_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAX_REGISTRY", raising=False)
    default = open_tenant_store()
    assert isinstance(default, SQLiteTenantStore) and default.path == tmp_path / "data" / "registry.db"
    relative = open_tenant_store("sqlite:///rel/registry.db")
    assert relative.path == SQLiteRegistry("rel/registry.db").path
    named = open_tenant_store(f"{redis_url}?prefix=deploy-a")
    assert isinstance(named, RedisTenantStore) and named.prefix == "deploy-a"
    assert named.url == RedisRegistry(redis_url, "deploy-a").url == f"{redis_url}?prefix=deploy-a"
    assert open_tenant_store(redis_url).prefix == "lorax"
    monkeypatch.setenv("LORAX_REGISTRY", f"{redis_url}?prefix=env")
    assert open_tenant_store().prefix == "env"


@pytest.mark.parametrize("url", ["postgres://db/registry", "sqlite:///", "sqlite:///:memory:",
                                 "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/0?prefix=a:b"])
def test_open_tenant_store_refuses_what_open_registry_refuses(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///relative/path\.db.*redis://host:port/db"):
        open_tenant_store(url)


@pytest.mark.timeout(30)
def test_an_unreachable_redis_fails_fast_naming_the_url_without_password() -> None:
    with pytest.raises(RegistryError) as raised:
        open_tenant_store("redis://admin:s3cret@127.0.0.1:1/0?prefix=team")
    assert "s3cret" not in str(raised.value) and "redis://admin:***@127.0.0.1:1/0?prefix=team" in str(raised.value)


def test_a_redis_gone_midway_is_a_registry_error_for_the_store_and_the_limiter() -> None:
    from redis_server import redis_server_or_skip

    with redis_server_or_skip() as server:
        store = open_tenant_store(server.url)
        limiter = store.rate_limiter()
    key = limits(rpm=1)
    for call in (store.has_keys, store.list_keys, lambda: store.usage(), lambda: limiter.acquire(key, "a", 1, 1.0),
                 lambda: limiter.release(key, "a", 1), lambda: store.add_usage([UsageRow("d", "t", "-", "a")])):
        with pytest.raises(RegistryError, match=server.url):
            call()
    store.close()


# ---- registry/tenants.py helpers ---------------------------------------------------------------


def test_new_key_gives_a_key_that_matches_only_its_record() -> None:
    key, record = new_key("pricing", ["supply_chain", "pricing", "pricing"], name="ci", now=1_000.0)
    key_id, secret = split_key(key)
    assert key == f"llk_{key_id}_{secret}" and key_id == record.key_id and len(key_id) == tenants.KEY_ID_HEX
    assert record.adapters == ["pricing", "supply_chain"] and record.created_at == 1_000.0
    assert secret_matches(secret, record.secret_hash) and secret not in record.secret_hash
    assert not secret_matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), record.secret_hash)
    _, other = new_key("pricing", ["pricing"])
    assert other.key_id != record.key_id and not secret_matches(secret, other.secret_hash)


@pytest.mark.parametrize(("settings", "message"), [
    ({"tenant": ""}, "invalid tenant"),
    ({"tenant": "-leading"}, "invalid tenant"),
    ({"tenant": "a" * 65}, "invalid tenant"),
    ({"tenant": "has space"}, "invalid tenant"),
    ({"role": "root"}, "role must be one of user, admin"),
    ({"adapters": ["../etc"]}, "invalid adapter id"),
    ({"adapters": []}, "would allow nothing"),
    ({"rpm": 0}, "rpm must be a positive integer"),
    ({"tpm": -5}, "tpm must be a positive integer"),
    ({"max_concurrent": True}, "max_concurrent must be a positive integer"),
    ({"rpm": 2.5}, "rpm must be a positive integer"),
    ({"expires_at": 999.0}, "expiry is in the past"),
    ({"expires_at": 1_000.0}, "expiry is in the past"),
])
def test_new_key_refuses_bad_settings(settings: dict, message: str) -> None:
    values = {"tenant": "pricing", "adapters": ["pricing"], "now": 1_000.0, **settings}
    with pytest.raises(TenantError, match=message):
        new_key(values.pop("tenant"), **values)


def test_new_key_allows_the_base_model_or_the_admin_role_alone() -> None:
    assert new_key("t", [], base_model=True)[1].base_model is True
    admin = new_key("t", [], role="admin")[1]
    assert admin.is_admin and admin.adapters == [] and not admin.allows_adapter("pricing")
    everything = new_key("t", ["*"])[1]
    assert everything.allows_adapter("anything") and not everything.has_limits


@pytest.mark.parametrize("text", [
    "", "llk_", "llk_0123456789ab", "llk_0123456789ab_", "llk_0123456789AB_" + "a" * 43,
    "llk_0123456789ab_" + "a" * 42, "llk_0123456789ab_" + "a" * 44, "LLK_0123456789ab_" + "a" * 43,
    "llk_0123456789ab_" + "a" * 42 + "!", " llk_0123456789ab_" + "a" * 43, "Bearer llk_0123456789ab_" + "a" * 43,
])
def test_split_key_refuses_anything_malformed(text: str) -> None:
    assert split_key(text) is None


def test_split_key_splits_a_well_formed_key() -> None:
    assert split_key("llk_0123456789ab_" + "-_" * 21 + "Z") == ("0123456789ab", "-_" * 21 + "Z")


@pytest.mark.parametrize("stored", [
    "", "sha256", "sha256$00", "sha256$zz$00", "md5$00$00", "sha256$00$00$00",
    tenants.hash_secret("secret").replace("sha256", "sha512"),
])
def test_secret_matches_is_false_for_malformed_hashes(stored: str) -> None:
    assert secret_matches("secret", stored) is False


def test_secret_matches_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, real = [], hmac.compare_digest

    def compare_digest(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", compare_digest)
    stored = tenants.hash_secret("secret")
    assert secret_matches("secret", stored) and not secret_matches("guess", stored)
    assert len(calls) == 2 and calls[0][1] == stored.rsplit("$", 1)[1]


def test_hash_secret_is_salted() -> None:
    first, second = tenants.hash_secret("secret"), tenants.hash_secret("secret")
    assert first != second and first.startswith("sha256$") and len(first.split("$")[1]) == 32
    assert tenants.hash_secret("secret", bytes(16)) == tenants.hash_secret("secret", bytes(16))


def test_parse_key_id_takes_the_id_with_or_without_its_prefix() -> None:
    assert parse_key_id("llk_0123456789ab") == parse_key_id(" 0123456789ab\n") == "0123456789ab"
    for bad in ("", "llk_0123", "0123456789AB", "llk_0123456789ab_secret", "key"):
        with pytest.raises(TenantError, match="invalid key id"):
            parse_key_id(bad)


def test_parse_expiry() -> None:
    end_of_day = dt.datetime(2027, 2, 1, tzinfo=dt.timezone.utc).timestamp()
    assert parse_expiry("2027-01-31") == end_of_day  # the key works through that day, UTC
    assert parse_expiry("2027-01-31T18:00:00+01:00") == dt.datetime(2027, 1, 31, 17, tzinfo=dt.timezone.utc).timestamp()
    assert parse_expiry("2027-01-31T18:00:00") == dt.datetime(2027, 1, 31, 18, tzinfo=dt.timezone.utc).timestamp()
    for bad in ("", "tomorrow", "2027-02-30", "31/01/2027", "2027-13-01T00:00"):
        with pytest.raises(TenantError, match="invalid date"):
            parse_expiry(bad)


def test_record_status_and_public_dict() -> None:
    _, record = new_key("t", ["a"], expires_at=2_000.0, now=1_000.0)
    assert record.status(1_999.9) == "active" and record.status(2_000.0) == "expired"
    assert dataclasses.replace(record, revoked_at=1_500.0).status(1_600.0) == "revoked"
    public = record.public_dict()
    assert "secret_hash" not in public and public["id"] == record.display_id and public["status"] == "expired"
    assert KeyRecord.from_dict({**record.to_dict(), "added_later": 1}) == record
    assert tenants.utc_day(0.0) == "1970-01-01"
