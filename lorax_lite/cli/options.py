"""Command-line options built from a config dataclass's fields, so names, defaults, types and help are
written once, in the dataclass (`field(default=..., metadata={"help": ...})`).

A command takes `**settings` and is decorated with `@with_options(*config_options(Config))`: typer
then sees one `--field-name` option per field. `build(Config, settings)` makes the config from the
parsed values; a value it refuses exits 2 with its message naming the options, not the fields.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

import typer

from lorax_lite.cli.common import fail

Command = TypeVar("Command", bound=Callable[..., Any])
Config = TypeVar("Config")


def option_name(field_name: str) -> str:
    """`max_num_seqs` -> `--max-num-seqs`."""
    return "--" + field_name.replace("_", "-")


def config_options(config: type, names: Iterable[str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only parameter per field of the dataclass `config` (or per field in `names`), as typer options."""
    types = typing.get_type_hints(config)  # the real types, not the strings of `from __future__ import annotations`
    by_name = {f.name: f for f in fields(config)}
    return [_parameter(by_name[name], types[name]) for name in (by_name if names is None else names)]


def _parameter(field: Field, annotation: Any) -> inspect.Parameter:
    if field.default is MISSING:
        raise TypeError(f"{field.name} has no plain default, so it cannot be a command-line option")
    name = option_name(field.name)
    if annotation is bool:  # a switch: `--enable-x` / `--no-enable-x`
        name = f"{name}/--no-{name[2:]}"
    option = typer.Option(field.default, name, help=field.metadata["help"])
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def with_options(*parameters: inspect.Parameter) -> Callable[[Command], Command]:
    """Decorator: the command's signature (which typer reads), with `parameters` in place of its `**settings`."""

    def add(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=[*own, *parameters])  # type: ignore[attr-defined]
        return command

    return add


def build(config: type[Config], settings: dict[str, Any], **given: Any) -> Config:
    """`config` from `given` and its fields' values in `settings`; a ValueError exits 2, naming options, not fields."""
    values = {f.name: settings[f.name] for f in fields(config) if f.name in settings}  # type: ignore[arg-type]
    try:
        return config(**given, **values)
    except ValueError as error:
        fail(name_options(str(error), values))


def name_options(message: str, field_names: Iterable[str]) -> str:
    """`message` with each of `field_names` written as its option ("max_loras must be" -> "--max-loras must be")."""
    names = sorted(field_names)
    if not names:
        return message
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda match: option_name(match.group()), message)
