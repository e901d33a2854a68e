"""Keys, usage and rate limits on the registry's Redis, under the same `<prefix>:` as its adapters:

    <prefix>:apikeys                   hash   key_id -> KeyRecord JSON (its secret's salted hash, never the secret)
    <prefix>:usage:<day>               hash   JSON [tenant, key_id, adapter, counter] -> count (HINCRBY)
    <prefix>:usage_days                zset   every day with usage (score 0, read in order with ZRANGEBYLEX)
    <prefix>:ratelimit:<key_id>:rpm    hash   level, at: the request bucket (expires once full and idle)
    <prefix>:ratelimit:<key_id>:tpm    hash   level, at: the token bucket (likewise)
    <prefix>:ratelimit:<key_id>:leases zset   lease_id -> expiry: the key's requests in flight

A new key is one HSETNX, a batch of usage one MULTI transaction, and each rate-limit decision one Lua script
timed by the Redis server's clock (`TIME`), so every replica sharing the Redis shares each key's limits.
"""

from __future__ import annotations

import json

from lorax_lite.registry.base import CorruptRecordError
from lorax_lite.registry.redis import DEFAULT_PREFIX, RedisBackend
from lorax_lite.registry.tenants import (
    ADMITTED,
    Decision,
    KeyExistsError,
    KeyRecord,
    RateLimiter,
    TenantStore,
    UsageRow,
)

COUNTERS = ("requests", "prompt_tokens", "generated_tokens")
IDLE_EXPIRY_S = 120  # a bucket's keys outlive its full refill by this long, then vanish (a full bucket = no key)

# KEYS: apikeys; ARGV: key_id, record_json
_UPDATE_KEY = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return 0 end
local revoked = cjson.decode(stored).revoked_at
if ARGV[3] == '0' and revoked ~= nil and revoked ~= cjson.null then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# What both limiter scripts share: `now` from the server's clock, and a bucket's level read and written (the
# LocalRateLimiter's arithmetic; numbers go to Redis as %.17g strings, Lua's own tostring keeps 14 digits).
_BUCKETS = f"""
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local function num(x) return string.format('%.17g', x) end
local function level(key, limit)
  local stored = redis.call('HMGET', key, 'level', 'at')
  if not stored[1] then return limit end  -- a new (or expired: full) bucket starts full
  local elapsed = math.max(0, now - tonumber(stored[2]))  -- a clock stepping back refills nothing
  return math.min(limit, tonumber(stored[1]) + elapsed * limit / 60)
end
local function store(key, limit, value)
  redis.call('HSET', key, 'level', num(value), 'at', num(now))
  redis.call('EXPIRE', key, math.ceil((limit - value) * 60 / limit) + {IDLE_EXPIRY_S})
end
"""

# KEYS: rpm bucket, tpm bucket, leases; ARGV: rpm, tpm, max_concurrent ("" = no limit), lease_id, prompt_tokens,
# lease_ttl_s. Every check comes before any write: a refused request takes nothing.
_ACQUIRE = _BUCKETS + f"""
local rpm, tpm, max_concurrent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', num(now))
if max_concurrent and redis.call('ZCARD', KEYS[3]) >= max_concurrent then return {{0, 'concurrent', '1'}} end
local requests = rpm and level(KEYS[1], rpm)
if requests and requests < 1 then return {{0, 'rpm', num((1 - requests) * 60 / rpm)}} end
local tokens = tpm and level(KEYS[2], tpm)
if tokens and tokens <= 0 then return {{0, 'tpm', num((1 - tokens) * 60 / tpm)}} end
if requests then store(KEYS[1], rpm, requests - 1) end
if tokens then store(KEYS[2], tpm, tokens - tonumber(ARGV[5])) end
redis.call('ZADD', KEYS[3], num(now + tonumber(ARGV[6])), ARGV[4])
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('EXPIRE', KEYS[3], math.max(1, math.ceil(tonumber(last[2]) - now)) + {IDLE_EXPIRY_S})
return {{1}}
"""

# KEYS: tpm bucket, leases; ARGV: tpm ("" = no limit), lease_id, generated_tokens
_RELEASE = _BUCKETS + """
redis.call('ZREM', KEYS[2], ARGV[2])
local tpm = tonumber(ARGV[1])
if tpm then store(KEYS[1], tpm, level(KEYS[1], tpm) - tonumber(ARGV[3])) end
return 1
"""


class RedisTenantStore(RedisBackend, TenantStore):
    """Keys and usage on the Redis at `url`, under `<prefix>:` (the same Redis and prefix as `RedisRegistry`)."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(url, prefix)
        self._update_key = self._client.register_script(_UPDATE_KEY)
        self.ping()

    def add_key(self, record: KeyRecord) -> None:
        with self._errors():
            added = self._client.hsetnx(self._key("apikeys"), record.key_id, json.dumps(record.to_dict()))
        if not added:
            raise KeyExistsError(f"key id {record.display_id} is taken")

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._errors():
            record_json = self._client.hget(self._key("apikeys"), key_id)
        return None if record_json is None else self._to_record(str(record_json))

    def list_keys(self) -> list[KeyRecord]:
        with self._errors():
            stored = self._client.hgetall(self._key("apikeys"))
        return sorted((self._to_record(str(j)) for j in stored.values()), key=lambda r: (r.created_at, r.key_id))

    def update_key(self, record: KeyRecord) -> bool:
        with self._errors():
            return bool(self._update_key(keys=[self._key("apikeys")], args=[
                record.key_id, json.dumps(record.to_dict()), "1" if record.revoked_at is not None else "0"]))

    def has_keys(self) -> bool:
        with self._errors():
            return bool(self._client.hlen(self._key("apikeys")))

    def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            for row in rows:
                for counter in COUNTERS:
                    pipe.hincrby(self._key("usage", row.day), _usage_field(row, counter), getattr(row, counter))
                pipe.zadd(self._key("usage_days"), {row.day: 0})
            pipe.execute()

    def usage(self, since_day: str | None = None, tenant: str | None = None) -> list[UsageRow]:
        with self._errors():
            lowest = "-" if since_day is None else f"[{since_day}"
            days = [str(day) for day in self._client.zrangebylex(self._key("usage_days"), lowest, "+")]
            with self._client.pipeline(transaction=True) as pipe:
                for day in days:
                    pipe.hgetall(self._key("usage", day))
                counts = pipe.execute()
        rows: dict[tuple[str, str, str, str], UsageRow] = {}
        for day, fields in zip(days, counts, strict=True):
            for field, value in fields.items():
                self._count(rows, day, field, value)
        return sorted((r for r in rows.values() if tenant is None or r.tenant == tenant), key=lambda r: r.group)

    def rate_limiter(self) -> RateLimiter:
        return RedisRateLimiter(self)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _to_record(self, record_json: str) -> KeyRecord:
        try:
            return KeyRecord.from_dict(json.loads(record_json))
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(f"registry {self.url}: corrupt key record: {exc}") from exc

    def _count(self, rows: dict[tuple[str, str, str, str], UsageRow], day: str, field: str, value: str) -> None:
        """Add one stored counter (`field` of day `day`) to its row in `rows`."""
        try:
            tenant, key_id, adapter, counter = json.loads(field)
            if counter not in COUNTERS:
                raise ValueError(f"unknown counter {counter!r}")
            row = rows.setdefault((day, tenant, key_id, adapter), UsageRow(day, tenant, key_id, adapter))
            setattr(row, counter, int(value))
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(f"registry {self.url}: corrupt usage of {day}: {exc}") from exc


class RedisRateLimiter(RateLimiter):
    """Each key's buckets and leases in Redis, shared by every replica: acquire and release are one Lua script each,
    with LocalRateLimiter's semantics and the Redis server's clock."""

    def __init__(self, store: RedisTenantStore) -> None:
        self._store = store
        self._acquire = store._client.register_script(_ACQUIRE)
        self._release = store._client.register_script(_RELEASE)

    def acquire(self, key: KeyRecord, lease_id: str, prompt_tokens: int, lease_ttl_s: float) -> Decision:
        args: list[str | int] = [_limit(key.rpm), _limit(key.tpm), _limit(key.max_concurrent), lease_id,
                                 int(prompt_tokens), repr(float(lease_ttl_s))]
        with self._store._errors():
            answer = self._acquire(keys=[self._key(key, "rpm"), self._key(key, "tpm"), self._key(key, "leases")],
                                   args=args)
        if answer[0] == 1:
            return ADMITTED
        return Decision(False, str(answer[1]), float(answer[2]))

    def release(self, key: KeyRecord, lease_id: str, generated_tokens: int) -> None:
        with self._store._errors():
            self._release(keys=[self._key(key, "tpm"), self._key(key, "leases")],
                          args=[_limit(key.tpm), lease_id, int(generated_tokens)])

    def _key(self, key: KeyRecord, kind: str) -> str:
        return self._store._key("ratelimit", key.key_id, kind)


def _usage_field(row: UsageRow, counter: str) -> str:
    """The hash field of one counter of a row: JSON, so no tenant, key or adapter id can make two fields collide."""
    return json.dumps([row.tenant, row.key_id, row.adapter, counter])


def _limit(value: int | None) -> str:
    return "" if value is None else str(value)
