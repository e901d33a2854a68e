"""What the engine reports about itself: step counters, and a snapshot of its state for /info and /metrics.

A snapshot is a frozen copy built by the thread that steps the engine, so another thread (the
server's event loop) reads it without touching the engine's own, changing structures.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from dataclasses import dataclass, field

from lorax_lite.engine.prefix_cache import PrefixCacheStats
from lorax_lite.lora.manager import AdapterCacheStats

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class EngineStats:
    """Counters since start-up, written by the thread that steps the engine."""

    steps: int = 0  # forward passes
    batched_tokens: int = 0  # tokens run through the model, summed over steps
    batch_size_sum: int = 0  # sequences per step, summed over steps
    # steps per bucket (<= bound)
    batch_size_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_SIZE_BUCKETS))

    def observe_step(self, num_seqs: int, num_tokens: int) -> None:
        self.steps += 1
        self.batched_tokens += num_tokens
        self.batch_size_sum += num_seqs
        bucket = bisect_left(BATCH_SIZE_BUCKETS, num_seqs)
        if bucket < len(BATCH_SIZE_BUCKETS):
            self.batch_size_buckets[bucket] += 1

    def copy(self) -> EngineStats:
        return dataclasses.replace(self, batch_size_buckets=list(self.batch_size_buckets))


@dataclass(frozen=True)
class AdapterCacheSnapshot:
    """The adapter cache at one moment: keys in device slots and in host memory, and its counters."""

    added_ids: list[str]  # adapters added by path (registered ones: see the registry)
    slot_keys: list[str | None]  # the adapter key in each device slot (None: empty)
    host_keys: list[str]  # adapter keys in host memory, least recently used first
    stats: AdapterCacheStats


@dataclass(frozen=True)
class PrefixCacheSnapshot:
    """The prefix cache at one moment: on or off, the blocks it holds, and its counters."""

    enabled: bool
    num_cached_blocks: int  # blocks holding cached K/V, in use or evictable
    stats: PrefixCacheStats

    @property
    def hit_rate(self) -> float:
        """Tokens found cached / tokens looked up, at admission, since start-up (0 before any lookup)."""
        queried = self.stats.num_queried_tokens
        return self.stats.num_hit_tokens / queried if queried else 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment, for /info and /metrics."""

    num_waiting: int
    num_running: int
    waiting_adapters: tuple[str, ...]  # adapter ids of the waiting requests, distinct, sorted (base: none)
    running_adapters: tuple[str, ...]  # adapter ids of the requests in the running batch, distinct, sorted
    num_kv_blocks_used: int
    num_kv_blocks: int
    num_preemptions: int
    stats: EngineStats
    adapter_cache: AdapterCacheSnapshot | None  # None: LoRA is turned off (max_loras=0)
    prefix_cache: PrefixCacheSnapshot


__all__ = ["BATCH_SIZE_BUCKETS", "AdapterCacheSnapshot", "EngineSnapshot", "EngineStats", "PrefixCacheSnapshot"]
