"""One server's parts built from one picklable description: the same code path for `lorax-lite serve` in one
process and for every replica of a Ray Serve deployment (lorax_lite/cluster/)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI

from lorax_lite.config import EngineConfig, ServerLimits
from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.registry.base import Registry
from lorax_lite.registry.factory import open_registry, open_tenant_store
from lorax_lite.registry.tenants import TenantStore
from lorax_lite.server.app import create_app
from lorax_lite.server.auth import Tenancy
from lorax_lite.server.usage import AuditLog


@dataclass(frozen=True)
class ServerSpec:
    """Everything a server is built from; plain data, so Ray can ship it to a replica on another machine."""

    config: EngineConfig
    limits: ServerLimits
    registry_url: str
    served_model_name: str
    store: str | None = None  # read adapters from this directory instead of the paths the registry records
    allowed_hosts: tuple[str, ...] = ("*",)
    audit_log: str | None = None  # "-": stdout; a path: appended to; None: off
    replica_id: str | None = field(default=None, compare=False)  # set on Ray Serve replicas (x-replica-id, /info)


@dataclass
class ServerParts:
    """A built server: the app and what it owns. `close()` stops the engine and flushes usage."""

    app: FastAPI
    llm: AsyncLLM
    tenancy: Tenancy
    tenant_store: TenantStore
    registry: Registry
    has_keys: bool

    def close(self) -> None:
        self.llm.shutdown()
        self.tenancy.close()
        self.tenant_store.close()
        self.registry.close()


def open_tenancy(spec: ServerSpec, audit: AuditLog | None = None) -> tuple[Tenancy, TenantStore, bool]:
    """The tenant store, the Tenancy over it (with `audit`, else one opened from spec.audit_log), and whether any
    API key exists (read once here). Raises RegistryError (unreachable), ValueError (a malformed URL) or OSError
    (an audit log file that cannot be written)."""
    audit = audit or AuditLog(spec.audit_log)
    try:
        store = open_tenant_store(spec.registry_url)
    except BaseException:
        audit.close()
        raise
    tenancy = Tenancy(store, spec.allowed_hosts, audit, spec.config.registry_timeout_s, spec.config.registry_stale_s)
    try:
        has_keys = tenancy.prime()
    except BaseException:
        tenancy.close()
        store.close()
        raise
    return tenancy, store, has_keys


def build_server(spec: ServerSpec, tenancy: tuple[Tenancy, TenantStore, bool] | None = None) -> ServerParts:
    """Load the engine and build the app (the tenancy from `open_tenancy` if the caller opened it already).
    Raises RegistryError, ValueError or OSError, having closed whatever it opened."""
    tenancy_, tenant_store, has_keys = tenancy or open_tenancy(spec)
    with contextlib.ExitStack() as undo:
        undo.callback(tenant_store.close)
        undo.callback(tenancy_.close)
        registry = open_registry(spec.registry_url)
        undo.callback(registry.close)
        llm = AsyncLLM(registry=registry, store=spec.store, **asdict(spec.config))
        undo.callback(llm.shutdown)
        app = create_app(llm, spec.served_model_name, spec.limits, tenancy_, replica_id=spec.replica_id)
        undo.pop_all()
    return ServerParts(app, llm, tenancy_, tenant_store, registry, has_keys)


__all__ = ["ServerParts", "ServerSpec", "build_server", "open_tenancy"]
