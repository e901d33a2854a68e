"""`lorax-lite serve`: the base model and every registered adapter over HTTP.

Its engine options are EngineConfig's fields and its limits are ServerLimits' (see options.py). The
server and torch are imported when the command runs, so other commands start without them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import typer

from lorax_lite.cli.common import fail
from lorax_lite.cli.options import build, config_options, name_options, with_options
from lorax_lite.config import EngineConfig, ServerLimits, default_model

AUDIT_STDOUT = "-"

if TYPE_CHECKING:
    from lorax_lite.cluster.launch import ReplicaOptions
    from lorax_lite.server.build import ServerSpec

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
    num_replicas: int = typer.Option(1, "--num-replicas", help=(
        "Serve with this many replicas on Ray Serve, routed by adapter (needs `pip install 'lorax-lite[cluster]'` "
        "and, above 1, a redis:// registry). 1 without --ray-address: this process alone.")),
    ray_address: str | None = typer.Option(None, "--ray-address", help=(
        "Join this Ray cluster ('auto': the one `ray start` began on this node) instead of starting Ray here.")),
    replica_cpus: float | None = typer.Option(None, "--replica-cpus", help=(
        "CPUs Ray reserves for each replica, also its torch threads (default: this machine's cores shared out "
        "when Ray starts here, else 1).")),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", help=(
        "GPUs Ray reserves for each replica (0.5: two replicas share one).")),
    max_ongoing_requests: int | None = typer.Option(None, "--max-ongoing-requests", help=(
        "Requests in flight on one replica before Ray routes elsewhere (default: --max-num-seqs).")),
    max_models_per_replica: int | None = typer.Option(None, "--max-models-per-replica", help=(
        "Adapters each replica reports to Ray's router as held, least recently used dropped first (default: "
        "--max-cpu-loras).")),
    **settings: Any,
) -> None:
    """Serve the base model and every registered adapter over HTTP (LoRAX-native and OpenAI-compatible APIs).

    Once the registry holds an API key (`lorax-lite keys create`), every route but /health and /ready needs
    one. SIGTERM drains: in-flight requests finish (within the shutdown timeout) while new ones get a 503;
    the exit status is 0 after a drain, 1 if the engine died."""
    from lorax_lite.registry.base import RegistryError
    from lorax_lite.registry.factory import default_registry_url
    from lorax_lite.server.auth import default_allowed_hosts
    from lorax_lite.server.build import ServerSpec, build_server, open_tenancy
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
    clustered = num_replicas != 1 or ray_address is not None  # 0 or less: refused by _replica_options
    replicas = _replica_options(config, num_replicas, replica_cpus, replica_gpus, max_ongoing_requests,
                                max_models_per_replica, ray_address) if clustered else None
    if not clustered:
        given = [name for name, value in (("--replica-cpus", replica_cpus), ("--replica-gpus", replica_gpus or None),
                                          ("--max-ongoing-requests", max_ongoing_requests),
                                          ("--max-models-per-replica", max_models_per_replica)) if value is not None]
        if given:
            fail(f"{', '.join(given)}: only with several replicas on Ray (--num-replicas N > 1 or --ray-address)")
    if replicas is not None and num_replicas > 1 and not registry_url.startswith(("redis://", "rediss://")):
        fail(f"--num-replicas {num_replicas} needs a registry every replica shares: --registry redis://HOST:PORT/DB "
             f"(or $LORAX_REGISTRY), not {registry_url.split('://', 1)[0]}://")
    name = served_model_name or os.path.basename(os.path.normpath(config.model))
    audit_to = None if audit_log == "off" else audit_log
    spec = ServerSpec(config, limits, registry_url, name, store, tuple(hosts), audit_to)
    try:
        audit = AuditLog(spec.audit_log)
    except OSError as error:
        fail(f"--audit-log {audit_log}: cannot be written ({error.strerror or error})")
    try:
        tenancy = open_tenancy(spec, audit)
    except RegistryError as error:
        fail(str(error), code=1)
    except ValueError as error:  # a malformed registry URL
        fail(str(error))
    keys = tenancy[2]
    if not keys and not no_auth and not is_loopback(host):
        tenancy[0].close()
        tenancy[1].close()
        fail(f"refusing to serve on {host} without API keys: anyone who can reach it could use every adapter. "
             "Create a key (`lorax-lite keys create --tenant T --adapters A`), serve on 127.0.0.1, or pass "
             "--no-auth to serve openly")
    if replicas is not None:
        tenancy[0].close()  # each replica opens its own
        tenancy[1].close()
        from lorax_lite.cluster.launch import starts_ray_here

        if starts_ray_here(ray_address):  # the replicas run here: a missing model fails now, not in each replica
            from lorax_lite.model_loader import check_model_path

            try:
                check_model_path(config.model)
            except FileNotFoundError as error:
                fail(str(error))
        raise typer.Exit(_serve_on_ray(spec, replicas, host, port, ray_address, keys))
    try:
        parts = build_server(spec, tenancy)
    except RegistryError as error:
        fail(str(error), code=1)
    except (ValueError, OSError) as error:  # missing model, CUDA absent, KV cache too small, malformed registry URL
        fail(name_options(str(error), ENGINE_SETTINGS))
    typer.echo(serve_banner(spec.served_model_name, parts.registry.url, f"http://{host}:{port}", keys))
    try:
        status = run_server(parts.app, host, port)
    finally:
        parts.close()
    if status:
        raise typer.Exit(status)


def _replica_options(config: EngineConfig, num_replicas: int, cpus: float | None, gpus: float,
                     max_ongoing_requests: int | None, max_models: int | None,
                     ray_address: str | None) -> ReplicaOptions:
    """Ray's share for each replica; refuses values Ray would refuse later, and a missing Ray."""
    from lorax_lite.cluster.launch import ReplicaOptions, starts_ray_here

    if num_replicas < 1:
        fail(f"--num-replicas must be at least 1, got {num_replicas}")
    if gpus < 0 or (cpus is not None and cpus <= 0):
        fail("--replica-cpus must be > 0 and --replica-gpus >= 0")
    for name, value in (("--max-ongoing-requests", max_ongoing_requests), ("--max-models-per-replica", max_models)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, got {value}")
    if importlib.util.find_spec("ray") is None:
        fail("several replicas run on Ray Serve, which is not installed: pip install 'lorax-lite[cluster]'")
    if cpus is None:  # on this machine alone, its cores are shared out; on a cluster, one CPU each
        cpus = (os.cpu_count() or 1) / num_replicas if starts_ray_here(ray_address) else 1.0
    return ReplicaOptions(num_replicas=num_replicas, cpus=cpus, gpus=gpus,
                          max_ongoing_requests=max_ongoing_requests or config.max_num_seqs,
                          max_models_per_replica=max_models or max(config.max_cpu_loras, 1))


def _serve_on_ray(spec: ServerSpec, replicas: ReplicaOptions, host: str, port: int, ray_address: str | None,
                  keys: bool) -> int:
    from lorax_lite.cluster.launch import ClusterError, ClusterOptions, run_cluster
    from lorax_lite.registry.redis import redacted_url

    typer.echo(serve_banner(spec.served_model_name, redacted_url(spec.registry_url), f"http://{host}:{port}", keys))
    try:
        return run_cluster(spec, replicas, ClusterOptions(host, port, ray_address, spec.limits.shutdown_timeout),
                           typer.echo)
    except ClusterError as error:
        fail(str(error), code=1)
    return 1


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
