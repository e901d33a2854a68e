"""Open a registry, or the tenants' store kept in it, from its URL (`LORAX_REGISTRY`, `--registry`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from lorax_lite.registry.base import Registry
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.registry.tenants import TenantStore
from lorax_lite.registry.tenants_sqlite import SQLiteTenantStore

DEFAULT_REGISTRY_URL = "sqlite:///data/registry.db"
URL_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "or redis://host:port/db (rediss:// for TLS) with an optional ?prefix=name (default 'lorax')"
)
T = TypeVar("T")


def default_registry_url() -> str:
    """`LORAX_REGISTRY` if set, else the embedded default `sqlite:///data/registry.db`."""
    return os.environ.get("LORAX_REGISTRY") or DEFAULT_REGISTRY_URL


def open_registry(url: str | None = None) -> Registry:
    """The registry at `url` (default: `default_registry_url()`).

    `sqlite:///relative/path.db` (relative to the current directory), `sqlite:////abs/path.db`,
    or `redis://host:port/db[?prefix=name]`. Anything else raises ValueError; a registry that
    cannot be opened or reached raises RegistryError naming the URL.
    """
    return _open(url, SQLiteRegistry, _redis_registry)


def open_tenant_store(url: str | None = None) -> TenantStore:
    """The keys and usage kept in the registry at `url` (the same URL forms, file and prefix as `open_registry`)."""
    return _open(url, SQLiteTenantStore, _redis_tenant_store)


# redis-py is imported only for a redis:// URL: the engine and the sqlite registry run without it

def _redis_registry(url: str, prefix: str) -> Registry:
    from lorax_lite.registry.redis import RedisRegistry

    return RedisRegistry(url, prefix)


def _redis_tenant_store(url: str, prefix: str) -> TenantStore:
    from lorax_lite.registry.tenants_redis import RedisTenantStore

    return RedisTenantStore(url, prefix)


def _open(url: str | None, sqlite: Callable[[str], T], redis: Callable[[str, str], T]) -> T:
    """`sqlite(path)` or `redis(url without prefix, prefix)` for `url`, as `open_registry` documents."""
    url = default_registry_url() if url is None else url
    if url.startswith("sqlite:///"):
        return sqlite(_sqlite_path(url))
    if url.startswith(("redis://", "rediss://")):
        plain_url, prefix = _redis_prefix(url)
        try:
            return redis(plain_url, prefix)
        except ValueError as exc:  # a malformed host, port, db or prefix
            raise ValueError(f"bad registry URL {url!r} ({exc}): use {URL_FORMS}") from exc
    raise ValueError(f"unsupported registry URL {url!r}: use {URL_FORMS}")


def _sqlite_path(url: str) -> str:
    path = url.removeprefix("sqlite:///")
    if not path or path.endswith("/") or path in (":memory:", "/:memory:"):
        raise ValueError(f"registry URL {url!r} names no database file: use {URL_FORMS}")
    return path


def _redis_prefix(url: str) -> tuple[str, str]:
    """(`url` without its `prefix=` query parameters, the last prefix given or the default)."""
    from lorax_lite.registry.redis import DEFAULT_PREFIX

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for key, value in query if key == "prefix"]
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    return parts._replace(query=rest).geturl(), prefixes[-1] if prefixes else DEFAULT_PREFIX


def as_registry(registry: Registry | str | None) -> Registry | None:
    """A Registry, or one opened from a URL (sqlite:///path.db, redis://host:port/db)."""
    if registry is None or isinstance(registry, Registry):
        return registry
    return open_registry(registry)


def as_store(store: AdapterStore | str | os.PathLike | None) -> AdapterStore | None:
    """An AdapterStore, or one rooted at a directory."""
    if store is None or isinstance(store, AdapterStore):
        return store
    return AdapterStore(store)
