"""Keys and usage in the registry's SQLite file (two more tables beside the adapters').

    api_keys  key_id -> the KeyRecord as JSON (its secret's salted hash, never the secret)
    usage     one row per (day, tenant, key_id, adapter): requests, prompt and generated tokens

Writes are `BEGIN IMMEDIATE` transactions on `SQLiteBackend` (WAL, per-thread connections), so the CLI and
several server processes may write at once; `add_usage` adds a whole batch in one transaction. Rate limits are
counted in each process (`LocalRateLimiter`): with several server processes on one file, each one enforces a
key's limits on its own share of the traffic.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorax_lite.registry.base import CorruptRecordError
from lorax_lite.registry.sqlite import SQLiteBackend
from lorax_lite.registry.tenants import KeyExistsError, KeyRecord, LocalRateLimiter, RateLimiter, TenantStore, UsageRow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    record_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,  -- YYYY-MM-DD, UTC
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,  -- display id llk_..., or "-"
    adapter TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    generated_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant, key_id, adapter)
);
"""

_ADD_USAGE = """
INSERT INTO usage (day, tenant, key_id, adapter, requests, prompt_tokens, generated_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, tenant, key_id, adapter) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    generated_tokens = generated_tokens + excluded.generated_tokens
"""


class SQLiteTenantStore(SQLiteBackend, TenantStore):
    """Keys and usage in the SQLite file at `path`, the same file as `SQLiteRegistry(path)`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA)

    def add_key(self, record: KeyRecord) -> None:
        with self._write() as db:
            cursor = db.execute("INSERT OR IGNORE INTO api_keys (key_id, record_json, created_at) VALUES (?, ?, ?)",
                                (record.key_id, json.dumps(record.to_dict()), record.created_at))
            if cursor.rowcount == 0:
                raise KeyExistsError(f"key id {record.display_id} is taken")

    def get_key(self, key_id: str) -> KeyRecord | None:
        records = self._read_keys("SELECT record_json FROM api_keys WHERE key_id = ?", (key_id,))
        return records[0] if records else None

    def list_keys(self) -> list[KeyRecord]:
        return self._read_keys("SELECT record_json FROM api_keys ORDER BY created_at, key_id")

    def update_key(self, record: KeyRecord) -> bool:
        with self._write() as db:
            row = db.execute("SELECT record_json FROM api_keys WHERE key_id = ?", (record.key_id,)).fetchone()
            if row is None or (record.revoked_at is None and json.loads(row[0]).get("revoked_at") is not None):
                return False
            db.execute("UPDATE api_keys SET record_json = ? WHERE key_id = ?",
                       (json.dumps(record.to_dict()), record.key_id))
            return True

    def has_keys(self) -> bool:
        with self._errors():
            return self._connection().execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        with self._write() as db:
            db.executemany(_ADD_USAGE, [(r.day, r.tenant, r.key_id, r.adapter, r.requests, r.prompt_tokens,
                                         r.generated_tokens) for r in rows])

    def usage(self, since_day: str | None = None, tenant: str | None = None) -> list[UsageRow]:
        sql = "SELECT day, tenant, key_id, adapter, requests, prompt_tokens, generated_tokens FROM usage WHERE 1 = 1"
        params: list[str] = []
        if since_day is not None:
            sql += " AND day >= ?"
            params.append(since_day)
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        with self._errors():
            rows = self._connection().execute(sql + " ORDER BY day, tenant, key_id, adapter", params).fetchall()
        return [UsageRow(*row) for row in rows]

    def rate_limiter(self) -> RateLimiter:
        return LocalRateLimiter()

    def _read_keys(self, sql: str, params: tuple = ()) -> list[KeyRecord]:
        with self._errors():
            rows = self._connection().execute(sql, params).fetchall()
        try:
            return [KeyRecord.from_dict(json.loads(record_json)) for (record_json,) in rows]
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(f"registry {self.url}: corrupt key record: {exc}") from exc
