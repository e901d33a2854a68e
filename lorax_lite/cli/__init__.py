"""`lorax-lite`: the command line. Each command is a thin layer over the library; bad input exits 2 with a message.

Imports point one way: this module registers the commands (generate.py, serve.py, chat.py,
adapters.py), which share common.py and options.py; nothing in the package imports it back.
Commands import heavy modules (torch, the server) only when they run, and `serve` is built only when
it is used, so `chat` and `adapters` start at once.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from lorax_lite.cli.adapters import adapters_app
from lorax_lite.cli.chat import chat_command
from lorax_lite.cli.generate import fetch_model_command, generate_command


class _Commands(TyperGroup):
    """The top-level commands, `serve` built on first use: its options come from ServerLimits, whose
    module imports the server and torch, seconds that the other commands should not wait.

    `ctx` is click's Context, which typer vendors since 0.2x (hence Any, for both kinds).
    """

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return names if "serve" in names else [*names, "serve"]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name == "serve" and cmd_name not in self.commands:
            from lorax_lite.cli.serve import serve_app  # imports the server and torch

            self.add_command(typer.main.get_command(serve_app), cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    name="lorax-lite",
    help="Multi-LoRA LLM serving: one resident base model, many adapters.",
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("fetch-model")(fetch_model_command)
app.command("generate")(generate_command)
app.command("chat")(chat_command)
app.add_typer(adapters_app, name="adapters")


def main() -> None:
    """Entry point for `python -m lorax_lite.cli` (the `lorax-lite` script calls `app`)."""
    app()
