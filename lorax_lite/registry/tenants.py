"""Tenants: API keys, what each may use, its limits, and usage for charge-back; stored beside the adapters in the
registry backend (SQLite or Redis), so every replica sharing a registry shares the keys.

A key is `llk_<key_id>_<secret>`: `llk_<key_id>` names it in logs, listings and the audit log; the secret
part (256 random bits) is never stored, logged or shown again. The backend keeps a salted SHA-256 of the
secret (a fast hash is enough for a random 256-bit secret: there is nothing to guess), compared in constant
time. Keys are never deleted, only revoked: once any key was created, the server keeps asking for keys.

Rate limits are token buckets per key (requests per minute, tokens per minute) and a cap on concurrent
requests; `RateLimiter` checks and charges them (in process here; `RedisTenantStore.rate_limiter()` keeps them
in Redis, shared by every replica).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

KEY_PREFIX = "llk_"
KEY_ID_HEX = 12  # 48 bits: ids are public, only unique
_KEY = re.compile(r"llk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"(?:llk_)?([0-9a-f]{12})")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALL_ADAPTERS = "*"
ROLES = ("user", "admin")
HASH_SCHEME = "sha256"
ANONYMOUS_TENANT = "anonymous"  # usage of a server without keys


class TenantError(ValueError):
    """Bad input for a key (tenant name, adapter list, limits, expiry): the message says what to change."""


class KeyExistsError(Exception):
    """A new key's id is taken already (ids are random: draw another)."""


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise TenantError(f"invalid tenant {tenant!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    return tenant


def parse_key_id(text: str) -> str:
    """The key id in `llk_<id>` or `<id>` (what the CLI takes); TenantError otherwise."""
    match = _KEY_ID.fullmatch(text.strip())
    if match is None:
        raise TenantError(f"invalid key id {text[:40]!r}: expected llk_ and {KEY_ID_HEX} hex digits "
                          "(as `lorax-lite keys list` shows it)")
    return match.group(1)


def split_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY.fullmatch(key)
    return None if match is None else (match.group(1), match.group(2))


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`sha256$<salt hex>$<digest hex>` of `secret` with a new random salt (or `salt`)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return f"{HASH_SCHEME}${salt.hex()}${digest}"


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Whether `secret` hashes to `secret_hash`, compared in constant time."""
    try:
        scheme, salt_hex, digest = secret_hash.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    if scheme != HASH_SCHEME:
        return False
    return hmac.compare_digest(hash_secret(secret, salt).rsplit("$", 1)[1], digest)


def new_secret() -> tuple[str, str]:
    """(secret, its hash) for a new or rotated key."""
    secret = secrets.token_urlsafe(32)
    return secret, hash_secret(secret)


def full_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


@dataclass
class KeyRecord:
    """One API key as stored (never with its secret: `secret_hash` only)."""

    key_id: str  # KEY_ID_HEX hex digits; shown as llk_<key_id>
    tenant: str
    secret_hash: str
    adapters: list[str] = field(default_factory=list)  # adapter ids, or ["*"] for every adapter
    base_model: bool = False  # may it use the base model without an adapter
    role: str = "user"  # "admin" also reads /metrics
    name: str = ""
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + generated) per minute
    max_concurrent: int | None = None
    expires_at: float | None = None  # time.time(); None: never
    created_at: float = 0.0
    revoked_at: float | None = None
    rotated_at: float | None = None

    @property
    def display_id(self) -> str:
        return f"{KEY_PREFIX}{self.key_id}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def status(self, now: float | None = None) -> str:
        """"active", "revoked" or "expired"."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at:
            return "expired"
        return "active"

    def allows_adapter(self, adapter_id: str) -> bool:
        return ALL_ADAPTERS in self.adapters or adapter_id in self.adapters

    @property
    def has_limits(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """What listings show: everything but the secret's hash, plus the display id and status."""
        data = self.to_dict()
        del data["secret_hash"]
        return {"id": self.display_id, **data, "status": self.status()}

    @classmethod
    def from_dict(cls, data: dict) -> KeyRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def new_key(tenant: str, adapters: list[str], base_model: bool = False, role: str = "user", name: str = "",
            rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None,
            expires_at: float | None = None, now: float | None = None) -> tuple[str, KeyRecord]:
    """(the key, its record) for a new key; the settings are checked (TenantError). The key is shown once."""
    from lorax_lite.lora.naming import InvalidAdapterIdError, check_adapter_id

    check_tenant(tenant)
    if role not in ROLES:
        raise TenantError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    for adapter_id in adapters:
        if adapter_id != ALL_ADAPTERS:
            try:
                check_adapter_id(adapter_id)
            except InvalidAdapterIdError as exc:
                raise TenantError(str(exc)) from None
    if not adapters and not base_model and role != "admin":
        raise TenantError("the key would allow nothing: give adapters, the base model or the admin role")
    for limit_name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TenantError(f"{limit_name} must be a positive integer (or unset: no limit), got {value!r}")
    now = time.time() if now is None else now
    if expires_at is not None and expires_at <= now:
        raise TenantError("the expiry is in the past: give a future date")
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    secret, secret_hash = new_secret()
    record = KeyRecord(key_id=key_id, tenant=tenant, secret_hash=secret_hash, adapters=sorted(set(adapters)),
                       base_model=base_model, role=role, name=name, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
                       expires_at=expires_at, created_at=now)
    return full_key(key_id, secret), record


def parse_expiry(text: str) -> float:
    """An expiry from the command line: `YYYY-MM-DD` (the key works through that day, UTC) or an ISO 8601 time
    (UTC unless it names its zone); TenantError otherwise."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = dt.date.fromisoformat(text)
            return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise TenantError(f"invalid date {text!r}: use YYYY-MM-DD or an ISO 8601 time such as "
                          "2027-01-31T18:00:00+01:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def utc_day(timestamp: float | None = None) -> str:
    """The UTC date (YYYY-MM-DD) usage is counted under."""
    return dt.datetime.fromtimestamp(time.time() if timestamp is None else timestamp, dt.timezone.utc).strftime(
        "%Y-%m-%d")


@dataclass
class UsageRow:
    """Usage of one key with one adapter (or the base model) on one UTC day."""

    day: str
    tenant: str
    key_id: str  # display id (llk_...), or "-" without keys
    adapter: str  # adapter id, or the served base model's name
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def group(self) -> tuple[str, str, str, str]:
        return self.day, self.tenant, self.key_id, self.adapter

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    """A rate limiter's answer: admitted, or refused by `limit` ("rpm", "tpm", "concurrent") for `retry_after_s`."""

    admitted: bool
    limit: str | None = None
    retry_after_s: float = 0.0


ADMITTED = Decision(True)


class RateLimiter(ABC):
    """Per-key token buckets (rpm: one token per request; tpm: prompt tokens at admission, generated tokens at
    release; each refills its per-minute limit evenly over a minute, from full) and a concurrency cap. A request
    is admitted while the request bucket holds a token, the token bucket is above zero (it may go below after a
    long answer: the next request waits until it refills) and fewer than max_concurrent of the key's requests
    hold a lease. All-or-nothing: a refused request takes nothing."""

    @abstractmethod
    def acquire(self, key: KeyRecord, lease_id: str, prompt_tokens: int, lease_ttl_s: float) -> Decision:
        """Admit one request of `key` (charging it) or say which limit refused it and for how long."""

    @abstractmethod
    def release(self, key: KeyRecord, lease_id: str, generated_tokens: int) -> None:
        """The admitted request `lease_id` ended: free its concurrency slot and charge its generated tokens."""


class LocalRateLimiter(RateLimiter):
    """The buckets in this process's memory (the SQLite backend's: each server process counts on its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key_id, kind) -> (level, at)
        self._leases: dict[str, dict[str, float]] = {}  # key_id -> lease_id -> expiry (clock)

    def acquire(self, key: KeyRecord, lease_id: str, prompt_tokens: int, lease_ttl_s: float) -> Decision:
        with self._lock:
            now = self._clock()
            leases = self._leases.setdefault(key.key_id, {})
            for lease, expiry in list(leases.items()):
                if expiry <= now:
                    del leases[lease]
            if key.max_concurrent is not None and len(leases) >= key.max_concurrent:
                return Decision(False, "concurrent", 1.0)
            requests = self._level(key.key_id, "rpm", key.rpm, now)
            if requests is not None and requests < 1:
                return Decision(False, "rpm", (1 - requests) * 60 / key.rpm)  # type: ignore[operator]
            tokens = self._level(key.key_id, "tpm", key.tpm, now)
            if tokens is not None and tokens <= 0:
                return Decision(False, "tpm", (1 - tokens) * 60 / key.tpm)  # type: ignore[operator]
            if requests is not None:
                self._buckets[(key.key_id, "rpm")] = (requests - 1, now)
            if tokens is not None:
                self._buckets[(key.key_id, "tpm")] = (tokens - prompt_tokens, now)
            leases[lease_id] = now + lease_ttl_s
            return ADMITTED

    def release(self, key: KeyRecord, lease_id: str, generated_tokens: int) -> None:
        with self._lock:
            self._leases.get(key.key_id, {}).pop(lease_id, None)
            now = self._clock()
            tokens = self._level(key.key_id, "tpm", key.tpm, now)
            if tokens is not None:
                self._buckets[(key.key_id, "tpm")] = (tokens - generated_tokens, now)

    def _level(self, key_id: str, kind: str, per_minute: int | None, now: float) -> float | None:
        """The bucket's level now (None: no such limit); a new bucket starts full."""
        if per_minute is None:
            return None
        level, at = self._buckets.get((key_id, kind), (float(per_minute), now))
        return min(float(per_minute), level + (now - at) * per_minute / 60)


class TenantStore(ABC):
    """Keys and usage in a registry backend. Safe for several processes at once."""

    url: str

    @abstractmethod
    def add_key(self, record: KeyRecord) -> None:
        """Store a new key; KeyExistsError if its id is taken."""

    @abstractmethod
    def get_key(self, key_id: str) -> KeyRecord | None:
        """The key with this id (revoked and expired ones too), or None."""

    @abstractmethod
    def list_keys(self) -> list[KeyRecord]:
        """Every key, oldest first."""

    @abstractmethod
    def update_key(self, record: KeyRecord) -> bool:
        """Replace a stored key's record (revoke, rotate), atomically; False if the id is unknown, or if the stored
        key is revoked and `record` is not (revocation is final: a rotation racing a revocation cannot undo it)."""

    @abstractmethod
    def has_keys(self) -> bool:
        """Whether any key was ever created (revoked ones count: revoking every key never opens the server)."""

    @abstractmethod
    def add_usage(self, rows: list[UsageRow]) -> None:
        """Add each row's counts to the stored ones of its (day, tenant, key, adapter), in one transaction."""

    @abstractmethod
    def usage(self, since_day: str | None = None, tenant: str | None = None) -> list[UsageRow]:
        """Stored usage from `since_day` (YYYY-MM-DD) on, of one tenant or all, sorted by day, tenant, key, adapter."""

    @abstractmethod
    def rate_limiter(self) -> RateLimiter:
        """The rate limiter for servers using this store (in process, or shared through the backend)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise RegistryError unless the backend answers."""

    def close(self) -> None:  # noqa: B027 (optional)
        """Release connections (idempotent)."""
