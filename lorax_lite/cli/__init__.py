"""`lorax-lite`: the command line. Each command is a thin layer over the library; bad input exits 2 with a message.

Imports point one way: this module registers the commands (generate.py, serve.py, chat.py,
adapters.py, keys.py), which share common.py and options.py; nothing in the package imports it back.
Commands import heavy modules (torch, the server) only when they run, so `chat`, `adapters` and `keys` start at once.
"""

from __future__ import annotations

import typer

from lorax_lite.cli.adapters import adapters_app
from lorax_lite.cli.chat import chat_command
from lorax_lite.cli.generate import fetch_model_command, generate_command
from lorax_lite.cli.keys import keys_app, usage_command
from lorax_lite.cli.serve import serve_command

app = typer.Typer(
    name="lorax-lite",
    help="Multi-LoRA LLM serving: one resident base model, many adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("fetch-model")(fetch_model_command)
app.command("generate")(generate_command)
app.command("serve")(serve_command)
app.command("chat")(chat_command)
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.command("usage")(usage_command)


def main() -> None:
    """Entry point for `python -m lorax_lite.cli` (the `lorax-lite` script calls `app`)."""
    app()
