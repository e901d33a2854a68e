"""What every command shares: bad input exits 2 with one line on stderr, never a traceback."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error on stderr and exit with `code` (default 2: bad input or environment)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__
