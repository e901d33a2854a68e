"""The embedded default registry: one SQLite file, no server.

Several processes (the CLI and a server) may write at once: the file is in WAL mode, a writer waits
up to `BUSY_TIMEOUT_S` for the lock, and every write is one `BEGIN IMMEDIATE` transaction, so a
read-modify-write never interleaves with another process's. Each thread gets its own connection
(the engine thread and the server's threads may all call in). `SQLiteBackend` is that machinery; the
tenants' store (`tenants_sqlite.py`) keeps its tables in the same file with it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorax_lite.registry.base import AdapterRecord, CorruptRecordError, Registry, RegistryError

BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY,
    current_version TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id TEXT NOT NULL,
    version TEXT NOT NULL,
    seq INTEGER NOT NULL,  -- registration order within the adapter: versions() is oldest first
    record_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (adapter_id, version)
);
"""

_SELECT = "SELECT v.record_json, a.pinned FROM versions v JOIN adapters a ON a.adapter_id = v.adapter_id"


class SQLiteBackend:
    """One SQLite file at `path` (parent directories and `schema` created on open), shared by the registry's tables
    and the tenants' (`tenants_sqlite.py`): per-thread connections, WAL, one `BEGIN IMMEDIATE` per write, and
    every error a RegistryError naming the file's URL."""

    def __init__(self, path: str | Path, schema: str) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = f"sqlite:///{self.path}"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()  # guards _connections
        with self._errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._write() as db:
                for statement in schema.split(";")[:-1]:  # executescript would commit early
                    db.execute(statement)

    def ping(self) -> None:
        with self._errors():
            self._connection().execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction: committed if the block returns, rolled back if it raises."""
        with self._errors():
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._local.db = db
            with self._lock:
                self._connections.append(db)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _enable_wal(db)
        return db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"registry {self.url}: {exc}") from exc


class SQLiteRegistry(SQLiteBackend, Registry):
    """Registry in one SQLite file at `path` (parent directories and schema created on open)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA)

    def add_version(self, record: AdapterRecord) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT current_version FROM adapters WHERE adapter_id = ?", (record.adapter_id,)
            ).fetchone()
            if row is not None and row[0] == record.version:
                return False
            self._insert_version(db, record)
            if row is None:
                db.execute(
                    "INSERT INTO adapters (adapter_id, current_version, pinned) VALUES (?, ?, ?)",
                    (record.adapter_id, record.version, int(record.pinned)),
                )
            else:  # the id's pinned flag is kept
                db.execute(
                    "UPDATE adapters SET current_version = ? WHERE adapter_id = ?",
                    (record.version, record.adapter_id),
                )
            return True

    def get(self, adapter_id: str) -> AdapterRecord | None:
        rows = self._read(f"{_SELECT} WHERE a.adapter_id = ? AND v.version = a.current_version", (adapter_id,))
        return rows[0] if rows else None

    def get_version(self, adapter_id: str, version: str) -> AdapterRecord | None:
        rows = self._read(f"{_SELECT} WHERE a.adapter_id = ? AND v.version = ?", (adapter_id, version))
        return rows[0] if rows else None

    def list_current(self) -> list[AdapterRecord]:
        return self._read(f"{_SELECT} WHERE v.version = a.current_version ORDER BY a.adapter_id")

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        return self._read(f"{_SELECT} WHERE a.adapter_id = ? ORDER BY v.seq", (adapter_id,))

    def remove(self, adapter_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM versions WHERE adapter_id = ?", (adapter_id,))
            return db.execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,)).rowcount > 0

    def set_pinned(self, adapter_id: str, pinned: bool) -> bool:
        with self._write() as db:
            cursor = db.execute("UPDATE adapters SET pinned = ? WHERE adapter_id = ?", (int(pinned), adapter_id))
            return cursor.rowcount > 0

    def _insert_version(self, db: sqlite3.Connection, record: AdapterRecord) -> None:
        """Add the version unless it exists already (versions are immutable: the first record stays)."""
        (seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE adapter_id = ?", (record.adapter_id,)
        ).fetchone()
        db.execute(
            "INSERT OR IGNORE INTO versions (adapter_id, version, seq, record_json, created_at) VALUES (?, ?, ?, ?, ?)",
            (record.adapter_id, record.version, seq, json.dumps(record.to_dict()), record.created_at),
        )

    def _read(self, sql: str, params: tuple = ()) -> list[AdapterRecord]:
        with self._errors():
            rows = self._connection().execute(sql, params).fetchall()
        try:
            return [_to_record(record_json, pinned) for record_json, pinned in rows]
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(f"registry {self.url}: corrupt record: {exc}") from exc


def _to_record(record_json: str, pinned: int) -> AdapterRecord:
    record = AdapterRecord.from_dict(json.loads(record_json))
    record.pinned = bool(pinned)  # per adapter id, not per version
    return record


def _enable_wal(db: sqlite3.Connection) -> None:
    """Turn on WAL. SQLite can answer "database is locked" here without calling its busy handler
    (several processes switching a new file to WAL at once), so wait and retry, up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
