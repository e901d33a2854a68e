"""`lorax-lite keys ...` and `lorax-lite usage`: tenants' API keys and their usage, kept in the registry.

A new or rotated key is printed once, alone on the last line of stdout; the registry keeps only its salted hash,
so a lost key cannot be shown again (rotate it). Keys are never deleted, only revoked.

Exit codes, as for `adapters`: 0 success (revoking a revoked key too); 2 bad input (tenant, adapter ids, limits,
a date, an expiry in the past, an unknown key id, rotating a revoked or expired key, a malformed registry URL),
one line on stderr and nothing written; 1 other failures: the registry cannot be reached (the message names its
URL, never its password). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from lorax_lite.cli.common import AsJson, RegistryUrl, fail, one_line, opened, table
from lorax_lite.registry.tenants import (
    ALL_ADAPTERS,
    KeyExistsError,
    KeyRecord,
    TenantError,
    TenantStore,
    UsageRow,
    check_tenant,
    full_key,
    new_key,
    new_secret,
    parse_expiry,
    parse_key_id,
)

NEW_KEY_ATTEMPTS = 5  # ids are 48 random bits: a second draw is already rare
SHOWN_ONCE = "This key is shown only this once (the registry keeps only its hash): store it now."

keys_app = typer.Typer(
    name="keys",
    help="Tenants' API keys: create, list, revoke, rotate. Keys live in the registry, hashed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

KeyId = Annotated[str, typer.Argument(help="Key id: llk_<12 hex digits> (as `keys list` shows it) or the digits.",
                                      show_default=False)]


@keys_app.command("create")
def create_command(
    tenant: Annotated[str, typer.Option(
        "--tenant", help="Business unit the key belongs to: 1-64 letters, digits, '.', '_' or '-'.",
        show_default=False)],
    adapters: Annotated[str, typer.Option(
        "--adapters", help="Adapter ids the key may use, comma-separated, or '*' for every adapter.")] = "",
    base_model: Annotated[bool, typer.Option(
        "--base-model", help="The key may also use the base model without an adapter.")] = False,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute (default: no limit).")] = None,
    tpm: Annotated[int | None, typer.Option(
        "--tpm", help="Tokens per minute, prompt and generated (default: no limit).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(
        "--max-concurrent", help="Requests in flight at once (default: no limit).")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Last day it works (YYYY-MM-DD, UTC) or an ISO 8601 time (default: never).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Admin role: may also read /metrics.")] = False,
    name: Annotated[str, typer.Option("--name", help="A label for listings.")] = "",
    registry_url: RegistryUrl = None,
) -> None:
    """Create a key for a tenant; the key is printed once, on the last line."""
    from lorax_lite.registry.factory import default_registry_url, open_registry, open_tenant_store

    url = registry_url or default_registry_url()
    with _errors():
        settings: dict[str, Any] = dict(
            tenant=tenant, adapters=_adapter_ids(adapters), base_model=base_model, role="admin" if admin else "user",
            name=name, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
            expires_at=None if expires is None else parse_expiry(expires))
        new_key(**settings)  # checks every setting before the registry is opened
        with opened(open_registry, url) as registry:
            registered = {record.adapter_id for record in registry.list_current()}
        if unknown := [a for a in settings["adapters"] if a != ALL_ADAPTERS and a not in registered]:
            typer.echo(f"warning: not registered (yet) in {registry.url}: {', '.join(unknown)}; the key will "
                       "allow them once they are", err=True)
        with opened(open_tenant_store, url) as store:
            key, record = _add_new_key(store, settings)
    _echo_key(f"created key {record.display_id} for tenant {record.tenant}", record, key)


@keys_app.command("list")
def list_command(as_json: AsJson = False, registry_url: RegistryUrl = None) -> None:
    """List every key (never a key's secret or hash), oldest first."""
    with _store(registry_url) as store:
        records = store.list_keys()
    if as_json:
        typer.echo(json.dumps([record.public_dict() for record in records], indent=2))
    elif not records:
        typer.echo("no API keys (a server asks for none until the first key is created)")
    else:
        typer.echo(_table(records))


@keys_app.command("revoke")
def revoke_command(key_id: KeyId, registry_url: RegistryUrl = None) -> None:
    """Revoke a key for good (it is kept, so its usage stays attributed)."""
    with _errors():
        key_id = parse_key_id(key_id)
    with _store(registry_url) as store:
        record = _get(store, key_id)
        if record.revoked_at is not None:
            typer.echo(f"{record.display_id} was revoked already, at {_utc(record.revoked_at)}: nothing changed")
            return
        record.revoked_at = time.time()
        _update(store, record)
    typer.echo(f"revoked {record.display_id} of tenant {record.tenant}")


@keys_app.command("rotate")
def rotate_command(key_id: KeyId, registry_url: RegistryUrl = None) -> None:
    """Give a key a new secret, same id and settings; the old secret stops working. Printed once, on the last line."""
    with _errors():
        key_id = parse_key_id(key_id)
    with _store(registry_url) as store:
        record = _get(store, key_id)
        if (status := record.status()) != "active":
            fail(f"{record.display_id} is {status}: it cannot be rotated; create a new key (`lorax-lite keys create`)")
        secret, record.secret_hash = new_secret()
        record.rotated_at = time.time()
        _update(store, record)
    _echo_key(f"rotated key {record.display_id} of tenant {record.tenant}: the old key no longer works", record,
              full_key(record.key_id, secret))


def usage_command(
    since: Annotated[str | None, typer.Option(
        "--since", help="First day to show (YYYY-MM-DD, UTC; default: every day recorded).")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant (default: all).")] = None,
    as_json: AsJson = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Requests and tokens per day, tenant, key and adapter (or base model), with a total, for charge-back."""
    with _errors():
        if since is not None:
            _check_day(since)
        if tenant is not None:
            check_tenant(tenant)
    with _store(registry_url) as store:
        rows = store.usage(since, tenant)
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
    elif not rows:
        typer.echo("no usage recorded" + (f" since {since}" if since else "") + (f" for {tenant}" if tenant else ""))
    else:
        typer.echo(_usage_table(rows))


# ---- helpers ---------------------------------------------------------------------------------


@contextmanager
def _errors() -> Iterator[None]:
    """Bad settings exit 2 with their message on one line."""
    try:
        yield
    except TenantError as exc:
        fail(one_line(exc))


@contextmanager
def _store(url: str | None) -> Iterator[TenantStore]:
    from lorax_lite.registry.factory import default_registry_url, open_tenant_store  # imports the redis client

    with opened(open_tenant_store, url or default_registry_url()) as store:
        yield store


def _adapter_ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_new_key(store: TenantStore, settings: dict[str, Any]) -> tuple[str, KeyRecord]:
    """A new key with `settings`, stored; another id is drawn while the drawn one is taken."""
    for _ in range(NEW_KEY_ATTEMPTS):
        key, record = new_key(**settings)
        try:
            store.add_key(record)
        except KeyExistsError:
            continue
        return key, record
    fail(f"no free key id in {NEW_KEY_ATTEMPTS} random draws: is {store.url} shared with something else?", code=1)


def _get(store: TenantStore, key_id: str) -> KeyRecord:
    record = store.get_key(key_id)
    if record is None:
        fail(f"unknown key llk_{key_id}: not in the registry {store.url} (see `lorax-lite keys list`)")
    return record


def _update(store: TenantStore, record: KeyRecord) -> None:
    if not store.update_key(record):
        fail(f"key {record.display_id} is not in the registry {store.url}, or was revoked meanwhile (see "
             "`lorax-lite keys list`)")


def _check_day(text: str) -> None:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        dt.date.fromisoformat(text)
    except ValueError:
        raise TenantError(f"invalid day {text!r}: use YYYY-MM-DD (UTC)") from None


def _echo_key(headline: str, record: KeyRecord, key: str) -> None:
    """The headline, the key's settings, the shown-once warning, then the key alone on the last line."""
    adapters = "every adapter (*)" if ALL_ADAPTERS in record.adapters else ", ".join(record.adapters) or "none"
    limits = [f"{value} {unit}" for value, unit in ((record.rpm, "requests/min"), (record.tpm, "tokens/min"),
                                                    (record.max_concurrent, "concurrent")) if value is not None]
    fields = [("tenant", record.tenant), ("name", record.name or "-"), ("adapters", adapters),
              ("base model", "yes" if record.base_model else "no"), ("role", record.role),
              ("limits", ", ".join(limits) or "none"),
              ("expires", "never" if record.expires_at is None else _utc(record.expires_at))]
    typer.echo("\n".join([headline, *(f"  {label + ':':<12}{value}" for label, value in fields), SHOWN_ONCE, key]))


def _table(records: list[KeyRecord]) -> str:
    header = ("ID", "TENANT", "NAME", "ROLE", "ADAPTERS", "BASE", "RPM", "TPM", "CONC", "EXPIRES", "STATUS", "CREATED")
    rows = [header] + [(r.display_id, r.tenant, r.name or "-", r.role, ",".join(r.adapters) or "-",
                        "yes" if r.base_model else "no", _limit(r.rpm), _limit(r.tpm), _limit(r.max_concurrent),
                        "never" if r.expires_at is None else _utc(r.expires_at), r.status(), _utc(r.created_at))
                       for r in records]
    return table(rows)


def _usage_table(rows: list[UsageRow]) -> str:
    header = ("DAY", "TENANT", "KEY", "ADAPTER", "REQUESTS", "PROMPT_TOKENS", "GENERATED_TOKENS", "TOTAL_TOKENS")
    counts = [(r.requests, r.prompt_tokens, r.generated_tokens, r.prompt_tokens + r.generated_tokens) for r in rows]
    totals = tuple(sum(column) for column in zip(*counts, strict=True))
    cells = [header] + [(r.day, r.tenant, r.key_id, r.adapter, *map(str, c)) for r, c in zip(rows, counts, strict=True)]
    cells.append(("TOTAL", "", "", "", *map(str, totals)))
    return table(cells, right=(4, 5, 6, 7))


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
