"""`lorax-lite serve`: the base model and every registered adapter over HTTP.

Its engine options are EngineConfig's fields and its limits are ServerLimits' (see options.py). The
server and torch are imported when the command runs, so other commands start without them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from typing import Any

import typer

from lorax_lite.cli.common import fail
from lorax_lite.cli.options import build, config_options, name_options, with_options
from lorax_lite.config import EngineConfig, ServerLimits, default_model

ENGINE_SETTINGS = [f.name for f in fields(EngineConfig) if f.name != "model"]  # serve takes the model as --model


@with_options(*config_options(EngineConfig, ENGINE_SETTINGS), *config_options(ServerLimits))
def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    model: str | None = typer.Option(
        None, "--model", help="Base model directory, .gguf or hub id (default: $LORAX_MODEL, else the fetched model)."),
    registry_url: str | None = typer.Option(
        None, "--registry", help="Adapter registry URL (default: $LORAX_REGISTRY, else sqlite:///data/registry.db)."),
    store: str | None = typer.Option(None, "--store", help=(
        "Read registered adapters from this store directory (default: the path each registry record names).")),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Name of the base model in the APIs (default: the model directory's name)."),
    **settings: Any,
) -> None:
    """Serve the base model and every registered adapter over HTTP (LoRAX-native and OpenAI-compatible APIs).

    SIGTERM drains: in-flight requests finish (within the shutdown timeout) while new ones get a 503;
    the exit status is 0 after a drain, 1 if the engine died."""
    from lorax_lite.engine.async_llm import AsyncLLM
    from lorax_lite.registry.base import RegistryError
    from lorax_lite.registry.factory import default_registry_url, open_registry
    from lorax_lite.server.app import create_app
    from lorax_lite.server.serving import run_server

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    if store is not None and not os.path.isdir(store):
        fail(f"--store {store}: not a directory")
    limits = build(ServerLimits, settings)
    config = build(EngineConfig, settings, model=model or default_model())  # bad settings fail before any loading
    registry_url = registry_url or default_registry_url()
    try:
        registry = open_registry(registry_url)
        llm = AsyncLLM(registry=registry, store=store, **asdict(config))
    except RegistryError as error:
        fail(str(error), code=1)
    except (ValueError, OSError) as error:  # missing model, CUDA absent, KV cache too small, malformed registry URL
        fail(name_options(str(error), ENGINE_SETTINGS))
    name = served_model_name or os.path.basename(os.path.normpath(config.model))
    typer.echo(serve_banner(name, registry.url, f"http://{host}:{port}"))
    try:
        status = run_server(create_app(llm, name, limits), host, port)
    finally:
        llm.shutdown()
        registry.close()
    if status:
        raise typer.Exit(status)


def serve_banner(name: str, registry_url: str, base: str) -> str:
    """What `serve` prints: where it serves, and calls to paste into a terminal."""
    json_header = "-H 'Content-Type: application/json'"
    native = '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}'
    question = '{"role": "user", "content": "What is the capital of France?"}'
    chat = f'{{"model": "{name}", "messages": [{question}], "max_tokens": 40}}'
    return "\n".join([
        f"serving {name} with adapters from {registry_url}",
        f"  curl {base}/health   (liveness; {base}/ready is readiness)",
        f"  curl {base}/v1/models",
        f"  curl {base}/generate {json_header} -d '{native}'",
        f"  curl {base}/generate {json_header} -H 'adapter_id: ADAPTER' -d '{native}'",
        f"  curl {base}/v1/chat/completions {json_header} -d '{chat}'",
        f"  metrics: {base}/metrics   docs: {base}/docs",
    ])
