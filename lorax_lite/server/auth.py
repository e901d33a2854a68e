"""Tenants at the HTTP boundary: who calls (an API key and its record), what it may use, its rate limits, its
usage, and the audit line of every denied request.

`TenantMiddleware` runs on every request before any route: it checks the Host header against the allow-list
(DNS rebinding), then, whenever the tenant store holds at least one key, the key (`Authorization: Bearer KEY` or
`X-API-Key: KEY`) on every path but /health, /ready and the static files; /metrics needs the admin role. A
missing, malformed, unknown, revoked or expired key is a 401 in the route family's body with
`WWW-Authenticate` (an HTML page asking for the key on the browser pages). The caller becomes a Principal on
the request's scope, which the routes consult: an adapter the key may not use is answered exactly like an
unknown one (404), the base model without permission is a 403, and listings show only what the key may use.

Key records are read from the store in worker threads through a Guard (deadline, breaker) and kept for at most
KEY_REFRESH_S, so a revoked or expired key stops working within a second on every replica sharing the store.
While the store is unreachable, a key checked within `stale_s` keeps working, and other keys get a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from lorax_lite.registry.base import RegistryError
from lorax_lite.registry.guard import Guard
from lorax_lite.registry.tenants import (
    ANONYMOUS_TENANT,
    Decision,
    KeyRecord,
    LocalRateLimiter,
    RateLimiter,
    TenantStore,
    secret_matches,
    split_key,
)
from lorax_lite.server.errors import OPENAI_PATH_PREFIX, REQUEST_ID, RETRY_AFTER_SECONDS, ServerError, brief
from lorax_lite.server.pages import key_page
from lorax_lite.server.usage import AuditLog, UsageRecorder

logger = logging.getLogger(__name__)

KEY_REFRESH_S = 0.5  # a key's record (revocation, expiry, limits) is read again after this long
PUBLIC_PATHS = frozenset({"/health", "/ready"})  # probes: no key, no Host check
STATIC_PREFIX = "/static/"  # the pages' scripts and styles: public, they hold no tenant's data
ADMIN_PATHS = frozenset({"/metrics"})
PAGE_PATHS = frozenset({"/", "/chat", "/docs", "/redoc"})  # browsers get the key form instead of a JSON 401
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
REALM = 'Bearer realm="lorax-lite"'

T = TypeVar("T")


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's record, or nobody in particular while the server has no keys."""

    key: KeyRecord | None = None

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else ANONYMOUS_TENANT

    @property
    def key_id(self) -> str:
        return self.key.display_id if self.key is not None else "-"

    @property
    def is_admin(self) -> bool:
        return self.key is None or self.key.is_admin

    @property
    def cache_salt(self) -> str | None:
        """What keeps this caller's prefix-cached K/V apart from other tenants' (None while nobody needs a key):
        a tenant never reuses, and so can never time, blocks another tenant's prompts computed."""
        return f"tenant:{self.key.tenant}" if self.key is not None else None

    def may_use_adapter(self, adapter_id: str) -> bool:
        return self.key is None or self.key.allows_adapter(adapter_id)

    @property
    def may_use_base_model(self) -> bool:
        return self.key is None or self.key.base_model


ANONYMOUS = Principal()


def principal_of(request: Request) -> Principal:
    """The caller TenantMiddleware found (it runs before every route; a request without one is a bug: 500)."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal on the request: TenantMiddleware is not installed")
    return principal


class Unauthorized(Exception):
    """A request without a usable key: 401 (or 403 for a key without the needed role); `reason` is for the audit."""

    def __init__(self, status: int, message: str, reason: str, key: KeyRecord | None = None,
                 key_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.key = key
        self.key_id = key_id


class Tenancy:
    """The server's tenants: the key store (None: no keys, everything allowed), the Host allow-list, the rate
    limiter, the usage recorder and the audit log. `stale_s`: how long a key checked before may be trusted
    while the store is unreachable."""

    def __init__(self, store: TenantStore | None = None, allowed_hosts: Sequence[str] = ("*",),
                 audit: AuditLog | None = None, timeout_s: float = 1.0, stale_s: float = 300.0,
                 usage_flush_s: float = 1.0) -> None:
        self.store = store
        self.allowed_hosts = [h.lower() for h in allowed_hosts]
        self.audit = audit or AuditLog(None)
        self.stale_s = stale_s
        self.guard = Guard(store.url, timeout_s) if store is not None else None
        self.limiter: RateLimiter = store.rate_limiter() if store is not None else LocalRateLimiter()
        self.usage = UsageRecorder(store, self.guard, usage_flush_s)
        self._has_keys: bool | None = None if store is not None else False
        self._has_keys_at = float("-inf")
        self._keys: dict[str, tuple[KeyRecord | None, float]] = {}  # key_id -> (record, monotonic read time)
        self._loading: dict[str, asyncio.Future] = {}  # reads under way, shared by concurrent requests

    def close(self) -> None:
        """Flush the usage left, stop the audit log; the store is the caller's."""
        self.usage.close()
        self.audit.close()
        if self.guard is not None:
            self.guard.close()

    # ---- Host allow-list ---------------------------------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        """Whether a Host header names this server: `*` allows any; `.example.com` a domain and its subdomains."""
        if "*" in self.allowed_hosts:
            return True
        if not host:
            return False
        name = host.lower()
        if name.startswith("["):  # [::1]:8080
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        return any(name == allowed or (allowed.startswith(".") and (name.endswith(allowed) or name == allowed[1:]))
                   for allowed in self.allowed_hosts)

    # ---- keys ----------------------------------------------------------------------------------------

    async def auth_enabled(self) -> bool:
        """Whether requests need a key: the store holds a key (checked again every KEY_REFRESH_S until one exists;
        keys are never deleted, so it stays on)."""
        if self._has_keys or self.store is None:
            return bool(self._has_keys)
        now = time.monotonic()
        if now - self._has_keys_at < KEY_REFRESH_S and self._has_keys is not None:
            return self._has_keys
        try:
            has_keys = await self._shared("\0has_keys", self._store_call, self.store.has_keys)
        except RegistryError:
            if self._has_keys is None:  # never known: fail closed
                raise ServerError(503, "the key registry is unreachable, so this server cannot tell whether "
                                  "requests need an API key; retry shortly", "registry_unavailable",
                                  headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
            return self._has_keys
        self._has_keys, self._has_keys_at = has_keys, now
        return has_keys

    def prime(self) -> bool:
        """Whether keys exist, read now (blocking: for start-up, before serving)."""
        if self.store is None:
            return False
        self._has_keys = self._store_call(self.store.has_keys)
        self._has_keys_at = time.monotonic()
        return self._has_keys

    async def authenticate(self, presented: str) -> KeyRecord:
        """The active record of the key `presented`; Unauthorized for one that is malformed, unknown, wrong,
        revoked or expired."""
        parts = split_key(presented)
        if parts is None:
            raise Unauthorized(401, "invalid API key: it is not a lorax-lite key (llk_...)", "malformed key")
        key_id, secret = parts
        record = await self._record(key_id)
        if record is None or not secret_matches(secret, record.secret_hash):
            raise Unauthorized(401, "invalid API key", "unknown key or wrong secret", key_id=f"llk_{key_id}")
        status = record.status()
        if status != "active":
            raise Unauthorized(401, f"this API key was {status}: ask your platform team for a new one", status,
                               key=record)
        return record

    async def _record(self, key_id: str) -> KeyRecord | None:
        """The stored record of `key_id`, at most KEY_REFRESH_S old (older while the store is unreachable, up to
        stale_s); a 503 when it cannot be read and none is cached."""
        cached = self._keys.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < KEY_REFRESH_S:
            return cached[0]
        store = self.store
        if store is None:
            return None
        try:
            record = await self._shared(key_id, self._store_call, store.get_key, key_id)
        except RegistryError:
            if cached is not None and cached[0] is not None and now - cached[1] < self.stale_s:
                return cached[0]
            raise ServerError(503, "the key registry is unreachable, so this API key cannot be checked now; "
                              "retry shortly", "registry_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        if len(self._keys) > 10_000:  # random ids from a scanner must not grow the cache without bound
            self._keys.clear()
        self._keys[key_id] = (record, time.monotonic())
        return record

    async def _shared(self, name: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a worker thread, once for all the requests that need it at the same time."""
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(run_in_threadpool(fn, *args))
            self._loading[name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(pending)

    def _store_call(self, method: Callable[..., T], *args: object) -> T:
        if self.guard is None:
            return method(*args)
        return self.guard.call(method, *args)

    def audit_denied(self, scope: Scope, status: int, reason: str, principal: Principal, adapter: str | None = None,
                     key_id: str | None = None) -> None:
        """The audit line of a refused request: its route and client from the ASGI `scope`, the key (when one was
        recognised: `principal`, or only the id `key_id` of a key whose secret did not match) and the adapter."""
        known = principal.key is not None
        self.audit.denied(status=status, reason=reason, route=scope["path"], method=scope["method"],
                          key_id=key_id or (principal.key_id if known else None),
                          tenant=principal.tenant if known else None, adapter=adapter,
                          client=(scope.get("client") or ("", 0))[0])

    # ---- rate limits and usage -----------------------------------------------------------------------------

    async def acquire(self, principal: Principal, prompt_tokens: int, lease_ttl_s: float) -> str | None:
        """Admit a generation request under its key's limits: the lease id to release, None when the key has no
        limits; a 429 with Retry-After past a limit. A limiter that cannot be reached admits (and logs it)."""
        key = principal.key
        if key is None or not key.has_limits:
            return None
        lease_id = uuid.uuid4().hex
        try:
            decision = await self._limit(self.limiter.acquire, key, lease_id, prompt_tokens, lease_ttl_s)
        except RegistryError as exc:
            logger.warning("request %s: rate limits not checked (the registry is unreachable: %s)", REQUEST_ID.get(),
                           exc)
            return None
        if not decision.admitted:
            raise rate_limited(key, decision)
        return lease_id

    async def release(self, principal: Principal, lease_id: str | None, generated_tokens: int) -> None:
        if lease_id is None or principal.key is None:
            return
        try:
            await self._limit(self.limiter.release, principal.key, lease_id, generated_tokens)
        except RegistryError as exc:
            logger.warning("request %s: rate limit lease not released (%s); it expires by itself", REQUEST_ID.get(),
                           exc)

    async def _limit(self, method: Callable[..., T], *args: object) -> T:
        if isinstance(self.limiter, LocalRateLimiter):
            return method(*args)  # in memory, under a lock held for microseconds
        return await run_in_threadpool(self._store_call, method, *args)


def rate_limited(key: KeyRecord, decision: Decision) -> ServerError:
    limits = {"rpm": f"{key.rpm} requests per minute", "tpm": f"{key.tpm} tokens per minute",
              "concurrent": f"{key.max_concurrent} concurrent requests"}
    retry_after = max(RETRY_AFTER_SECONDS, int(decision.retry_after_s + 0.999))
    return ServerError(429, f"rate limit reached: this API key allows {limits.get(decision.limit or '', 'less')}; "
                       f"retry in {retry_after} s", "rate_limited", headers={"Retry-After": str(retry_after)})


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Loopback names when the server listens on loopback only (a web page elsewhere cannot reach it by a
    rebound DNS name); any name otherwise (set --allowed-hosts to the names clients use)."""
    return list(LOOPBACK_HOSTS) if bind_host in LOOPBACK_HOSTS or bind_host.startswith("127.") else ["*"]


class TenantMiddleware:
    """The Host check and the key check of every request (see the module docstring)."""

    def __init__(self, app: ASGIApp, tenancy: Tenancy) -> None:
        self.app = app
        self.tenancy = tenancy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = _headers(scope)
        host = headers.get("host", [""])[-1]
        if path not in PUBLIC_PATHS and not self.tenancy.host_allowed(host):
            self.tenancy.audit_denied(scope, 400, "host not allowed", ANONYMOUS)
            error = ServerError(400, f"the Host header {brief(host)} is not one this server answers to "
                                "(--allowed-hosts)", "invalid_host")
            await error.to_response(_is_openai(path))(scope, receive, send)
            return
        try:
            principal = await self._principal(path, headers)
        except ServerError as error:
            await error.to_response(_is_openai(path))(scope, receive, send)
            return
        except Unauthorized as denied:
            self.tenancy.audit_denied(scope, denied.status, denied.reason, Principal(denied.key), key_id=denied.key_id)
            await self._refusal(scope, denied)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _principal(self, path: str, headers: dict[str, list[str]]) -> Principal:
        if path in PUBLIC_PATHS or path.startswith(STATIC_PREFIX) or not await self.tenancy.auth_enabled():
            return ANONYMOUS
        presented = _presented_key(headers)
        record = await self.tenancy.authenticate(presented)
        if path in ADMIN_PATHS and not record.is_admin:
            raise Unauthorized(403, f"{path} needs an admin key (keys create --admin)", "admin route", key=record)
        return Principal(record)

    def _refusal(self, scope: Scope, denied: Unauthorized) -> ASGIApp:
        if denied.status != 401:  # a key without the role the route needs
            return ServerError(denied.status, denied.message, "forbidden").to_response(_is_openai(scope["path"]))
        challenge = REALM if denied.reason == "no key" else f'{REALM}, error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
        if scope["method"] == "GET" and _is_page(scope["path"]):
            return key_page(headers)
        return ServerError(401, denied.message, "unauthorized", headers=headers).to_response(_is_openai(scope["path"]))

def audit_denial(request: Request, status: int, reason: str, adapter: str | None) -> None:
    """Write the audit line of a request a route refused for its key (an adapter or the base model it may not
    use, a rate limit)."""
    tenancy: Tenancy = request.app.state.server.tenancy
    tenancy.audit_denied(request.scope, status, reason, principal_of(request), adapter)


def _presented_key(headers: dict[str, list[str]]) -> str:
    """The key from `Authorization: Bearer KEY` or `X-API-Key: KEY`; Unauthorized when none, or two that differ."""
    keys = {value.strip() for value in headers.get("x-api-key", [])}
    for authorization in headers.get("authorization", []):
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(401, "invalid Authorization header: use `Authorization: Bearer KEY` (or `X-API-Key: "
                               "KEY`)", "malformed header")
        keys.add(value.strip())
    keys.discard("")
    if len(keys) > 1:
        raise Unauthorized(401, "two different API keys (Authorization and X-API-Key): send one", "two keys")
    presented = keys.pop() if keys else ""
    if not presented:
        raise Unauthorized(401, "this server needs an API key: send `Authorization: Bearer KEY` (or `X-API-Key: "
                           "KEY`); an admin creates keys with `lorax-lite keys create`", "no key")
    return presented


def _headers(scope: Scope) -> dict[str, list[str]]:
    """The request's header values by lower-case name."""
    headers: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return headers


def _is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PATH_PREFIX)


def _is_page(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith("/chat/")

