"""One suite for both registry backends (SQLite file, real redis-server), plus the URL factory."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorax_lite.registry.base import AdapterRecord, CorruptRecordError, Registry, RegistryError
from lorax_lite.registry.factory import DEFAULT_REGISTRY_URL, default_registry_url, open_registry
from lorax_lite.registry.redis import RedisRegistry
from lorax_lite.registry.sqlite import SQLiteRegistry


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    registry = open_registry(registry_url)
    yield registry
    registry.close()


def make_record(adapter_id: str = "pricing", version: str = "v1", **fields: object) -> AdapterRecord:
    values = dict(
        base_model="models/SmolLM2-135M-Instruct",
        rank=8,
        alpha=16.5,
        target_modules=["q_proj", "v_proj"],
        size_bytes=123_456,
        store_path=f"data/store/{adapter_id}/{version}",
        created_at=1_712_345_678.123456,
    )
    return AdapterRecord(adapter_id=adapter_id, version=version, **{**values, **fields})


# -- register / get / list / versions / remove / set_pinned -------------------------------------


def test_a_record_round_trips_every_field(registry: Registry) -> None:
    record = make_record(
        owner="pricing-team", description="Prices — in €, with ünïcode", system_prompt="You set prices.\nBe brief.",
        pinned=True, extra={"dataset": "pricing.jsonl", "loss": [0.5, 0.25], "epochs": 3},
    )
    assert registry.add_version(record) is True
    assert registry.get("pricing") == record
    assert registry.get_version("pricing", "v1") == record
    assert registry.versions("pricing") == [record]
    assert registry.list_current() == [record]


def test_unknown_ids_are_none_false_or_empty(registry: Registry) -> None:
    assert registry.get("nope") is None
    assert registry.get_version("nope", "v1") is None
    assert registry.versions("nope") == []
    assert registry.list_current() == []
    assert registry.remove("nope") is False
    assert registry.set_pinned("nope", True) is False
    assert registry.get("nope") is None  # set_pinned did not create it


def test_registering_the_current_version_again_is_a_no_op(registry: Registry) -> None:
    first = make_record(description="first")
    assert registry.add_version(first) is True
    assert registry.add_version(make_record(description="changed")) is False
    assert registry.get("pricing") == first
    assert registry.versions("pricing") == [first]


def test_a_new_version_becomes_current_and_old_ones_stay(registry: Registry) -> None:
    v1, v2 = make_record(version="v1"), make_record(version="v2", rank=4)
    assert registry.add_version(v1) and registry.add_version(v2)
    assert registry.get("pricing") == v2
    assert registry.get_version("pricing", "v1") == v1
    assert registry.get_version("pricing", "v3") is None
    assert registry.versions("pricing") == [v1, v2]


def test_registering_an_older_version_again_makes_it_current(registry: Registry) -> None:
    v1, v2 = make_record(version="v1"), make_record(version="v2")
    registry.add_version(v1)
    registry.add_version(v2)
    assert registry.add_version(make_record(version="v1", description="again")) is True
    assert registry.get("pricing") == v1  # versions are immutable: the first record of v1 stays
    assert [r.version for r in registry.versions("pricing")] == ["v1", "v2"]  # oldest first, no duplicate


def test_a_new_id_takes_the_records_pinned_flag(registry: Registry) -> None:
    registry.add_version(make_record("a", pinned=True))
    registry.add_version(make_record("b", pinned=False))
    assert [r.pinned for r in registry.list_current()] == [True, False]


def test_the_pinned_flag_belongs_to_the_id_and_is_kept_across_versions(registry: Registry) -> None:
    registry.add_version(make_record(version="v1"))
    assert registry.set_pinned("pricing", True) is True
    registry.add_version(make_record(version="v2", pinned=False))
    assert registry.get("pricing").pinned is True
    assert registry.get_version("pricing", "v1").pinned is True
    assert [r.pinned for r in registry.versions("pricing")] == [True, True]
    assert registry.list_current()[0].pinned is True
    assert registry.set_pinned("pricing", False) is True
    registry.add_version(make_record(version="v3", pinned=True))
    assert registry.get("pricing").pinned is False


def test_remove_forgets_the_adapter_and_all_its_versions(registry: Registry) -> None:
    registry.add_version(make_record("other"))
    registry.add_version(make_record(version="v1", pinned=True))
    registry.add_version(make_record(version="v2"))
    assert registry.remove("pricing") is True
    assert registry.get("pricing") is None
    assert registry.get_version("pricing", "v1") is None
    assert registry.versions("pricing") == []
    assert [r.adapter_id for r in registry.list_current()] == ["other"]
    assert registry.remove("pricing") is False
    # registered again, it starts afresh: one version, its own pinned flag
    assert registry.add_version(make_record(version="v2")) is True
    assert [(r.version, r.pinned) for r in registry.versions("pricing")] == [("v2", False)]


def test_list_gives_current_versions_sorted_by_id(registry: Registry) -> None:
    for adapter_id in ["supply_chain", "B-team", "a.1", "a-1", "pricing", "a"]:
        registry.add_version(make_record(adapter_id, version="v1"))
    registry.add_version(make_record("pricing", version="v2"))
    listed = registry.list_current()
    assert [r.adapter_id for r in listed] == ["B-team", "a", "a-1", "a.1", "pricing", "supply_chain"]
    assert {r.adapter_id: r.version for r in listed}["pricing"] == "v2"


def test_close_is_idempotent(registry_url: str) -> None:
    registry = open_registry(registry_url)
    registry.add_version(make_record())
    registry.close()
    registry.close()
    reopened = open_registry(registry_url)
    assert reopened.get("pricing") == make_record()
    reopened.close()


def test_several_threads_share_one_registry(registry: Registry) -> None:
    def register_many(thread: int) -> None:
        for i in range(10):
            registry.add_version(make_record(f"t{thread}-{i}"))
            registry.add_version(make_record("shared", version=f"t{thread}-{i}"))

    threads = [threading.Thread(target=register_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry.list_current()) == 41
    assert len(registry.versions("shared")) == 40


def test_ping_answers_while_the_registry_is_there(registry: Registry) -> None:
    assert registry.ping() is None


def _corrupt_current_record(registry: Registry, adapter_id: str) -> None:
    """Overwrite the stored JSON of the id's current version with something that is not a record."""
    version = registry.get(adapter_id).version
    if isinstance(registry, SQLiteRegistry):
        registry._connection().execute("UPDATE versions SET record_json = '{\"rank\": ' WHERE version = ?", (version,))
    else:
        registry._client.hset(f"{registry.prefix}:records:{adapter_id}", version, '{"rank": ')


def test_a_corrupt_record_is_a_corrupt_record_error(registry: Registry) -> None:
    registry.add_version(make_record())
    _corrupt_current_record(registry, "pricing")
    with pytest.raises(CorruptRecordError, match="corrupt record"):
        registry.get("pricing")
    assert registry.ping() is None  # the registry itself answers


# -- several processes writing at once ---------------------------------------------------------

NUM_PROCESSES = 6
NUM_ADAPTERS_EACH = 5


def _register_at_once(url: str, worker: int, barrier, results) -> None:
    """One writer process: its own adapters, its own version of "shared", and the same version of "same"."""
    registry = open_registry(url)
    barrier.wait(timeout=60)
    for i in range(NUM_ADAPTERS_EACH):
        registry.add_version(make_record(f"unit-{worker}-{i}"))
    new_version = registry.add_version(make_record("shared", version=f"w{worker}"))
    first_of_same = registry.add_version(make_record("same", version="identical"))
    registry.close()
    results.put((worker, new_version, first_of_same))


def test_processes_registering_at_the_same_moment_lose_nothing(registry: Registry, registry_url: str) -> None:
    # fork, not spawn: a spawned child re-imports lorax_lite (torch, transformers), ~5 s per process.
    # Each child opens its own registry after the fork; nothing open is shared.
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(NUM_PROCESSES), ctx.Queue()
    workers = [ctx.Process(target=_register_at_once, args=(registry_url, w, barrier, results))
               for w in range(NUM_PROCESSES)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)  # the few small results fit in the queue's pipe: joining first is safe
    assert [process.exitcode for process in workers] == [0] * NUM_PROCESSES
    outcomes = sorted(results.get(timeout=10) for _ in workers)

    assert [new_version for _, new_version, _ in outcomes] == [True] * NUM_PROCESSES
    assert sum(first for _, _, first in outcomes) == 1  # exactly one writer added "identical"
    ids = [r.adapter_id for r in registry.list_current()]
    expected_units = {f"unit-{w}-{i}" for w in range(NUM_PROCESSES) for i in range(NUM_ADAPTERS_EACH)}
    assert sorted(ids) == ids and set(ids) == expected_units | {"shared", "same"} and len(ids) == len(set(ids))
    shared_versions = [r.version for r in registry.versions("shared")]
    assert sorted(shared_versions) == [f"w{w}" for w in range(NUM_PROCESSES)]
    assert registry.get("shared").version in shared_versions
    assert [r.version for r in registry.versions("same")] == ["identical"]


def _open_new_file_at_once(path: Path, worker: int, barrier) -> None:
    barrier.wait(timeout=60)
    registry = SQLiteRegistry(path)  # every process creates the schema and turns on WAL at once
    registry.add_version(make_record(f"unit-{worker}"))
    registry.close()


def test_processes_creating_a_new_sqlite_file_at_once_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, path = ctx.Barrier(NUM_PROCESSES), tmp_path / "new" / "registry.db"
    workers = [ctx.Process(target=_open_new_file_at_once, args=(path, w, barrier)) for w in range(NUM_PROCESSES)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0] * NUM_PROCESSES
    assert [r.adapter_id for r in SQLiteRegistry(path).list_current()] == [f"unit-{w}" for w in range(NUM_PROCESSES)]


# -- Redis specifics ---------------------------------------------------------------------------


def test_two_prefixes_on_one_redis_do_not_see_each_other(redis_url: str) -> None:
    blue = RedisRegistry(redis_url, prefix="blue-" + uuid.uuid4().hex)
    green = RedisRegistry(redis_url, prefix="green-" + uuid.uuid4().hex)
    blue.add_version(make_record("pricing", version="blue"))
    green.add_version(make_record("pricing", version="green"))
    green.add_version(make_record("supply_chain"))
    assert [r.version for r in blue.versions("pricing")] == ["blue"]
    assert [r.adapter_id for r in blue.list_current()] == ["pricing"]
    assert green.remove("pricing") and blue.get("pricing").version == "blue"
    blue.close()
    green.close()


def test_every_redis_key_is_under_the_prefix(redis_url: str) -> None:
    prefix = "keys-" + uuid.uuid4().hex
    registry = RedisRegistry(redis_url, prefix=prefix)
    registry.add_version(make_record(version="v1"))
    registry.add_version(make_record(version="v2"))
    registry.set_pinned("pricing", True)
    keys = registry._client.keys(f"{prefix}*")
    assert keys and all(key.startswith(f"{prefix}:") for key in keys)
    registry.remove("pricing")
    assert registry._client.keys(f"{prefix}:*") == []
    registry.close()


@pytest.mark.timeout(30)  # fails fast: not the OS's minutes-long connect timeout
def test_an_unreachable_redis_fails_fast_naming_the_url() -> None:
    with pytest.raises(RegistryError, match="redis://127.0.0.1:1/0"):
        open_registry("redis://127.0.0.1:1/0")


@pytest.mark.timeout(30)  # the client's socket timeout, not a hang
def test_a_redis_password_never_appears_in_messages() -> None:
    with pytest.raises(RegistryError) as raised:
        RedisRegistry("redis://admin:s3cret@127.0.0.1:1/0", prefix="team")
    assert "s3cret" not in str(raised.value) and "redis://admin:***@127.0.0.1:1/0?prefix=team" in str(raised.value)


def test_a_redis_that_never_answers_fails_fast_naming_the_url() -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        with pytest.raises(RegistryError, match=url):
            open_registry(url)


def test_ping_raises_registry_error_once_redis_is_gone() -> None:
    from redis_server import redis_server_or_skip

    with redis_server_or_skip() as server:
        registry = RedisRegistry(server.url)
        registry.ping()
    with pytest.raises(RegistryError, match=server.url):
        registry.ping()
    registry.close()


# -- SQLite specifics --------------------------------------------------------------------------


def test_sqlite_creates_parent_directories_and_uses_wal(tmp_path: Path) -> None:
    registry = SQLiteRegistry(tmp_path / "a" / "b" / "registry.db")
    registry.add_version(make_record())
    assert (tmp_path / "a" / "b" / "registry.db").is_file()
    assert registry._connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    registry.close()


def test_a_sqlite_path_that_cannot_be_created_raises_registry_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(RegistryError, match=f"sqlite:///{tmp_path}/a-file/registry.db"):
        SQLiteRegistry(tmp_path / "a-file" / "registry.db")
    with pytest.raises(RegistryError, match="sqlite:///"):
        SQLiteRegistry(tmp_path)  # a directory, not a database file


def test_a_file_that_is_not_a_database_raises_registry_error(tmp_path: Path) -> None:
    (tmp_path / "registry.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="registry.db"):
        SQLiteRegistry(tmp_path / "registry.db")


# -- the URL factory ---------------------------------------------------------------------------


def test_default_registry_url_reads_lorax_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAX_REGISTRY", raising=False)
    assert default_registry_url() == DEFAULT_REGISTRY_URL == "sqlite:///data/registry.db"
    monkeypatch.setenv("LORAX_REGISTRY", "redis://replicas:6379/2")
    assert default_registry_url() == "redis://replicas:6379/2"


def test_open_registry_defaults_to_the_sqlite_file_under_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAX_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    registry = open_registry()
    assert isinstance(registry, SQLiteRegistry) and registry.path == tmp_path / "data" / "registry.db"
    assert registry.path.is_file()
    registry.close()
    monkeypatch.setenv("LORAX_REGISTRY", "sqlite:///elsewhere.db")
    assert open_registry().path == tmp_path / "elsewhere.db"


def test_sqlite_urls_take_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_registry("sqlite:///rel/registry.db")
    assert relative.path == tmp_path / "rel" / "registry.db"
    absolute = open_registry(f"sqlite:///{tmp_path}/abs/registry.db")  # four slashes: tmp_path starts with "/"
    assert absolute.path == tmp_path / "abs" / "registry.db"
    assert absolute.url == f"sqlite:///{tmp_path}/abs/registry.db"
    assert open_registry(relative.url).path == relative.path  # url names the file wherever the cwd goes


def test_redis_urls_take_an_optional_prefix(redis_url: str) -> None:
    default = open_registry(redis_url)
    assert isinstance(default, RedisRegistry) and default.prefix == "lorax" and default.url == redis_url
    named = open_registry(f"{redis_url}?prefix=deploy-a")
    assert named.prefix == "deploy-a" and named.url == f"{redis_url}?prefix=deploy-a"
    assert open_registry(named.url).prefix == "deploy-a"
    default.close()
    named.close()


@pytest.mark.parametrize(
    "url",
    ["postgres://db/registry", "data/registry.db", "sqlite://registry.db", "sqlite:///", "sqlite:///data/",
     "sqlite:///:memory:", "", "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/0?prefix=",
     "redis://127.0.0.1:6379/0?prefix=a:b"],
)
def test_unsupported_urls_raise_value_error_listing_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///relative/path\.db.*redis://host:port/db"):
        open_registry(url)
