"""`lorax-lite adapters ...`: every command and flag on a real SQLite registry, bad input, concurrency and crashes.

Most commands run in-process (typer's CliRunner); the concurrency and crash tests run the real CLI
in subprocesses (`python -m lorax_lite.cli`), killed with SIGKILL at chosen moments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lora_helpers import make_versions, rewrite_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorax_lite.cli import app
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.lora.checksum import compute_version
from lorax_lite.registry.store import AdapterStore

runner = CliRunner()
UNREACHABLE = "redis://127.0.0.1:1/0"
ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a child process, optionally slowed down where a crash is to be caused: every
# fsync (the store's copy) or the registry write. The product code is unchanged.
CHILD = r"""
import os, sys, time
slow_fsync = float(os.environ.get("TEST_SLOW_FSYNC", "0"))
slow_register = float(os.environ.get("TEST_SLOW_REGISTER", "0"))
if slow_fsync:
    real_fsync = os.fsync
    os.fsync = lambda fd: (time.sleep(slow_fsync), real_fsync(fd))[1]
if slow_register:
    from lorax_lite.registry.sqlite import SQLiteRegistry
    real_add_version = SQLiteRegistry.add_version
    SQLiteRegistry.add_version = lambda self, record: (time.sleep(slow_register), real_add_version(self, record))[1]
from lorax_lite.cli import main
main()
"""


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_versions(tiny_llama_dir, tmp_path_factory.mktemp("cli-sources"), 3)


class Deployment:
    """One registry file and one store directory in tmp_path, with helpers to run the CLI against them."""

    def __init__(self, tmp_path: Path, model_dir: Path) -> None:
        self.db = tmp_path / "registry.db"
        self.url = f"sqlite:///{self.db}"  # an absolute path: sqlite:////tmp/...
        self.store = tmp_path / "store"
        self.model_dir = model_dir

    def args(self, *args: str) -> list[str]:
        extra = ["--registry", self.url]
        if args[0] in ("register", "remove", "verify"):
            extra += ["--store", str(self.store)]
        if args[0] == "register":
            extra += ["--model", str(self.model_dir)]
        return ["adapters", *args, *extra]

    def cli(self, *args: str):
        return runner.invoke(app, self.args(*args))

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.exit_code == 0, (args, result.output)
        return result.stdout

    def state(self) -> tuple:
        """The registry's records and every file in the store (for 'nothing was written')."""
        records = []
        if self.db.exists():
            registry = SQLiteRegistry(self.db)
            records = [(r.to_dict(), [v.to_dict() for v in registry.versions(r.adapter_id)]) for r in registry.list_current()]
            registry.close()
        files = {str(p.relative_to(self.store)): p.read_bytes() for p in self.store.rglob("*") if p.is_file()} \
            if self.store.exists() else {}
        return records, files

    def registry(self) -> SQLiteRegistry:
        return SQLiteRegistry(self.db)

    def spawn(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CHILD, *self.args(*args)], cwd=ROOT, env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def deployment(tmp_path: Path, tiny_llama_dir: Path) -> Deployment:
    return Deployment(tmp_path, tiny_llama_dir)


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- every command and flag --------------------------------------------------------------------


def test_register_show_list_pin_unpin_remove(deployment: Deployment, sources: dict[str, Path]) -> None:
    d = deployment
    out = d.ok("register", "pricing", str(sources["v1"]), "--owner", "pricing-bu", "--description", "Prices products",
               "--system-prompt", "You are a pricing analyst.", "--pin")
    v1 = compute_version(sources["v1"])
    assert out.strip() == f"registered pricing version {v1[:12]} (pinned)"
    shown = json.loads(d.ok("show", "pricing", "--json"))
    assert shown["version"] == v1 and shown["owner"] == "pricing-bu" and shown["description"] == "Prices products"
    assert shown["system_prompt"] == "You are a pricing analyst." and shown["pinned"] is True
    assert shown["rank"] == 4 and shown["alpha"] == 8.0 and shown["base_model"] == str(d.model_dir)
    assert Path(shown["store_path"]) == d.store / "pricing" / v1
    assert [v["version"] for v in shown["versions"]] == [v1] and shown["versions"][0]["current"]

    assert d.ok("register", "pricing", str(sources["v1"])).strip() == \
        f"pricing is already at version {v1[:12]}: nothing changed (pinned)"
    out = d.ok("register", "pricing", str(sources["v2"]))
    v2 = compute_version(sources["v2"])
    assert out.strip() == f"registered pricing version {v2[:12]} (pinned)"  # the pin belongs to the id
    shown = json.loads(d.ok("show", "pricing", "--json"))
    assert shown["version"] == v2 and [(v["version"], v["current"]) for v in shown["versions"]] == [(v1, False), (v2, True)]
    text = d.ok("show", "pricing")
    assert f"version:        {v2}" in text and "owner:          pricing-bu" in text  # kept from the version before
    assert "system_prompt:  You are a pricing analyst." in text
    assert f"  {v1[:12]}" in text and f"  {v2[:12]}" in text and "(current)" in text

    assert d.ok("unpin", "pricing").strip() == "unpinned pricing"
    assert json.loads(d.ok("show", "pricing", "--json"))["pinned"] is False
    assert d.ok("pin", "pricing").strip() == "pinned pricing"
    assert json.loads(d.ok("show", "pricing", "--json"))["pinned"] is True

    d.ok("register", "supply", str(sources["v3"]))
    assert [r["adapter_id"] for r in json.loads(d.ok("list", "--json"))] == ["pricing", "supply"]
    assert d.ok("remove", "pricing").strip() == "removed pricing"
    assert [r["adapter_id"] for r in json.loads(d.ok("list", "--json"))] == ["supply"]
    assert not (d.store / "pricing").exists() and (d.store / "supply").is_dir()
    assert_one_line_error(d.cli("show", "pricing"), 2, "unknown adapter 'pricing'", d.url)


def test_list_prints_a_readable_table(deployment: Deployment, sources: dict[str, Path]) -> None:
    d = deployment
    assert d.ok("list").strip() == "no adapters registered"
    assert json.loads(d.ok("list", "--json")) == []
    d.ok("register", "pricing", str(sources["v1"]), "--owner", "pricing-bu", "--pin")
    d.ok("register", "supply_chain", str(sources["v2"]))
    lines = d.ok("list").strip().splitlines()
    assert lines[0].split() == ["ID", "VERSION", "OWNER", "RANK", "PINNED", "SIZE", "CREATED"]
    size = (sources["v1"] / "adapter_model.safetensors").stat().st_size
    pricing = lines[1].split()
    assert pricing[:5] == ["pricing", compute_version(sources["v1"])[:12], "pricing-bu", "4", "yes"]
    assert " ".join(pricing[5:7]) == f"{size / 1024:.1f} KiB" and len(pricing) == 9  # + date and time
    assert lines[2].split()[:5] == ["supply_chain", compute_version(sources["v2"])[:12], "-", "4", "no"]
    assert lines[1].index(pricing[1]) == lines[0].index("VERSION")  # columns line up
    records = json.loads(d.ok("list", "--json"))
    assert [(r["adapter_id"], r["pinned"], r["size_bytes"]) for r in records] == [("pricing", True, size), ("supply_chain", False, size)]


def test_verify_passes_then_reports_a_tampered_version_with_exit_1(deployment: Deployment, sources: dict[str, Path]) -> None:
    d = deployment
    assert d.ok("verify").strip() == "no adapters registered"
    d.ok("register", "pricing", str(sources["v1"]))
    d.ok("register", "pricing", str(sources["v2"]))
    d.ok("register", "supply", str(sources["v3"]))
    v1, v2, v3 = (compute_version(sources[v]) for v in ("v1", "v2", "v3"))
    assert d.ok("verify").split() == ["ok", f"pricing@{v1[:12]}", "ok", f"pricing@{v2[:12]}", "ok", f"supply@{v3[:12]}"]
    assert d.ok("verify", "supply").split() == ["ok", f"supply@{v3[:12]}"]
    weights = d.store / "pricing" / v1 / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = d.cli("verify")
    assert_one_line_error(result, 1, "1 version(s) do not match their checksum", f"pricing@{v1[:12]}")
    assert result.stdout.split() == ["MISMATCH", f"pricing@{v1[:12]}", "ok", f"pricing@{v2[:12]}", "ok", f"supply@{v3[:12]}"]
    assert d.cli("verify", "supply").exit_code == 0
    assert_one_line_error(d.cli("verify", "nobody"), 2, "unknown adapter 'nobody'")


def test_defaults_come_from_the_environment(tmp_path: Path, tiny_llama_dir: Path, sources: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setenv("LORAX_REGISTRY", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("LORAX_STORE", str(tmp_path / "env-store"))
    monkeypatch.setenv("LORAX_MODEL", str(tiny_llama_dir))
    result = runner.invoke(app, ["adapters", "register", "pricing", str(sources["v1"])])
    assert result.exit_code == 0, result.output
    version = compute_version(sources["v1"])
    assert AdapterStore(tmp_path / "env-store").verify("pricing", version)
    assert SQLiteRegistry(tmp_path / "env.db").get("pricing").version == version
    assert runner.invoke(app, ["adapters", "verify"]).stdout.split() == ["ok", f"pricing@{version[:12]}"]
    monkeypatch.delenv("LORAX_REGISTRY")
    monkeypatch.chdir(tmp_path)  # the default: sqlite:///data/registry.db, relative to the current directory
    assert json.loads(runner.invoke(app, ["adapters", "list", "--json"]).stdout) == []
    assert (tmp_path / "data" / "registry.db").exists()


# ---- bad input: exit 2, one line, nothing written -----------------------------------------------


def broken_adapters(sources: dict[str, Path], out: Path) -> dict[str, tuple[Path, str]]:
    """name -> (adapter dir, what the error message must say)."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(sources["v2"], out / name))

    made: dict[str, tuple[Path, str]] = {"missing": (out / "nowhere", "no such directory")}
    dora = copy("dora")
    rewrite_config(dora, use_dora=True)
    made["dora"] = (dora, "DoRA")
    pickled = copy("pickled")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    made["pickled"] = (pickled, "pickled weights")
    shape = copy("shape")
    tensors = load_file(shape / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 32)  # the base model's in_features is 64
    save_file(tensors, shape / "adapter_model.safetensors")
    made["shape"] = (shape, "expected (4, 64)")
    rank = copy("rank")
    rewrite_config(rank, r=128)
    made["rank"] = (rank, "rank 128 is above max_lora_rank 64")
    no_config = copy("no-config")
    (no_config / "adapter_config.json").unlink()
    made["no-config"] = (no_config, "adapter_config.json is missing")
    not_json = copy("not-json")
    (not_json / "adapter_config.json").write_text("{oops")
    made["not-json"] = (not_json, "not readable JSON")
    truncated = copy("truncated")
    (truncated / "adapter_model.safetensors").write_bytes((truncated / "adapter_model.safetensors").read_bytes()[:100])
    made["truncated"] = (truncated, "corrupt")
    return made


def test_bad_input_exits_2_with_one_line_and_writes_nothing(deployment: Deployment, sources: dict[str, Path],
                                                            tmp_path: Path) -> None:
    d = deployment
    d.ok("register", "pricing", str(sources["v1"]))
    before = d.state()
    cases = [(["register", "pricing", str(path)], [message]) for path, message in broken_adapters(sources, tmp_path / "bad").values()]
    cases += [
        (["register", "../pricing", str(sources["v2"])], ["invalid adapter id '../pricing'"]),
        (["register", "_x", str(sources["v2"])], ["invalid adapter id '_x'"]),
        (["register", "a@b", str(sources["v2"])], ["invalid adapter id 'a@b'"]),
        (["register", "x" * 65, str(sources["v2"])], ["invalid adapter id"]),
        (["register", "pricing", str(sources["v2"]), "--model", str(tmp_path / "no-model")], ["base model at", "--model"]),
        (["register", "pricing", str(sources["v2"]), "--registry", "mysql://localhost/x"], ["unsupported registry URL"]),
        (["register", "pricing", str(sources["v2"]), "--registry", "sqlite:///"], ["names no database file"]),
    ]
    for command in ("show", "remove", "pin", "unpin", "verify"):
        cases += [([command, "nobody"], ["unknown adapter 'nobody'", d.url]), ([command, "../x"], ["invalid adapter id '../x'"])]
    for args, needles in cases:
        result = runner.invoke(app, d.args(*args[:3]) + args[3:])
        assert_one_line_error(result, 2, *needles)
        assert d.state() == before, args


def test_a_bad_id_touches_no_file(tmp_path: Path, tiny_llama_dir: Path, sources: dict[str, Path]) -> None:
    d = Deployment(tmp_path / "fresh", tiny_llama_dir)
    for args in (["register", "../x", str(sources["v1"])], ["show", "../x"], ["remove", "../x"], ["pin", "../x"]):
        assert_one_line_error(d.cli(*args), 2, "invalid adapter id")
    assert not (tmp_path / "fresh").exists()  # neither the registry file nor the store was created


def test_an_unreachable_registry_exits_1_naming_its_url(deployment: Deployment, sources: dict[str, Path]) -> None:
    d = deployment
    d.url = UNREACHABLE
    for args in (["list"], ["show", "pricing"], ["pin", "pricing"], ["unpin", "pricing"], ["remove", "pricing"],
                 ["verify"], ["register", "pricing", str(sources["v1"])]):
        assert_one_line_error(d.cli(*args), 1, f"registry {UNREACHABLE}")
    assert not d.store.exists()  # register validated the adapter, then stopped at the registry: no store write



def test_an_unreachable_redis_is_named_without_its_password(deployment: Deployment) -> None:
    deployment.url = "redis://admin:s3cret@127.0.0.1:1/0"
    result = deployment.cli("list")
    assert_one_line_error(result, 1, "registry redis://admin:***@127.0.0.1:1/0")
    assert "s3cret" not in result.output

# ---- several processes ------------------------------------------------------------------------


def test_two_processes_registering_at_the_same_moment_lose_nothing(deployment: Deployment, sources: dict[str, Path]) -> None:
    d = deployment
    d.ok("list")  # the registry file exists: both processes race on writes, not on creating it
    procs = [d.spawn("register", name, str(sources[v]), "--owner", name) for name, v in (("pricing", "v1"), ("supply", "v2"))]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    records = {r["adapter_id"]: r for r in json.loads(d.ok("list", "--json"))}
    assert sorted(records) == ["pricing", "supply"]
    assert records["pricing"]["version"] == compute_version(sources["v1"])
    assert records["supply"]["version"] == compute_version(sources["v2"])
    assert d.ok("verify").split()[::2] == ["ok", "ok"]


def kill_when(proc: subprocess.Popen, seen, delay: float = 0.0, timeout: float = 60.0) -> bool:
    """SIGKILL `proc` `delay` seconds after `seen()` first holds; False if it ended before that."""
    deadline = time.monotonic() + timeout
    while not seen():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the child never reached the moment to kill it"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def assert_consistent_then_recovers(d: Deployment, sources: dict[str, Path], old: str, new: str) -> None:
    """After a kill: the current version is old or new and verifies; a version dir is complete or absent."""
    registry, store = d.registry(), AdapterStore(d.store)
    try:
        current = registry.get("pricing")
        assert current is not None and current.version in (old, new)
        assert store.verify("pricing", current.version)
        assert all(store.verify("pricing", v) for v in store.versions("pricing"))  # no half-written version
    finally:
        registry.close()
    out = d.ok("register", "pricing", str(sources["v2"]))
    assert new[:12] in out
    registry = d.registry()
    assert registry.get("pricing").version == new and store.verify("pricing", new)
    registry.close()
    assert [n for n in entries(d.store / "pricing") if n.startswith(".")] == []  # stale temp dirs cleaned


@pytest.fixture
def crash_setup(deployment: Deployment, sources: dict[str, Path]) -> tuple[Deployment, str, str]:
    deployment.ok("register", "pricing", str(sources["v1"]))
    return deployment, compute_version(sources["v1"]), compute_version(sources["v2"])


def test_killed_while_copying_into_the_store(crash_setup, sources: dict[str, Path]) -> None:
    d, old, new = crash_setup
    proc = d.spawn("register", "pricing", str(sources["v2"]), TEST_SLOW_FSYNC="0.3")
    id_dir = d.store / "pricing"
    assert kill_when(proc, lambda: any(n.startswith(".tmp-") for n in entries(id_dir)))
    assert any(n.startswith(".tmp-") for n in entries(id_dir)) and new not in entries(id_dir)  # killed mid-copy
    assert d.registry().get("pricing").version == old
    assert_consistent_then_recovers(d, sources, old, new)


def test_killed_after_the_store_before_the_registry(crash_setup, sources: dict[str, Path]) -> None:
    d, old, new = crash_setup
    proc = d.spawn("register", "pricing", str(sources["v2"]), TEST_SLOW_REGISTER="30")
    assert kill_when(proc, lambda: new in entries(d.store / "pricing"))
    assert d.registry().get("pricing").version == old  # an unreferenced version dir, not current
    assert AdapterStore(d.store).verify("pricing", new)
    assert_consistent_then_recovers(d, sources, old, new)


def test_killed_at_random_moments_of_a_registration(crash_setup, sources: dict[str, Path]) -> None:
    d, old, new = crash_setup
    rng = random.Random(os.getpid())
    for attempt in range(2):  # from the first temp dir on: mid-copy, at the rename, at the registry write, or done
        delay = rng.uniform(0.0, 0.5)
        proc = d.spawn("register", "pricing", str(sources["v2"]), TEST_SLOW_FSYNC="0.05", TEST_SLOW_REGISTER="0.1")
        started = entries(d.store / "pricing")
        killed = kill_when(proc, lambda: entries(d.store / "pricing") != started, delay)
        assert killed or proc.returncode == 0, (attempt, delay, proc.stderr.read())
        assert_consistent_then_recovers(d, sources, old, new)
        d.ok("remove", "pricing")
        d.ok("register", "pricing", str(sources["v1"]))
