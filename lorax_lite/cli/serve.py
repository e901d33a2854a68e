"""`lorax-lite serve`: the base model and every registered adapter over HTTP."""

from __future__ import annotations

from typing import Optional

import typer

from lorax_lite.cli.common import fail


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model directory, .gguf or hub id (default: $LORAX_MODEL, else the fetched model)."),
    registry_url: Optional[str] = typer.Option(None, "--registry", help="Adapter registry URL (default: $LORAX_REGISTRY, else sqlite:///data/registry.db)."),
    store: Optional[str] = typer.Option(None, "--store", help="Read registered adapters from this store directory (default: the path each registry record names)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name of the base model in the APIs (default: the model directory's name)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Most sequences in one step."),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens", help="Most tokens in one step."),
    max_loras: int = typer.Option(8, "--max-loras", help="Adapters in device slots at once."),
    max_lora_rank: int = typer.Option(16, "--max-lora-rank", help="Largest adapter rank accepted."),
    max_cpu_loras: int = typer.Option(64, "--max-cpu-loras", help="Adapters cached in host memory."),
    kv_cache_memory_gb: float = typer.Option(1.0, "--kv-cache-memory-gb", help="Memory for the paged KV cache."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Longest prompt + output (default: the model's)."),
    max_queued_requests: int = typer.Option(256, "--max-queued-requests", help="Requests waiting for the engine before new ones get a 429."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body; larger ones get a 413."),
) -> None:
    """Serve the base model and every registered adapter over HTTP (LoRAX-native and OpenAI-compatible APIs)."""
    import os

    import uvicorn

    from lorax_lite.config import default_model
    from lorax_lite.engine.async_llm import AsyncLLM
    from lorax_lite.registry.base import RegistryError
    from lorax_lite.registry.factory import default_registry_url, open_registry
    from lorax_lite.server.app import create_app
    from lorax_lite.server.state import ServerLimits

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    if store is not None and not os.path.isdir(store):
        fail(f"--store {store}: not a directory")
    try:
        limits = ServerLimits(max_queued_requests=max_queued_requests, max_body_bytes=max_body_bytes)
    except ValueError as error:
        fail(str(error).replace("max_queued_requests", "--max-queued-requests").replace("max_body_bytes", "--max-body-bytes"))
    model = model or default_model()
    registry_url = registry_url or default_registry_url()
    try:
        registry = open_registry(registry_url)
        llm = AsyncLLM(model, registry=registry, store=store, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_loras=max_loras, max_lora_rank=max_lora_rank,
                       max_cpu_loras=max_cpu_loras, kv_cache_memory_gb=kv_cache_memory_gb, max_model_len=max_model_len)
    except RegistryError as error:
        fail(str(error), code=1)
    except (ValueError, OSError) as error:  # bad settings, missing model, malformed registry URL
        fail(str(error))
    name = served_model_name or os.path.basename(os.path.normpath(model))
    typer.echo(serve_banner(name, registry.url, f"http://{host}:{port}"))
    try:
        uvicorn.run(create_app(llm, name, limits), host=host, port=port, log_level="info")
    finally:
        llm.shutdown()
        registry.close()


def serve_banner(name: str, registry_url: str, base: str) -> str:
    """What `serve` prints: where it serves, and calls to paste into a terminal."""
    json_header = "-H 'Content-Type: application/json'"
    native = '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}'
    chat = f'{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 40}}'
    return "\n".join([
        f"serving {name} with adapters from {registry_url}",
        f"  curl {base}/health",
        f"  curl {base}/v1/models",
        f"  curl {base}/generate {json_header} -d '{native}'",
        f"  curl {base}/generate {json_header} -H 'adapter_id: ADAPTER' -d '{native}'",
        f"  curl {base}/v1/chat/completions {json_header} -d '{chat}'",
        f"  metrics: {base}/metrics   docs: {base}/docs",
    ])
