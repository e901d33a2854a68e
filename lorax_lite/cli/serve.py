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

AUDIT_STDOUT = "-"

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
    no_auth: bool = typer.Option(False, "--no-auth", help=(
        "Serve on a non-loopback address although the registry holds no API keys (anyone who can reach it may use "
        "every adapter). Keys that exist are always required.")),
    allowed_hosts: str | None = typer.Option(None, "--allowed-hosts", help=(
        "Comma-separated Host header names the server answers to ('.example.com' a domain and its subdomains, '*' "
        "any; default: localhost, 127.0.0.1 and ::1 on a loopback address, else any).")),
    audit_log: str = typer.Option(AUDIT_STDOUT, "--audit-log", help=(
        "Where the audit log of denied requests goes: '-' stdout, a file path (appended), or 'off'.")),
    **settings: Any,
) -> None:
    """Serve the base model and every registered adapter over HTTP (LoRAX-native and OpenAI-compatible APIs).

    Once the registry holds an API key (`lorax-lite keys create`), every route but /health and /ready needs
    one. SIGTERM drains: in-flight requests finish (within the shutdown timeout) while new ones get a 503;
    the exit status is 0 after a drain, 1 if the engine died."""
    from lorax_lite.engine.async_llm import AsyncLLM
    from lorax_lite.registry.base import RegistryError
    from lorax_lite.registry.factory import default_registry_url, open_registry, open_tenant_store
    from lorax_lite.server.app import create_app
    from lorax_lite.server.auth import Tenancy, default_allowed_hosts
    from lorax_lite.server.serving import run_server
    from lorax_lite.server.usage import AuditLog

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    if store is not None and not os.path.isdir(store):
        fail(f"--store {store}: not a directory")
    hosts = _host_list(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(host)
    limits = build(ServerLimits, settings)
    config = build(EngineConfig, settings, model=model or default_model())  # bad settings fail before any loading
    registry_url = registry_url or default_registry_url()
    try:
        audit = AuditLog(None if audit_log == "off" else audit_log)
    except OSError as error:
        fail(f"--audit-log {audit_log}: cannot be written ({error.strerror or error})")
    try:
        tenant_store = open_tenant_store(registry_url)
        tenancy = Tenancy(tenant_store, hosts, audit, config.registry_timeout_s, config.registry_stale_s)
        keys = tenancy.prime()
    except RegistryError as error:
        fail(str(error), code=1)
    except ValueError as error:  # a malformed registry URL
        fail(str(error))
    if not keys and not no_auth and not is_loopback(host):
        tenancy.close()
        fail(f"refusing to serve on {host} without API keys: anyone who can reach it could use every adapter. "
             "Create a key (`lorax-lite keys create --tenant T --adapters A`), serve on 127.0.0.1, or pass "
             "--no-auth to serve openly")
    try:
        registry = open_registry(registry_url)
        llm = AsyncLLM(registry=registry, store=store, **asdict(config))
    except RegistryError as error:
        tenancy.close()
        fail(str(error), code=1)
    except (ValueError, OSError) as error:  # missing model, CUDA absent, KV cache too small, malformed registry URL
        tenancy.close()
        fail(name_options(str(error), ENGINE_SETTINGS))
    name = served_model_name or os.path.basename(os.path.normpath(config.model))
    typer.echo(serve_banner(name, registry.url, f"http://{host}:{port}", keys))
    try:
        status = run_server(create_app(llm, name, limits, tenancy), host, port)
    finally:
        llm.shutdown()
        tenancy.close()
        tenant_store.close()
        registry.close()
    if status:
        raise typer.Exit(status)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _host_list(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        fail("--allowed-hosts: give at least one host name (or '*' for any)")
    return hosts


def serve_banner(name: str, registry_url: str, base: str, keys: bool = False) -> str:
    """What `serve` prints: where it serves, whether it needs keys, and calls to paste into a terminal."""
    json_header = "-H 'Content-Type: application/json'"
    auth = " -H 'Authorization: Bearer $LORAX_API_KEY'" if keys else ""
    native = '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}'
    question = '{"role": "user", "content": "What is the capital of France?"}'
    chat = f'{{"model": "{name}", "messages": [{question}], "max_tokens": 40}}'
    access = ("API keys are required (Authorization: Bearer KEY or X-API-Key: KEY)" if keys else
              "no API keys yet: anyone who can reach this address may use every adapter; create one with "
              "`lorax-lite keys create --tenant T --adapters A` to require keys (within a second, no restart)")
    return "\n".join([
        f"serving {name} with adapters from {registry_url}",
        f"  {access}",
        f"  curl {base}/health   (liveness; {base}/ready is readiness)",
        f"  curl{auth} {base}/v1/models",
        f"  curl{auth} {base}/generate {json_header} -d '{native}'",
        f"  curl{auth} {base}/generate {json_header} -H 'adapter_id: ADAPTER' -d '{native}'",
        f"  curl{auth} {base}/v1/chat/completions {json_header} -d '{chat}'",
        f"  chat: {base}/chat   metrics: {base}/metrics   docs: {base}/docs",
    ])
