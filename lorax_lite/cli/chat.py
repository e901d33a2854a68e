"""`lorax-lite chat`: a terminal chat with one business unit's assistant on a running server.

Answers stream as they are generated; the conversation is kept until `/reset`; `/exit` (or Ctrl-D)
leaves. The server adds the adapter's registered system prompt. On a server with API keys, pass
`--api-key` or set LORAX_API_KEY (the key is never echoed). Only `lorax_lite.client` is imported (no
torch), and only when a chat starts, so every command starts at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import typer

from lorax_lite.cli.common import fail

if TYPE_CHECKING:
    from lorax_lite.client import Client

HELP = "Type a question. /reset starts a new conversation, /exit leaves."
EXIT_COMMANDS = {"/exit", "/quit"}


def chat_command(
    adapter: str | None = typer.Option(
        None, "--adapter", help="The business unit's adapter id (default: the base model)."),
    url: str = typer.Option("http://127.0.0.1:8080", "--url", help="The lorax-lite server."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens in one answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="LORAX_API_KEY", show_envvar=True, show_default=False,
        help="The API key, for a server that asks for one."),
) -> None:
    """Chat with a business unit's assistant on a running server (streaming; /reset, /exit)."""
    if max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    if not 0 <= temperature <= 2:
        fail(f"--temperature must be in 0..2, got {temperature}")
    try:
        client = open_chat(url, adapter, api_key=api_key)
    except ChatError as error:
        fail(str(error), code=error.code)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with client:
        run_chat(client, adapter, input, write, max_tokens=max_tokens, temperature=temperature)


class ChatError(Exception):
    """The chat cannot start (server down, key refused, unknown adapter); `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def open_chat(url: str, adapter: str | None, timeout: float = 120.0, api_key: str | None = None) -> Client:
    """A client for the server at `url`, after checking that it answers, takes the API key (None:
    $LORAX_API_KEY) and knows `adapter`."""
    from lorax_lite.client import (
        AuthenticationError,
        Client,
        LoraxLiteError,
        PermissionDeniedError,
        ServerUnavailableError,
    )

    client = Client(url, timeout=timeout, api_key=api_key)
    try:
        models = client.models()
    except ServerUnavailableError as exc:
        client.close()
        hint = "is the server running? start it with `make serve` (or `lorax-lite serve`)"
        raise ChatError(f"{exc}\n  {hint}", code=1) from exc
    except AuthenticationError as exc:
        client.close()
        has_key = bool(os.environ.get("LORAX_API_KEY") if api_key is None else api_key)
        refused = f"refused the API key ({exc.message})" if has_key else "needs an API key"
        raise ChatError(f"the server at {url} {refused}: pass --api-key or set LORAX_API_KEY", code=2) from exc
    except PermissionDeniedError as exc:
        client.close()
        raise ChatError(f"the API key may not do this on {url}: {exc.message}", code=2) from exc
    except LoraxLiteError as exc:
        client.close()
        raise ChatError(f"{url} does not look like a lorax-lite server: {exc}", code=1) from exc
    if adapter is not None and adapter not in models:
        client.close()
        raise ChatError(f"unknown adapter {adapter!r} on {url}; available: {', '.join(models[1:]) or 'none'} "
                        f"(or leave out --adapter for the base model {models[0]})", code=2)
    return client


def run_chat(
    client: Client, adapter: str | None, read: Callable[[str], str], write: Callable[[str], None],
    max_tokens: int = 256, temperature: float = 0.0,
) -> None:
    """The loop: read a line, stream the answer, keep the history; errors are shown and the turn dropped."""
    from lorax_lite.client import LoraxLiteError, UnknownAdapterError

    history: list[dict[str, str]] = []
    name = adapter or "base model"
    write(f"Chatting with {name} at {client.base_url}. {HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in EXIT_COMMANDS:
            return
        if line == "/reset":
            history.clear()
            write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line}. {HELP}\n")
            continue
        turn = {"role": "user", "content": line}
        write(f"{name}> ")
        try:
            answer = "".join(_echo(client.chat_stream(history + [turn], adapter_id=adapter, max_tokens=max_tokens,
                                                      temperature=temperature), write))
        except UnknownAdapterError:
            write(f"\nerror: the adapter {adapter!r} is no longer registered on the server\n")
            continue
        except LoraxLiteError as exc:
            write(f"\nerror: {exc}\n")
            continue
        write("\n")
        history += [turn, {"role": "assistant", "content": answer}]


def _echo(deltas: Iterator[str], write: Callable[[str], None]) -> Iterator[str]:
    for delta in deltas:
        write(delta)
        yield delta
