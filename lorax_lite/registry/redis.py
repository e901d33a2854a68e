"""The shared registry for several replicas: the same behaviour as the SQLite one, on Redis.

Every key lives under `<prefix>:` (one prefix per deployment; several can share one Redis):

    <prefix>:current           hash  adapter_id -> current version
    <prefix>:pinned            hash  adapter_id -> "1" / "0"
    <prefix>:versions:<id>     list  versions, registration order (oldest first)
    <prefix>:records:<id>      hash  version -> record JSON (immutable once written)

Writes are Lua scripts, so each runs atomically: concurrent registrations are never lost. The tenants'
keys (`tenants_redis.py`) live under the same prefix, through the same `RedisBackend`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlencode, urlsplit

import redis

from lorax_lite.registry.base import AdapterRecord, CorruptRecordError, Registry, RegistryError

SOCKET_TIMEOUT_S = 2.0  # an unreachable registry fails fast
DEFAULT_PREFIX = "lorax"
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+$")  # no ':' so one prefix's keys never overlap another's

# KEYS: current, pinned, versions:<id>, records:<id>; ARGV: adapter_id, version, record_json, pinned
_REGISTER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == ARGV[2] then return 0 end
if redis.call('HSETNX', KEYS[4], ARGV[2], ARGV[3]) == 1 then redis.call('RPUSH', KEYS[3], ARGV[2]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not current then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
return 1
"""
# KEYS: current, pinned, versions:<id>, records:<id>; ARGV: adapter_id
_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4])
return 1
"""
# KEYS: current, pinned; ARGV: adapter_id, "1" / "0"
_SET_PINNED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


class RedisBackend:
    """A client of the Redis at `url` (`redis://host:port/db`) for keys under `<prefix>:`, shared by the registry and
    the tenants' store (`tenants_redis.py`): a short socket timeout, the URL kept without its password, and every
    error a RegistryError naming that URL. Subclasses register their scripts, then call `ping()`."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(f"registry key prefix {prefix!r} must match {_PREFIX.pattern}")
        self.prefix = prefix
        # For messages and logs: never the password.
        self.url = redacted_url(url if prefix == DEFAULT_PREFIX else _with_prefix(url, prefix))
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )

    def ping(self) -> None:
        with self._errors():
            self._client.ping()

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise RegistryError(f"registry {self.url}: {exc}") from exc


class RedisRegistry(RedisBackend, Registry):
    """Registry on the Redis at `url` (`redis://host:port/db`), every key under `<prefix>:`."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(url, prefix)
        self._register = self._client.register_script(_REGISTER)
        self._remove = self._client.register_script(_REMOVE)
        self._set_pinned = self._client.register_script(_SET_PINNED)
        self.ping()

    def add_version(self, record: AdapterRecord) -> bool:
        args = [record.adapter_id, record.version, json.dumps(record.to_dict()), _flag(record.pinned)]
        with self._errors():
            return bool(self._register(keys=self._keys(record.adapter_id), args=args))

    def get(self, adapter_id: str) -> AdapterRecord | None:
        with self._errors():
            version = self._client.hget(self._key("current"), adapter_id)
        return None if version is None else self.get_version(adapter_id, str(version))

    def get_version(self, adapter_id: str, version: str) -> AdapterRecord | None:
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.hget(self._key("records", adapter_id), version)
            pipe.hget(self._key("pinned"), adapter_id)
            record_json, pinned = pipe.execute()
        return None if record_json is None else self._to_record(record_json, pinned)

    def list_current(self) -> list[AdapterRecord]:
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("current"))
            pipe.hgetall(self._key("pinned"))
            current, pinned = pipe.execute()
        ids = sorted(current)
        with self._errors(), self._client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hget(self._key("records", adapter_id), current[adapter_id])
            found = pipe.execute()
        # an id removed between the two round trips is left out: it is gone
        return [self._to_record(j, pinned.get(i)) for i, j in zip(ids, found, strict=True) if j is not None]

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.lrange(self._key("versions", adapter_id), 0, -1)
            pipe.hgetall(self._key("records", adapter_id))
            pipe.hget(self._key("pinned"), adapter_id)
            order, records, pinned = pipe.execute()
        return [self._to_record(records[v], pinned) for v in order if v in records]

    def remove(self, adapter_id: str) -> bool:
        with self._errors():
            return bool(self._remove(keys=self._keys(adapter_id), args=[adapter_id]))

    def set_pinned(self, adapter_id: str, pinned: bool) -> bool:
        with self._errors():
            return bool(self._set_pinned(keys=self._keys(adapter_id)[:2], args=[adapter_id, _flag(pinned)]))

    def _key(self, kind: str, adapter_id: str | None = None) -> str:
        return f"{self.prefix}:{kind}" if adapter_id is None else f"{self.prefix}:{kind}:{adapter_id}"

    def _keys(self, adapter_id: str) -> list[str]:
        return [self._key("current"), self._key("pinned"),
                self._key("versions", adapter_id), self._key("records", adapter_id)]

    def _to_record(self, record_json: str, pinned: str | None) -> AdapterRecord:
        try:
            record = AdapterRecord.from_dict(json.loads(record_json))
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(f"registry {self.url}: corrupt record: {exc}") from exc
        record.pinned = pinned == "1"  # per adapter id, not per version
        return record


def _flag(pinned: bool) -> str:
    return "1" if pinned else "0"


def redacted_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def _with_prefix(url: str, prefix: str) -> str:
    """`url` with `prefix=<prefix>` in its query, the form `open_registry` reads back."""
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return parts._replace(query=query + urlencode({"prefix": prefix})).geturl()
