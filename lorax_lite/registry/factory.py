"""Open a registry from its URL (`LORAX_REGISTRY`, `--registry`)."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit

from lorax_lite.registry.base import Registry
from lorax_lite.registry.redis import DEFAULT_PREFIX, RedisRegistry
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore

DEFAULT_REGISTRY_URL = "sqlite:///data/registry.db"
URL_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "or redis://host:port/db (rediss:// for TLS) with an optional ?prefix=name (default 'lorax')"
)


def default_registry_url() -> str:
    """`LORAX_REGISTRY` if set, else the embedded default `sqlite:///data/registry.db`."""
    return os.environ.get("LORAX_REGISTRY") or DEFAULT_REGISTRY_URL


def open_registry(url: str | None = None) -> Registry:
    """The registry at `url` (default: `default_registry_url()`).

    `sqlite:///relative/path.db` (relative to the current directory), `sqlite:////abs/path.db`,
    or `redis://host:port/db[?prefix=name]`. Anything else raises ValueError; a registry that
    cannot be opened or reached raises RegistryError naming the URL.
    """
    url = default_registry_url() if url is None else url
    if url.startswith("sqlite:///"):
        return _open_sqlite(url)
    if url.startswith(("redis://", "rediss://")):
        return _open_redis(url)
    raise ValueError(f"unsupported registry URL {url!r}: use {URL_FORMS}")


def _open_sqlite(url: str) -> Registry:
    path = url.removeprefix("sqlite:///")
    if not path or path.endswith("/") or path in (":memory:", "/:memory:"):
        raise ValueError(f"registry URL {url!r} names no database file: use {URL_FORMS}")
    return SQLiteRegistry(path)


def _open_redis(url: str) -> Registry:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for key, value in query if key == "prefix"]
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
    try:
        return RedisRegistry(parts._replace(query=rest).geturl(), prefix=prefix)
    except ValueError as exc:  # a malformed host, port, db or prefix
        raise ValueError(f"bad registry URL {url!r} ({exc}): use {URL_FORMS}") from exc


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
