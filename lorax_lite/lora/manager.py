"""AdapterManager: the two-tier adapter cache (device slots, host memory) with reference counts and pins.

Entries are keyed by adapter key: one version of one adapter (see the glossary in docs/architecture.md);
the weights under a key never change.

- Host tier: up to `max_cpu_loras` adapters' weights in CPU memory (pinned on CUDA), LRU. Every
  adapter in a device slot is also in the host tier, so leaving a slot never means a disk read.
- Device tier: `max_loras` slots in the model's LoRALinear buffers. A request holds a reference to
  its adapter's slot while it runs; a slot with references is never given to another adapter.
- Disk loads run on a loader thread (`lora/loader.py`): `prefetch(source)` queues one, `poll` takes
  in what has landed. The engine step never waits for disk.
- Pinned adapters stay in host memory (never evicted from it); in the device tier they are the
  last choice for eviction. At most `max_cpu_loras - max_loras - 1` adapters can be pinned, so a
  request for an unpinned adapter always finds room eventually.
- Starvation: when every slot is busy and an adapter is waiting for one, `reserve` marks the slot
  with the fewest running requests (then least recently used): no new request is admitted to it,
  and once its running requests finish the waiting adapter gets it.

Allocator style: `can_acquire` -> `acquire` -> `release`. All methods except `wait` are called
from the engine thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from lorax_lite.invariants import require
from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.loader import AdapterLoader, AdapterSource
from lorax_lite.lora.weights import LoRAWeights


@dataclass
class AdapterCacheStats:
    """Counters since start-up (for /metrics and benchmarks)."""

    slot_hits: int = 0  # acquire found the adapter in a slot
    host_hits: int = 0  # acquire copied it from host memory into a slot
    misses: int = 0  # disk loads started
    load_failures: int = 0
    evictions: int = 0  # adapters moved out of a device slot to make room
    host_evictions: int = 0  # adapters dropped from host memory to make room
    load_seconds: float = 0.0  # disk -> host, summed over loads
    slot_load_seconds: float = 0.0  # host -> slot copies, summed


@dataclass
class _Slot:
    adapter_key: str | None = None
    refcount: int = 0
    last_used: int = 0


@dataclass
class _Reservation:
    slot: int
    adapter_key: str  # the adapter the slot is kept for


class AdapterManager:
    """Which adapters are in device slots and host memory; loads, evicts and counts references."""

    def __init__(
        self,
        lora_layers: LoRALayers,
        max_cpu_loras: int,
        read_fn: Callable[[AdapterSource], LoRAWeights],
        pin_memory: bool = False,
    ) -> None:
        if max_cpu_loras < lora_layers.max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({lora_layers.max_loras})")
        self.lora_layers = lora_layers
        self.max_loras = lora_layers.max_loras
        self.max_cpu_loras = max_cpu_loras
        self.stats = AdapterCacheStats()
        self._read_fn = read_fn
        self._pin_memory = pin_memory
        self._host: OrderedDict[str, LoRAWeights] = OrderedDict()  # least recently used first
        self._slots = [_Slot() for _ in range(self.max_loras)]
        self._slot_of: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._loading: set[str] = set()
        self._discard_on_landing: set[str] = set()
        self._doomed: set[str] = set()  # removed while in use: dropped when its last reference goes
        self._reservation: _Reservation | None = None
        self._tick = 0
        self._loader = AdapterLoader(
            lambda source: self._read_fn(source),  # looked up per read: tests wrap it
            pin_memory,
        )

    # ---- host tier ---------------------------------------------------------------------------

    def is_loaded(self, adapter_key: str) -> bool:
        return adapter_key in self._host

    def is_loading(self, adapter_key: str) -> bool:
        return adapter_key in self._loading

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    def prefetch(self, source: AdapterSource, keep: AbstractSet[str] = frozenset()) -> bool:
        """Start loading `source.adapter_key` from disk unless it is in host memory or on its way; False if
        no room yet. Making room never evicts an adapter in `keep` (those of requests ahead in the queue).
        """
        adapter_key = source.adapter_key
        if adapter_key in self._loading:
            self._discard_on_landing.discard(adapter_key)  # removed while loading, wanted again: keep it
            return True
        if adapter_key in self._host:
            return True
        if not self._make_host_room(keep):
            return False
        self._loading.add(adapter_key)
        self.stats.misses += 1
        self._loader.submit(source)
        return True

    def put(self, adapter_key: str, weights: LoRAWeights) -> bool:
        """Insert weights loaded elsewhere (e.g. validated by add_adapter); False if there is no room."""
        if adapter_key in self._host:  # already there (the weights under a key never change: new weights get a new key)
            self._host.move_to_end(adapter_key)
            return True
        if adapter_key in self._loading or not self._make_host_room():
            return False
        self._host[adapter_key] = self._maybe_pin(weights)
        return True

    def poll(self) -> list[tuple[str, Exception]]:
        """Take in finished disk loads; returns the adapters that failed to load, with their errors."""
        failures = []
        for adapter_key, result, seconds in self._loader.collect():
            self._loading.discard(adapter_key)
            self.stats.load_seconds += seconds
            if adapter_key in self._discard_on_landing:
                self._discard_on_landing.discard(adapter_key)
            elif isinstance(result, Exception):
                self.stats.load_failures += 1
                failures.append((adapter_key, result))
            else:
                self._host[adapter_key] = result
        return failures

    def wait(self, timeout: float) -> None:
        """Block until a disk load lands (or `timeout` seconds pass)."""
        self._loader.wait(timeout)

    def _make_host_room(self, keep: AbstractSet[str] = frozenset()) -> bool:
        if len(self._host) + len(self._loading) < self.max_cpu_loras:
            return True
        victim = self._host_victim(keep)
        if victim is None:
            return False
        self._drop(victim)
        self.stats.host_evictions += 1
        return True

    def _host_victim(self, keep: AbstractSet[str]) -> str | None:
        """LRU adapter that is not pinned, not in use, not kept for a reservation or in `keep`; idle-slot ones last."""
        candidates = [a for a in self._host if a not in keep and self._is_host_evictable(a)]
        not_in_slot = [a for a in candidates if a not in self._slot_of]
        return next(iter(not_in_slot or candidates), None)

    def _is_host_evictable(self, adapter_key: str) -> bool:
        if adapter_key in self._pinned:
            return False
        if self._reservation is not None and self._reservation.adapter_key == adapter_key:
            return False
        slot = self._slot_of.get(adapter_key)
        return slot is None or self._slots[slot].refcount == 0

    def _drop(self, adapter_key: str) -> None:
        slot = self._slot_of.pop(adapter_key, None)
        if slot is not None:
            self._slots[slot] = _Slot(last_used=self._slots[slot].last_used)
            self.lora_layers.clear(slot)
        self._host.pop(adapter_key, None)

    def _maybe_pin(self, weights: LoRAWeights) -> LoRAWeights:
        return weights.pin_memory() if self._pin_memory else weights

    # ---- device tier -------------------------------------------------------------------------

    def slot_of(self, adapter_key: str) -> int | None:
        return self._slot_of.get(adapter_key)

    def can_acquire(self, adapter_key: str) -> bool:
        """Whether `acquire` would succeed now (loaded, and its slot or a free/idle one is usable)."""
        if adapter_key not in self._host:
            return False
        slot = self._slot_of.get(adapter_key)
        if slot is not None:
            return not self._is_reserved_away(slot, adapter_key)
        return self._free_slot(adapter_key) is not None

    def acquire(self, adapter_key: str) -> int:
        """Take a reference to the adapter's slot, copying it in from host memory if needed."""
        if not self.can_acquire(adapter_key):
            raise RuntimeError(f"adapter {adapter_key!r} cannot be acquired now; ask can_acquire first")
        slot = self._slot_of.get(adapter_key)
        if slot is not None:
            self.stats.slot_hits += 1
        elif (free := self._free_slot(adapter_key)) is not None:  # can_acquire found it: never None here
            slot = self._load_into_slot(adapter_key, free)
        else:
            raise RuntimeError(f"adapter {adapter_key!r}: no free slot although can_acquire said there was")
        if self._reservation is not None and self._reservation.adapter_key == adapter_key:
            self._reservation = None
        state = self._slots[slot]
        state.refcount += 1
        state.last_used = self._next_tick()
        self._host.move_to_end(adapter_key)
        return slot

    def release(self, adapter_key: str) -> None:
        """Drop one reference taken by `acquire(adapter_key)`."""
        slot = self._slot_of.get(adapter_key)
        if slot is None:
            raise RuntimeError(f"release of adapter {adapter_key!r} without a matching acquire")
        self.release_slot(slot)

    def release_slot(self, slot: int) -> None:
        """Drop one reference to the slot `acquire` returned (still right after the adapter was removed)."""
        state = self._slots[slot]
        if state.refcount == 0:
            raise RuntimeError(f"release of slot {slot} without a matching acquire")
        state.refcount -= 1
        state.last_used = self._next_tick()
        if state.refcount == 0 and state.adapter_key in self._doomed:
            self._doomed.discard(state.adapter_key)
            self._drop(state.adapter_key)

    def _free_slot(self, adapter_key: str) -> int | None:
        """An empty slot, else the least recently used idle one (unpinned first), never a reserved one."""
        usable = [
            i for i, s in enumerate(self._slots) if s.refcount == 0 and not self._is_reserved_away(i, adapter_key)
        ]
        empty = [i for i in usable if self._slots[i].adapter_key is None]
        if empty:
            return empty[0]
        if not usable:
            return None
        return min(usable, key=lambda i: (self._slots[i].adapter_key in self._pinned, self._slots[i].last_used))

    def _is_reserved_away(self, slot: int, adapter_key: str) -> bool:
        r = self._reservation
        return r is not None and r.slot == slot and r.adapter_key != adapter_key

    def _load_into_slot(self, adapter_key: str, slot: int) -> int:
        old = self._slots[slot].adapter_key
        if old is not None:
            del self._slot_of[old]
            self.stats.evictions += 1
        start = time.perf_counter()
        self.lora_layers.load(slot, self._host[adapter_key])
        self.stats.slot_load_seconds += time.perf_counter() - start
        self.stats.host_hits += 1
        self._slots[slot] = _Slot(adapter_key=adapter_key)
        self._slot_of[adapter_key] = slot
        return slot

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # ---- fairness, pins, removal ------------------------------------------------------------

    def reserve(self, adapter_key: str | None, waiting: set[str]) -> None:
        """Keep a busy slot for `adapter_key` (loaded, waiting for a slot); None or a satisfied wait clears it.

        The current reservation stays while its adapter is still in `waiting` (adapters of waiting
        requests), so a slot being drained is not switched before it is handed over.
        """
        r = self._reservation
        if (r is not None and r.adapter_key in waiting and r.adapter_key in self._host
                and r.adapter_key not in self._slot_of):
            return
        self._reservation = None
        if adapter_key is None or adapter_key not in self._host or self.can_acquire(adapter_key):
            return
        busy = [i for i, s in enumerate(self._slots) if s.adapter_key is not None]
        slot = min(busy, key=lambda i: (self._slots[i].refcount, self._slots[i].last_used))
        self._reservation = _Reservation(slot, adapter_key)

    @property
    def reservation(self) -> tuple[int, str] | None:
        r = self._reservation
        return None if r is None else (r.slot, r.adapter_key)

    def pin(self, source: AdapterSource) -> None:
        """Keep `source.adapter_key` in host memory for good (loading it now if needed)."""
        adapter_key = source.adapter_key
        limit = self.max_cpu_loras - self.max_loras - 1
        if adapter_key not in self._pinned and len(self._pinned) >= limit:
            raise ValueError(
                f"cannot pin {adapter_key!r}: at most {max(limit, 0)} adapters can be pinned "
                f"(max_cpu_loras - max_loras - 1); raise max_cpu_loras"
            )
        self._pinned.add(adapter_key)
        self.prefetch(source)

    def unpin(self, adapter_key: str) -> None:
        self._pinned.discard(adapter_key)

    def is_pinned(self, adapter_key: str) -> bool:
        return adapter_key in self._pinned

    def remove(self, adapter_key: str) -> None:
        """Forget an adapter: dropped now if unused, else when its last running request releases it."""
        self._pinned.discard(adapter_key)
        if adapter_key in self._loading:
            self._discard_on_landing.add(adapter_key)
        if self._reservation is not None and self._reservation.adapter_key == adapter_key:
            self._reservation = None
        slot = self._slot_of.get(adapter_key)
        if slot is not None and self._slots[slot].refcount > 0:
            self._detach(adapter_key, slot)
        else:
            self._drop(adapter_key)

    def _detach(self, adapter_key: str, slot: int) -> None:
        """Keep a removed adapter's weights for its running requests under a private key (not a valid
        adapter id), so the key is free at once: re-adding it serves the new weights to new requests."""
        self._tick += 1
        key = f"~removed~{self._tick}~{adapter_key}"
        self._host[key] = self._host.pop(adapter_key)
        del self._slot_of[adapter_key]
        self._slot_of[key] = slot
        self._slots[slot].adapter_key = key
        self._doomed.add(key)

    # ---- introspection -----------------------------------------------------------------------

    @property
    def slot_keys(self) -> list[str | None]:
        return [s.adapter_key for s in self._slots]

    @property
    def host_keys(self) -> list[str]:
        """Adapters in host memory, least recently used first."""
        return list(self._host)

    def refcount(self, adapter_key: str) -> int:
        slot = self._slot_of.get(adapter_key)
        return 0 if slot is None else self._slots[slot].refcount

    def check_invariants(self, idle: bool = False) -> None:
        """Raise InvariantError if the bookkeeping is inconsistent; `idle`: no request holds a slot either."""
        require(len(self._host) + len(self._loading) <= self.max_cpu_loras, "host tier over capacity")
        require(not (set(self._host) & self._loading), "an adapter is both loaded and loading")
        for adapter_key, slot in self._slot_of.items():
            require(self._slots[slot].adapter_key == adapter_key, f"slot {slot} does not hold {adapter_key}")
            require(adapter_key in self._host, f"{adapter_key} is in a slot but not in host memory")
        for i, s in enumerate(self._slots):
            require(s.refcount >= 0, f"slot {i} has a negative refcount")
            require(not idle or s.refcount == 0, f"slot {i} still has {s.refcount} references with no request left")
            require(s.adapter_key is not None or s.refcount == 0, f"empty slot {i} has references")
            require(s.adapter_key is None or self._slot_of.get(s.adapter_key) == i, f"slot {i} owner mismatch")
            rank = 0 if s.adapter_key is None else self._host[s.adapter_key].rank
            require(self.lora_layers.slot_ranks[i] == rank,
                    f"slot {i} has rank {self.lora_layers.slot_ranks[i]}, not {rank}")
        require(self._pinned.isdisjoint(self._doomed), "an adapter is both pinned and removed")
        r = self._reservation
        require(r is None or (r.adapter_key in self._host and r.adapter_key not in self._slot_of), "stale reservation")
