"""`lorax-lite adapters ...`: register and manage adapters in the registry and the store.

`register-units` registers every shipped business-unit adapter `adapters/<unit>/` as id `<unit>`,
with the owner, description and system prompt of its `lorax.json` (what `make serve` runs).

Exit codes: 0 success; 2 bad input (bad id, unreadable or invalid adapter, shape mismatch with the
base model, pickled weights, DoRA, an id the registry does not know, a malformed registry URL or
unit lorax.json), with nothing written; 1 other failures: the registry cannot be reached (the
message names its URL), the store cannot be written, or `verify` finds a version whose files do not
match its checksum (data corruption, not bad input). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from lorax_lite.cli.common import AsJson, RegistryUrl, fail, one_line, opened, table
from lorax_lite.config import default_model
from lorax_lite.lora.errors import AdapterError
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.registry import admin
from lorax_lite.registry.admin import BaseModelError
from lorax_lite.registry.base import AdapterRecord, Registry
from lorax_lite.registry.store import AdapterStore

adapters_app = typer.Typer(
    name="adapters",
    help="Register and manage LoRA adapters: the registry says what exists, the store holds the files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

AdapterId = Annotated[str, typer.Argument(
    help="Adapter id: 1-64 letters, digits, '.', '_' or '-'.", show_default=False)]
StoreDir = Annotated[str | None, typer.Option(
    "--store", help="Store directory (default: $LORAX_STORE, else data/store).")]
ModelDir = Annotated[str | None, typer.Option(
    "--model", help="Base model directory to check shapes against (default: $LORAX_MODEL, else the fetched model).")]
UNIT_CARD_KEYS = ("owner", "description", "system_prompt")  # what a unit's lorax.json gives its registration


@adapters_app.command("register")
def register_command(
    adapter_id: AdapterId,
    path: Annotated[str, typer.Argument(
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors).")],
    owner: Annotated[str | None, typer.Option(
        "--owner", help="Business unit that owns the adapter (default: the current version's).")] = None,
    description: Annotated[str | None, typer.Option(
        "--description", help="What the adapter is for (default: the current version's).")] = None,
    system_prompt: Annotated[str | None, typer.Option(
        "--system-prompt", help="System prompt the chatbots use with it (default: the current version's).")] = None,
    pin: Annotated[bool, typer.Option("--pin", help="Keep it in the engines' host memory.")] = False,
    model: ModelDir = None,
    registry_url: RegistryUrl = None,
    store_dir: StoreDir = None,
) -> None:
    """Validate an adapter against the base model, copy it into the store and make it the id's current version."""
    with _errors():
        adapter = admin.validate(adapter_id, path, model or default_model())  # before any registry or store access
        with _registry(registry_url) as registry:
            store = AdapterStore(store_dir)
            record, created = admin.commit(registry, store, adapter, owner, description, system_prompt, pin)
    _echo_registered(record, created)


@adapters_app.command("register-units")
def register_units_command(
    adapters_dir: Annotated[str, typer.Option(
        "--adapters-dir",
        help="Directory of units: <unit>/adapter_config.json, and optionally <unit>/lorax.json.")] = "adapters",
    model: ModelDir = None,
    registry_url: RegistryUrl = None,
    store_dir: StoreDir = None,
) -> None:
    """Register every adapters/<unit>/ as id <unit>, with owner, description and system prompt from its lorax.json.

    All units are validated before anything is written; an unchanged unit is a no-op.
    """
    with _errors():
        cards = {path: _unit_card(path) for path in _unit_dirs(Path(adapters_dir))}
        model_dir = model or default_model()
        units = [(admin.validate(path.name, path, model_dir), card) for path, card in cards.items()]
        if units:
            with _registry(registry_url) as registry:
                store = AdapterStore(store_dir)
                for adapter, card in units:
                    _echo_registered(*admin.commit(registry, store, adapter, card["owner"], card["description"],
                                                   card["system_prompt"]))
    if not units:
        typer.echo(f"no adapters under {adapters_dir} (no <unit>/adapter_config.json): nothing registered")


@adapters_app.command("list")
def list_command(as_json: AsJson = False, registry_url: RegistryUrl = None) -> None:
    """List the current version of every adapter."""
    with _errors(), _registry(registry_url) as registry:
        records = registry.list_current()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
    elif not records:
        typer.echo("no adapters registered")
    else:
        typer.echo(_table(records))


@adapters_app.command("show")
def show_command(adapter_id: AdapterId, as_json: AsJson = False, registry_url: RegistryUrl = None) -> None:
    """Show an adapter's current record and all its versions."""
    with _errors(), _registry(registry_url, check_id=adapter_id) as registry:
        record = _get(registry, adapter_id)
        versions = [{"version": v.version, "created_at": v.created_at, "current": v.version == record.version}
                    for v in registry.versions(adapter_id)]
    if as_json:
        typer.echo(json.dumps({**record.to_dict(), "versions": versions}, indent=2))
    else:
        typer.echo(_details(record, versions))


@adapters_app.command("remove")
def remove_command(adapter_id: AdapterId, registry_url: RegistryUrl = None, store_dir: StoreDir = None) -> None:
    """Forget an adapter and delete all its versions from the store."""
    with _errors(), _registry(registry_url, check_id=adapter_id) as registry:
        if not registry.remove(adapter_id):
            fail(_unknown(adapter_id, registry))
        AdapterStore(store_dir).remove(adapter_id)  # after the registry: no current version ever lacks its files
    typer.echo(f"removed {adapter_id}")


@adapters_app.command("pin")
def pin_command(adapter_id: AdapterId, registry_url: RegistryUrl = None) -> None:
    """Keep the adapter in the engines' host memory (never evicted)."""
    _set_pinned(adapter_id, True, registry_url)
    typer.echo(f"pinned {adapter_id}")


@adapters_app.command("unpin")
def unpin_command(adapter_id: AdapterId, registry_url: RegistryUrl = None) -> None:
    """Let the engines evict the adapter again when it is unused."""
    _set_pinned(adapter_id, False, registry_url)
    typer.echo(f"unpinned {adapter_id}")


@adapters_app.command("verify")
def verify_command(
    adapter_id: Annotated[str | None, typer.Argument(
        help="Only this adapter (default: all).", show_default=False)] = None,
    registry_url: RegistryUrl = None,
    store_dir: StoreDir = None,
) -> None:
    """Re-check the checksum of every stored version; exit 1 if any does not match."""
    with _errors(), _registry(registry_url, check_id=adapter_id) as registry:
        if adapter_id is not None:
            _get(registry, adapter_id)
        results = admin.verify(registry, AdapterStore(store_dir), adapter_id)
    for result_id, version, ok in results:
        typer.echo(f"{'ok' if ok else 'MISMATCH':<9}{result_id}@{version[:12]}")
    if bad := [f"{i}@{v[:12]}" for i, v, ok in results if not ok]:
        fail(f"{len(bad)} version(s) do not match their checksum (corrupt store): {', '.join(bad)}; "
              "register them again", code=1)
    if not results:
        typer.echo("no adapters registered")


# ---- helpers ---------------------------------------------------------------------------------


@contextmanager
def _errors() -> Iterator[None]:
    """Bad input exits 2, a store that cannot be written exits 1; one line on stderr either way."""
    try:
        yield
    except (AdapterError, BaseModelError) as exc:
        fail(one_line(exc))
    except OSError as exc:
        fail(f"store: {one_line(exc)}", code=1)


@contextmanager
def _registry(url: str | None, check_id: str | None = None) -> Iterator[Registry]:
    """The registry at `url`; a malformed URL exits 2, one that cannot be reached exits 1 naming it.

    `check_id`, when given, is checked first: a bad id never reaches the registry.
    """
    from lorax_lite.registry.factory import default_registry_url, open_registry  # imports the redis client

    if check_id is not None:
        check_adapter_id(check_id)
    with opened(open_registry, url or default_registry_url()) as registry:
        yield registry


def _echo_registered(record: AdapterRecord, created: bool) -> None:
    pinned = " (pinned)" if record.pinned else ""
    if created:
        typer.echo(f"registered {record.adapter_id} version {record.version[:12]}{pinned}")
    else:
        typer.echo(f"{record.adapter_id} is already at version {record.version[:12]}: nothing changed{pinned}")


def _unit_dirs(adapters_dir: Path) -> list[Path]:
    """`adapters_dir/<unit>/` with an adapter_config.json, in name order; untrained units are named and skipped."""
    if not adapters_dir.is_dir():
        fail(f"--adapters-dir {adapters_dir}: not a directory")
    dirs = sorted(d for d in adapters_dir.iterdir() if d.is_dir())
    for d in dirs:
        if not (d / "adapter_config.json").is_file():
            typer.echo(f"skipping {d}: no adapter_config.json (not trained yet?)", err=True)
    return [d for d in dirs if (d / "adapter_config.json").is_file()]


def _unit_card(unit_dir: Path) -> dict[str, str | None]:
    """owner, description and system_prompt from `unit_dir/lorax.json`; None for each one it (or the file) lacks."""
    path = unit_dir / "lorax.json"
    if not path.exists():
        return dict.fromkeys(UNIT_CARD_KEYS)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: not a readable JSON file ({one_line(exc)})")
    if not isinstance(card, dict):
        fail(f"{path}: expected a JSON object with {', '.join(UNIT_CARD_KEYS)}, got {type(card).__name__}")
    if bad := [key for key in UNIT_CARD_KEYS if not isinstance(card.get(key, ""), str)]:
        fail(f"{path}: {', '.join(bad)} must be a string")
    return {key: card.get(key) for key in UNIT_CARD_KEYS}


def _get(registry: Registry, adapter_id: str) -> AdapterRecord:
    record = registry.get(adapter_id)
    if record is None:
        fail(_unknown(adapter_id, registry))
    return record


def _set_pinned(adapter_id: str, pinned: bool, registry_url: str | None) -> None:
    with _errors(), _registry(registry_url, check_id=adapter_id) as registry:
        if not registry.set_pinned(adapter_id, pinned):
            fail(_unknown(adapter_id, registry))


def _unknown(adapter_id: str, registry: Registry) -> str:
    return f"unknown adapter {adapter_id!r}: not in the registry {registry.url} (see `lorax-lite adapters list`)"


def _table(records: list[AdapterRecord]) -> str:
    header = ("ID", "VERSION", "OWNER", "RANK", "PINNED", "SIZE", "CREATED")
    rows = [header] + [(r.adapter_id, r.version[:12], r.owner or "-", str(r.rank), "yes" if r.pinned else "no",
                        _size(r.size_bytes), _time(r.created_at)) for r in records]
    return table(rows)


def _details(record: AdapterRecord, versions: list[dict]) -> str:
    fields = [
        ("adapter_id", record.adapter_id), ("version", record.version), ("owner", record.owner),
        ("description", record.description), ("system_prompt", record.system_prompt),
        ("base_model", record.base_model), ("rank", record.rank), ("alpha", record.alpha),
        ("target_modules", ", ".join(record.target_modules)),
        ("size", f"{_size(record.size_bytes)} ({record.size_bytes} bytes)"),
        ("pinned", "yes" if record.pinned else "no"), ("created", _time(record.created_at)),
        ("store_path", record.store_path),
    ]
    lines = [f"{name + ':':<16}{value}" for name, value in fields]
    lines.append("versions (oldest first):")
    lines += [f"  {v['version'][:12]}  {_time(v['created_at'])}{'  (current)' if v['current'] else ''}"
              for v in versions]
    return "\n".join(lines)


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
