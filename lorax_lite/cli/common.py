"""What every command shares: bad input exits 2 with one line on stderr, never a traceback; the registry
commands' options, opening of the registry (or the tenants' store in it) and tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, NoReturn, Protocol, TypeVar

import typer

from lorax_lite.registry.base import RegistryError

RegistryUrl = Annotated[str | None, typer.Option(
    "--registry", help="Registry URL: sqlite:///path.db or redis://host:port/db (default: $LORAX_REGISTRY, else sqlite:///data/registry.db).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Closable(Protocol):
    def close(self) -> None: ...


Backend = TypeVar("Backend", bound=Closable)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error on stderr and exit with `code` (default 2: bad input or environment)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def opened(open_backend: Callable[[str], Backend], url: str) -> Iterator[Backend]:
    """`open_backend(url)` (a registry, or the tenants' store in it), closed after. A malformed URL exits 2; a
    backend that cannot be opened or used exits 1, the message naming its URL (never its password)."""
    try:
        backend = open_backend(url)
    except RegistryError as exc:
        fail(naming_url(exc, url), code=1)
    except ValueError as exc:
        fail(one_line(exc))
    try:
        yield backend
    except RegistryError as exc:
        fail(naming_url(exc, url), code=1)
    finally:
        backend.close()


def naming_url(error: RegistryError, url: str) -> str:
    """`error`'s message, prefixed by the registry's URL (without its password) unless it names it already."""
    from lorax_lite.registry.redis import redacted_url  # imports the redis client: only when something failed

    message, shown = one_line(error), redacted_url(url)
    return message if shown in message else f"registry {shown}: {message}"


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """`rows` (the first is the header) in columns two spaces apart; the columns in `right` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)
