"""`lorax-lite keys ...` and `lorax-lite usage` on both registry backends: every command and option, exit codes,
the key shown once on the last line, never a secret or hash in listings, revoke and rotate, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorax_lite.cli import app
from lorax_lite.registry.base import AdapterRecord
from lorax_lite.registry.factory import open_registry, open_tenant_store
from lorax_lite.registry.tenants import KeyExistsError, TenantStore, UsageRow, new_key, secret_matches, split_key
from lorax_lite.registry.tenants_redis import RedisTenantStore
from lorax_lite.registry.tenants_sqlite import SQLiteTenantStore

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "redis://admin:s3cret@127.0.0.1:1/0?prefix=team"
SHOWN = "redis://admin:***@127.0.0.1:1/0?prefix=team"


class Keys:
    """The CLI against one registry URL, and the tenants' store behind it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def cli(self, *args: str):
        return runner.invoke(app, [*args, "--registry", self.url])

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
        return result.stdout

    def store(self) -> TenantStore:
        return open_tenant_store(self.url)

    def create(self, *args: str) -> tuple[str, str]:
        """(stdout, the key on its last line)."""
        out = self.ok("keys", "create", *args)
        return out, out.rstrip("\n").splitlines()[-1]


@pytest.fixture
def keys(registry_url: str) -> Keys:
    return Keys(registry_url)


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def register_adapter(url: str, adapter_id: str) -> None:
    registry = open_registry(url)
    registry.add_version(AdapterRecord(adapter_id=adapter_id, version="v1", base_model="m", rank=8, alpha=16.0,
                                       target_modules=["q_proj"], size_bytes=1, store_path="x"))
    registry.close()


# ---- create ------------------------------------------------------------------------------------


def test_create_prints_the_settings_then_the_key_alone_on_the_last_line(keys: Keys) -> None:
    out, key = keys.create("--tenant", "pricing", "--adapters", "pricing,supply_chain", "--rpm", "60")
    key_id, secret = split_key(key)
    lines = out.splitlines()
    assert lines[0] == f"created key llk_{key_id} for tenant pricing"
    assert "shown only this once" in lines[-2] and out.count(secret) == 1 and out.endswith(key + "\n")
    assert "pricing, supply_chain" in out and "60 requests/min" in out and "never" in out
    store = keys.store()
    record = store.get_key(key_id)
    assert record.tenant == "pricing" and record.adapters == ["pricing", "supply_chain"] and record.rpm == 60
    assert secret_matches(secret, record.secret_hash) and secret not in record.secret_hash
    store.close()


def test_create_stores_every_option(keys: Keys) -> None:
    _, key = keys.create("--tenant", "ops.team-1", "--adapters", " a , b,, a", "--base-model", "--rpm", "5",
                         "--tpm", "700", "--max-concurrent", "3", "--expires", "2099-12-31", "--admin", "--name",
                         "night jobs")
    store = keys.store()
    record = store.get_key(split_key(key)[0])
    store.close()
    assert (record.tenant, record.adapters, record.base_model, record.role, record.name) == \
        ("ops.team-1", ["a", "b"], True, "admin", "night jobs")
    assert (record.rpm, record.tpm, record.max_concurrent) == (5, 700, 3)
    assert record.expires_at == 4_102_444_800.0  # the end of 2099-12-31, UTC
    assert record.created_at == pytest.approx(time.time(), abs=60) and record.revoked_at is None


def test_create_warns_about_adapters_not_registered_yet(keys: Keys) -> None:
    register_adapter(keys.url, "pricing")
    result = keys.cli("keys", "create", "--tenant", "t", "--adapters", "pricing,later")
    assert result.exit_code == 0 and split_key(result.stdout.splitlines()[-1])
    assert result.stderr.startswith("warning: ") and "later" in result.stderr and "pricing" not in result.stderr
    quiet = keys.cli("keys", "create", "--tenant", "t", "--adapters", "*")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "every adapter (*)" in quiet.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--tenant", "bad tenant", "--base-model"], "invalid tenant"),
    (["--tenant", "", "--base-model"], "invalid tenant"),
    (["--tenant", "t", "--adapters", "../etc"], "invalid adapter id"),
    (["--tenant", "t"], "would allow nothing"),
    (["--tenant", "t", "--base-model", "--rpm", "0"], "rpm must be a positive integer"),
    (["--tenant", "t", "--base-model", "--max-concurrent", "-1"], "max_concurrent must be a positive integer"),
    (["--tenant", "t", "--base-model", "--expires", "2020-01-01"], "expiry is in the past"),
    (["--tenant", "t", "--base-model", "--expires", "next week"], "invalid date"),
])
def test_create_refuses_bad_settings_with_exit_2_writing_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    keys = Keys(f"sqlite:///{tmp_path}/fresh/registry.db")
    assert_one_line_error(keys.cli("keys", "create", *args), 2, message)
    assert not (tmp_path / "fresh").exists()  # refused before the registry was opened


def test_a_taken_key_id_is_drawn_again(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    store_class = SQLiteTenantStore if keys.url.startswith("sqlite") else RedisTenantStore
    real_add_key, attempts = store_class.add_key, []

    def add_key(self: TenantStore, record) -> None:
        attempts.append(record.key_id)
        if len(attempts) < 3:
            raise KeyExistsError("taken")
        real_add_key(self, record)

    monkeypatch.setattr(store_class, "add_key", add_key)
    _, key = keys.create("--tenant", "t", "--base-model")
    assert len(set(attempts)) == 3 and split_key(key)[0] == attempts[-1]
    attempts.clear()
    monkeypatch.setattr(store_class, "add_key", lambda self, record: (_ for _ in ()).throw(KeyExistsError("taken")))
    assert_one_line_error(keys.cli("keys", "create", "--tenant", "t", "--base-model"), 1, "no free key id")


# ---- list --------------------------------------------------------------------------------------


def test_list_shows_every_key_but_never_a_secret_or_hash(keys: Keys) -> None:
    assert "no API keys" in keys.ok("keys", "list")
    assert json.loads(keys.ok("keys", "list", "--json")) == []
    _, first = keys.create("--tenant", "pricing", "--adapters", "pricing", "--rpm", "60", "--name", "ci")
    _, second = keys.create("--tenant", "admins", "--admin", "--expires", "2099-12-31")
    store = keys.store()
    hashes = [r.secret_hash for r in store.list_keys()]
    store.close()

    table = keys.ok("keys", "list")
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "TENANT", "NAME", "ROLE", "ADAPTERS", "BASE", "RPM", "TPM", "CONC", "EXPIRES",
                                "STATUS", "CREATED"]
    assert lines[1].split()[:9] == [f"llk_{split_key(first)[0]}", "pricing", "ci", "user", "pricing", "no", "60", "-",
                                    "-"]
    assert lines[2].split()[:4] == [f"llk_{split_key(second)[0]}", "admins", "-", "admin"]
    assert "2100-01-01 00:00 UTC" in lines[2] and "active" in lines[2]
    listed = json.loads(keys.ok("keys", "list", "--json"))
    assert [k["id"] for k in listed] == [f"llk_{split_key(first)[0]}", f"llk_{split_key(second)[0]}"]
    assert all("secret_hash" not in k and k["status"] == "active" for k in listed)
    for text in (table, json.dumps(listed)):
        for secret in (split_key(first)[1], split_key(second)[1], *hashes, *(h.rsplit("$", 1)[1] for h in hashes)):
            assert secret not in text


def test_list_shows_expired_and_revoked_keys(keys: Keys) -> None:
    store = keys.store()
    _, expired = new_key("old", ["a"], expires_at=time.time() - 5, now=time.time() - 3600)
    store.add_key(expired)
    store.close()
    _, key = keys.create("--tenant", "t", "--base-model")
    keys.ok("keys", "revoke", f"llk_{split_key(key)[0]}")
    assert [row.split()[-4] for row in keys.ok("keys", "list").splitlines()[1:]] == ["expired", "revoked"]


# ---- revoke and rotate -------------------------------------------------------------------------


def test_revoke_takes_the_id_with_or_without_llk_and_says_when_it_was_revoked_already(keys: Keys) -> None:
    _, key = keys.create("--tenant", "pricing", "--base-model")
    key_id = split_key(key)[0]
    assert keys.ok("keys", "revoke", f"llk_{key_id}").strip() == f"revoked llk_{key_id} of tenant pricing"
    store = keys.store()
    revoked_at = store.get_key(key_id).revoked_at
    assert revoked_at == pytest.approx(time.time(), abs=60)
    again = keys.ok("keys", "revoke", key_id)
    assert "revoked already" in again and "nothing changed" in again
    assert store.get_key(key_id).revoked_at == revoked_at and store.get_key(key_id).status() == "revoked"
    assert store.has_keys()
    store.close()


def test_rotate_gives_a_new_secret_for_the_same_key(keys: Keys) -> None:
    _, old = keys.create("--tenant", "pricing", "--adapters", "pricing", "--tpm", "1000")
    key_id, old_secret = split_key(old)
    store = keys.store()
    before = store.get_key(key_id)
    out = keys.ok("keys", "rotate", f"llk_{key_id}")
    new = out.rstrip("\n").splitlines()[-1]
    assert out.startswith(f"rotated key llk_{key_id} of tenant pricing") and "shown only this once" in out
    new_id, new_secret = split_key(new)
    after = store.get_key(key_id)
    assert new_id == key_id and new_secret != old_secret
    assert secret_matches(new_secret, after.secret_hash) and not secret_matches(old_secret, after.secret_hash)
    assert after.rotated_at == pytest.approx(time.time(), abs=60)
    assert (after.adapters, after.tpm, after.created_at) == (before.adapters, before.tpm, before.created_at)
    store.close()


def test_a_revoked_or_expired_key_cannot_be_rotated(keys: Keys) -> None:
    _, key = keys.create("--tenant", "t", "--base-model")
    key_id = split_key(key)[0]
    keys.ok("keys", "revoke", key_id)
    assert_one_line_error(keys.cli("keys", "rotate", key_id), 2, f"llk_{key_id} is revoked")
    store = keys.store()
    _, expired = new_key("t", ["a"], expires_at=time.time() - 5, now=time.time() - 3600)
    store.add_key(expired)
    assert_one_line_error(keys.cli("keys", "rotate", expired.key_id), 2, "is expired")
    assert store.get_key(expired.key_id) == expired and store.get_key(key_id).rotated_at is None
    store.close()


@pytest.mark.parametrize("command", ["revoke", "rotate"])
def test_unknown_or_malformed_key_ids_exit_2(keys: Keys, command: str) -> None:
    assert_one_line_error(keys.cli("keys", command, "llk_0123456789ab"), 2, "unknown key llk_0123456789ab")
    for bad in ("llk_xyz", "0123456789AB", "pricing"):
        assert_one_line_error(keys.cli("keys", command, bad), 2, "invalid key id")


# ---- usage -------------------------------------------------------------------------------------


def test_usage_table_json_and_filters(keys: Keys) -> None:
    assert keys.ok("usage").strip() == "no usage recorded"
    store = keys.store()
    store.add_usage([UsageRow("2026-11-30", "pricing", "llk_aaaaaaaaaaaa", "pricing", 3, 100, 2000),
                     UsageRow("2026-12-01", "pricing", "llk_aaaaaaaaaaaa", "pricing", 1, 10, 20),
                     UsageRow("2026-12-01", "supply", "-", "SmolLM2-135M-Instruct", 2, 5, 6)])
    store.close()
    lines = keys.ok("usage").splitlines()
    assert lines[0].split() == ["DAY", "TENANT", "KEY", "ADAPTER", "REQUESTS", "PROMPT_TOKENS", "GENERATED_TOKENS",
                                "TOTAL_TOKENS"]
    assert lines[1].split() == ["2026-11-30", "pricing", "llk_aaaaaaaaaaaa", "pricing", "3", "100", "2000", "2100"]
    assert lines[3].split() == ["2026-12-01", "supply", "-", "SmolLM2-135M-Instruct", "2", "5", "6", "11"]
    assert lines[4].split() == ["TOTAL", "6", "115", "2026", "2141"] and len(lines) == 5
    since = keys.ok("usage", "--since", "2026-12-01").splitlines()
    assert [line.split()[0] for line in since[1:]] == ["2026-12-01", "2026-12-01", "TOTAL"]
    assert since[-1].split() == ["TOTAL", "3", "15", "26", "41"]
    only = json.loads(keys.ok("usage", "--tenant", "pricing", "--since", "2026-12-01", "--json"))
    assert only == [{"day": "2026-12-01", "tenant": "pricing", "key_id": "llk_aaaaaaaaaaaa", "adapter": "pricing",
                     "requests": 1, "prompt_tokens": 10, "generated_tokens": 20}]
    assert keys.ok("usage", "--tenant", "nobody").strip() == "no usage recorded for nobody"


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "2026-13-01"], "invalid day"), (["--since", "yesterday"], "invalid day"),
    (["--since", "2026-12-01T00:00"], "invalid day"), (["--tenant", "a b"], "invalid tenant"),
])
def test_usage_refuses_bad_filters_with_exit_2(keys: Keys, args: list[str], message: str) -> None:
    assert_one_line_error(keys.cli("usage", *args), 2, message)


# ---- the registry ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["keys", "create", "--tenant", "t", "--base-model"], ["keys", "list"],
                                  ["keys", "revoke", "llk_0123456789ab"], ["keys", "rotate", "0123456789ab"],
                                  ["usage"]])
def test_an_unreachable_registry_exits_1_naming_its_url_without_the_password(args: list[str]) -> None:
    result = Keys(UNREACHABLE).cli(*args)
    assert_one_line_error(result, 1, SHOWN)
    assert "s3cret" not in result.output


def test_a_malformed_registry_url_exits_2() -> None:
    for args in (["keys", "list"], ["usage"], ["keys", "create", "--tenant", "t", "--base-model"]):
        assert_one_line_error(Keys("postgres://db/registry").cli(*args), 2, "unsupported registry URL")


def test_the_keys_share_the_registry_file_with_the_adapters(tmp_path: Path) -> None:
    keys = Keys(f"sqlite:///{tmp_path}/registry.db")
    register_adapter(keys.url, "pricing")
    keys.create("--tenant", "t", "--adapters", "pricing")
    assert isinstance(keys.store(), SQLiteTenantStore) and [p.name for p in tmp_path.glob("*.db")] == ["registry.db"]
    assert "pricing" in keys.ok("adapters", "list")


def test_the_real_command_prints_the_key_last(tmp_path: Path) -> None:
    env = {**os.environ, "LORAX_REGISTRY": f"sqlite:///{tmp_path}/registry.db",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "lorax_lite.cli", "keys", "create", "--tenant", "t", "--base-model"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    key_id, secret = split_key(done.stdout.splitlines()[-1])
    store = open_tenant_store(env["LORAX_REGISTRY"])
    assert secret_matches(secret, store.get_key(key_id).secret_hash)
    store.close()
