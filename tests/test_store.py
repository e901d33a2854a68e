"""The content-addressed adapter store and the registration pipeline (registry/store.py, registry/admin.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lora_helpers import AdapterSpec, make_versions, rewrite_config

from lorax_lite.lora.errors import AdapterShapeError, CorruptWeightsError, UnsupportedAdapterError
from lorax_lite.lora.checksum import compute_version
from lorax_lite.lora.naming import InvalidAdapterIdError
from lorax_lite.registry import admin, store as store_module
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore

FILES = ["adapter_config.json", "adapter_model.safetensors"]
BAD_IDS = ["../x", "..", ".hidden", "a/b", "", "-x", "x" * 65, "a b"]


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different real PEFT adapters for the tiny Llama, with extra files beside them."""
    made = make_versions(tiny_llama_dir, tmp_path_factory.mktemp("store-sources"), 2)
    for path in made.values():
        (path / "notes.py").write_text("raise SystemExit('never run')\n")
    return made


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def registry(tmp_path: Path):
    registry = SQLiteRegistry(tmp_path / "registry.db")
    yield registry
    registry.close()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content (what 'nothing changed' is checked against)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- AdapterStore ------------------------------------------------------------------------------


def test_add_copies_only_the_two_files_with_a_canonical_config(store: AdapterStore, sources: dict[str, Path]) -> None:
    version = compute_version(sources["v1"])
    path = store.add("pricing", sources["v1"], version)
    assert path == store.root / "pricing" / version == store.path("pricing", version)
    assert sorted(p.name for p in path.iterdir()) == FILES  # not notes.py, README.md, ...
    config = json.loads((sources["v1"] / FILES[0]).read_text())
    assert (path / FILES[0]).read_text() == json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert (path / FILES[1]).read_bytes() == (sources["v1"] / FILES[1]).read_bytes()
    assert store.verify("pricing", version) and compute_version(path) == version
    assert store.versions("pricing") == [version]
    assert sorted(p.name for p in (store.root / "pricing").iterdir()) == [version]  # no temp dir left


def test_adding_an_existing_version_is_a_no_op(store: AdapterStore, sources: dict[str, Path]) -> None:
    version = compute_version(sources["v1"])
    path = store.add("pricing", sources["v1"], version)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir()}
    assert store.add("pricing", sources["v1"], version) == path
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir()} == before


def test_versions_are_immutable_new_content_gets_a_new_directory(store: AdapterStore, sources: dict[str, Path]) -> None:
    v1, v2 = compute_version(sources["v1"]), compute_version(sources["v2"])
    first = store.add("pricing", sources["v1"], v1)
    kept = tree(first)
    second = store.add("pricing", sources["v2"], v2)
    assert first != second and tree(first) == kept
    assert store.versions("pricing") == sorted([v1, v2])
    assert store.verify("pricing", v1) and store.verify("pricing", v2)


def test_verify_detects_tampering_and_add_repairs_the_version(store: AdapterStore, sources: dict[str, Path]) -> None:
    version = compute_version(sources["v1"])
    path = store.add("pricing", sources["v1"], version)
    flip_last_byte(path / FILES[1])
    assert not store.verify("pricing", version)
    store.add("pricing", sources["v1"], version)  # same content again: the damaged copy is replaced
    assert store.verify("pricing", version)
    rewrite_config(path, lora_alpha=99)
    assert not store.verify("pricing", version)
    (path / FILES[0]).write_text("not json")
    assert not store.verify("pricing", version)
    (path / FILES[1]).unlink()
    assert not store.verify("pricing", version)
    assert not store.verify("other", version)  # never stored


def test_a_source_that_does_not_hash_to_the_version_is_refused(store: AdapterStore, sources: dict[str, Path]) -> None:
    with pytest.raises(CorruptWeightsError, match="changed while being registered"):
        store.add("pricing", sources["v1"], compute_version(sources["v2"]))
    assert store.versions("pricing") == [] and list((store.root / "pricing").iterdir()) == []


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_ids_are_checked_before_any_filesystem_access(tmp_path: Path, sources: dict[str, Path], bad_id: str) -> None:
    store = AdapterStore(tmp_path / "store")
    version = compute_version(sources["v1"])
    for call in (lambda: store.add(bad_id, sources["v1"], version), lambda: store.path(bad_id, version),
                 lambda: store.verify(bad_id, version), lambda: store.remove(bad_id), lambda: store.versions(bad_id)):
        with pytest.raises(InvalidAdapterIdError, match="invalid adapter id"):
            call()
    assert list(tmp_path.iterdir()) == []  # the store root was not even created


def test_malformed_versions_are_refused(store: AdapterStore, sources: dict[str, Path]) -> None:
    for version in ("../../etc", "ABC", "0" * 63, "g" * 64):
        with pytest.raises(ValueError, match="invalid adapter version"):
            store.add("pricing", sources["v1"], version)
    assert not store.root.exists()


def test_stale_temp_dirs_are_ignored_and_cleaned_by_the_next_add(store: AdapterStore, sources: dict[str, Path]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    id_dir = store.root / "pricing"
    stale = id_dir / f".tmp-{socket.gethostname()}-{int(dead.stdout)}-abc123"
    live = id_dir / f".tmp-{socket.gethostname()}-{os.getpid()}-def456"  # another add running in this process
    for temp in (stale, live):
        temp.mkdir(parents=True)
        (temp / FILES[1]).write_bytes(b"half")
    assert store.versions("pricing") == []
    version = compute_version(sources["v1"])
    store.add("pricing", sources["v1"], version)
    assert not stale.exists() and live.exists()
    assert store.versions("pricing") == [version]


def test_a_failure_before_the_rename_leaves_no_version(store: AdapterStore, sources: dict[str, Path], monkeypatch) -> None:
    def crash(*args) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module.os, "rename", crash)
    version = compute_version(sources["v1"])
    with pytest.raises(OSError, match="disk full"):
        store.add("pricing", sources["v1"], version)
    monkeypatch.undo()
    assert list((store.root / "pricing").iterdir()) == []
    assert store.add("pricing", sources["v1"], version).is_dir() and store.verify("pricing", version)


def test_concurrent_adds_of_one_version_all_succeed(store: AdapterStore, sources: dict[str, Path]) -> None:
    version = compute_version(sources["v1"])
    results: list[Path | BaseException] = []

    def add() -> None:
        try:
            results.append(store.add("pricing", sources["v1"], version))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [store.path("pricing", version)] * 6
    assert sorted(p.name for p in (store.root / "pricing").iterdir()) == [version]
    assert store.verify("pricing", version)


def test_remove_deletes_every_version_of_the_id_only(store: AdapterStore, sources: dict[str, Path]) -> None:
    v1, v2 = compute_version(sources["v1"]), compute_version(sources["v2"])
    store.add("pricing", sources["v1"], v1)
    store.add("pricing", sources["v2"], v2)
    store.add("supply", sources["v1"], v1)
    assert store.remove("pricing")
    assert not store.remove("pricing")
    assert sorted(p.name for p in store.root.iterdir()) == ["supply"]
    assert store.verify("supply", v1)


def test_default_root_comes_from_lorax_store(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAX_STORE", str(tmp_path / "elsewhere"))
    assert AdapterStore().root == tmp_path / "elsewhere"
    monkeypatch.delenv("LORAX_STORE")
    monkeypatch.chdir(tmp_path)
    assert AdapterStore().root == tmp_path / "data" / "store"


# ---- admin.register / admin.verify ------------------------------------------------------------


def test_register_stores_then_records_the_current_version(registry, store, sources, tiny_llama_dir: Path) -> None:
    record, created = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir, owner="pricing",
                                     description="prices", system_prompt="You price things.")
    assert created and record.version == compute_version(sources["v1"])
    assert (record.rank, record.alpha, record.owner, record.system_prompt) == (4, 8.0, "pricing", "You price things.")
    assert record.target_modules == sorted(AdapterSpec().target_modules)
    assert record.size_bytes == (sources["v1"] / FILES[1]).stat().st_size
    assert Path(record.store_path) == store.path("pricing", record.version) and record.created_at > 0
    assert registry.get("pricing") == record


def test_identical_content_is_a_no_op_and_new_content_a_new_current_version(registry, store, sources, tiny_llama_dir) -> None:
    first, _ = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)
    files = tree(store.root)
    again, created = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir, owner="ignored")
    assert not created and again == first and tree(store.root) == files
    second, created = admin.register(registry, store, "pricing", sources["v2"], tiny_llama_dir)
    assert created and second.version != first.version
    assert registry.get("pricing").version == second.version
    assert [r.version for r in registry.versions("pricing")] == [first.version, second.version]
    assert tree(Path(first.store_path)) == files_of(files, first.version)  # the old version is untouched


def files_of(files: dict[str, bytes], version: str) -> dict[str, bytes]:
    return {name.split("/")[-1]: data for name, data in files.items() if f"/{version}/" in name}


def test_pin_on_register_and_on_a_no_op(registry, store, sources, tiny_llama_dir) -> None:
    record, _ = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)
    assert not record.pinned
    record, created = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir, pin=True)
    assert not created and record.pinned and registry.get("pricing").pinned
    record, _ = admin.register(registry, store, "supply", sources["v2"], tiny_llama_dir, pin=True)
    assert record.pinned and registry.get("supply").pinned
    record, _ = admin.register(registry, store, "pricing", sources["v2"], tiny_llama_dir)  # the pin stays with the id
    assert record.pinned and registry.get("pricing").pinned


def test_a_refused_adapter_writes_nothing(registry, store, sources, tiny_llama_dir, tmp_path: Path) -> None:
    admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)
    before = (registry.list_current(), tree(store.root))
    bad = Path(shutil.copytree(sources["v2"], tmp_path / "dora"))
    rewrite_config(bad, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        admin.register(registry, store, "pricing", bad, tiny_llama_dir)
    rewrite_config(bad, use_dora=False, r=8)  # tensors are rank 4
    with pytest.raises(AdapterShapeError):
        admin.register(registry, store, "pricing", bad, tiny_llama_dir)
    with pytest.raises(admin.BaseModelError, match="--model"):
        admin.register(registry, store, "pricing", sources["v2"], tmp_path / "no-model")
    with pytest.raises(InvalidAdapterIdError):
        admin.register(registry, store, "../pricing", sources["v2"], tiny_llama_dir)
    assert (registry.list_current(), tree(store.root)) == before


def test_a_crash_between_store_and_registry_leaves_the_old_version_current(registry, store, sources, tiny_llama_dir,
                                                                           monkeypatch) -> None:
    first, _ = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)

    def crash(record) -> bool:
        raise KeyboardInterrupt  # the process dies after the store write, before the registry commit

    monkeypatch.setattr(registry, "add_version", crash)
    with pytest.raises(KeyboardInterrupt):
        admin.register(registry, store, "pricing", sources["v2"], tiny_llama_dir)
    monkeypatch.undo()
    assert registry.get("pricing") == first and store.verify("pricing", first.version)
    second, created = admin.register(registry, store, "pricing", sources["v2"], tiny_llama_dir)
    assert created and registry.get("pricing").version == second.version and store.verify("pricing", second.version)


def test_verify_reports_every_version(registry, store, sources, tiny_llama_dir) -> None:
    first, _ = admin.register(registry, store, "pricing", sources["v1"], tiny_llama_dir)
    second, _ = admin.register(registry, store, "pricing", sources["v2"], tiny_llama_dir)
    other, _ = admin.register(registry, store, "supply", sources["v1"], tiny_llama_dir)
    assert admin.verify(registry, store) == [("pricing", first.version, True), ("pricing", second.version, True),
                                             ("supply", other.version, True)]
    flip_last_byte(Path(first.store_path) / FILES[1])
    assert admin.verify(registry, store, "pricing") == [("pricing", first.version, False), ("pricing", second.version, True)]
    assert admin.verify(registry, store, "unknown") == []
    with pytest.raises(InvalidAdapterIdError):
        admin.verify(registry, store, "../x")
