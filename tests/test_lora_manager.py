"""AdapterManager: two-tier LRU adapter cache over real LoRA slots of a tiny Llama, with synthetic adapter weights."""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from transformers import AutoModelForCausalLM

from lorax_lite.lora.errors import AdapterNotFoundError, CorruptWeightsError
from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.manager import AdapterManager
from lorax_lite.lora.loader import AdapterSource
from lorax_lite.lora.weights import LoRAWeights

MAX_RANK = 4
LOADER_THREAD = "lorax-adapter-loader"


def src(adapter_key: str) -> AdapterSource:
    """A source for the fake disk, which reads by key only."""
    return AdapterSource(adapter_key=adapter_key, adapter_id=adapter_key, path="unused")


@pytest.fixture(scope="module")
def slots_for(tiny_llama_dir) -> Callable[[int], LoRALayers]:
    """max_loras -> the LoRALayers of a tiny Llama injected once per size, all slots cleared on each call."""
    cache: dict[int, LoRALayers] = {}

    def get(max_loras: int) -> LoRALayers:
        if max_loras not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
            cache[max_loras] = LoRALayers.inject(model, max_loras, MAX_RANK)
        slots = cache[max_loras]
        for slot in range(max_loras):
            slots.clear(slot)
        return slots

    return get


def make_weights(targets: dict[str, tuple[int, int]], adapter_key: str, rank: int | None = None) -> LoRAWeights:
    """Random (A [r, in], B [out, r]) for every target; values (and rank, unless given) are fixed by the id."""
    seed = zlib.crc32(adapter_key.encode())
    rank = rank or 1 + seed % MAX_RANK
    gen = torch.Generator().manual_seed(seed)
    modules = {name: (torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen))
               for name, (d_in, d_out) in targets.items()}
    return LoRAWeights(rank, float(rank), False, sorted({n.rsplit(".", 1)[-1] for n in targets}), modules)


class FakeDisk:
    """The manager's read_fn: synthetic weights by key; keys in `errors` raise, keys in `gates` block until set."""

    def __init__(self, targets: dict[str, tuple[int, int]]) -> None:
        self.targets = targets
        self.ranks: dict[str, int] = {}  # rank by id where a test needs a particular one
        self.errors: dict[str, Exception] = {}
        self.gates: dict[str, threading.Event] = {}
        self.calls: list[tuple[str, str]] = []  # (adapter_key, thread name)
        self._weights: dict[str, LoRAWeights] = {}

    def weights(self, adapter_key: str) -> LoRAWeights:
        if adapter_key not in self._weights:
            self._weights[adapter_key] = make_weights(self.targets, adapter_key, self.ranks.get(adapter_key))
        return self._weights[adapter_key]

    def __call__(self, source: AdapterSource) -> LoRAWeights:
        adapter_key = source.adapter_key
        self.calls.append((adapter_key, threading.current_thread().name))
        if adapter_key in self.gates:
            assert self.gates[adapter_key].wait(10), "test never opened the gate"
        if adapter_key in self.errors:
            raise self.errors[adapter_key]
        return self.weights(adapter_key)

    def num_loads(self, adapter_key: str) -> int:
        return sum(a == adapter_key for a, _ in self.calls)


@pytest.fixture
def make_manager(slots_for) -> Callable[..., tuple[AdapterManager, FakeDisk]]:
    def make(max_loras: int, max_cpu_loras: int) -> tuple[AdapterManager, FakeDisk]:
        slots = slots_for(max_loras)
        disk = FakeDisk(slots.targets)
        return AdapterManager(slots, max_cpu_loras, disk), disk

    return make


def land(manager: AdapterManager, timeout: float = 10.0) -> list[tuple[str, Exception]]:
    """Wait and poll until no disk load is in flight; returns the failures poll reported."""
    failures: list[tuple[str, Exception]] = []
    deadline = time.monotonic() + timeout
    while manager.num_loading:
        assert time.monotonic() < deadline, "disk load did not land"
        manager.wait(0.05)
        failures += manager.poll()
    return failures


def load(manager: AdapterManager, *adapter_keys: str) -> None:
    """Load adapters through the loader thread, one after the other (so host LRU order is the given order)."""
    for adapter_key in adapter_keys:
        assert manager.prefetch(src(adapter_key))
        assert land(manager) == []
        assert manager.is_loaded(adapter_key)


def use(manager: AdapterManager, *adapter_keys: str) -> None:
    """Acquire and release each adapter in turn: it ends in a slot, idle, most recently used."""
    for adapter_key in adapter_keys:
        manager.acquire(adapter_key)
        manager.release(adapter_key)


def assert_slot_holds(slots: LoRALayers, slot: int, weights: LoRAWeights) -> None:
    r = weights.rank
    assert slots.slot_ranks[slot] == r
    for name, layer in slots.layers.items():
        a, b = weights.modules[name]
        assert torch.equal(layer.lora_a[slot, :r], a) and torch.equal(layer.lora_b[slot, :r], b.T), name
        assert not layer.lora_a[slot, r:].any() and not layer.lora_b[slot, r:].any(), f"{name}: rank not zero padded"


def assert_slot_empty(slots: LoRALayers, slot: int) -> None:
    assert slots.slot_ranks[slot] == 0
    assert all(not layer.lora_a[slot].any() and not layer.lora_b[slot].any() for layer in slots.layers.values())


# ---- device tier ---------------------------------------------------------------------------------


def test_acquire_copies_the_adapters_weights_into_its_slot(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=2)
    disk.ranks["a"] = MAX_RANK - 2
    load(manager, "a")
    slot = manager.acquire("a")
    assert manager.slot_of("a") == slot and manager.refcount("a") == 1
    assert_slot_holds(manager.lora_layers, slot, disk.weights("a"))  # rank zero padded to MAX_RANK
    assert_slot_empty(manager.lora_layers, 1 - slot)
    assert (manager.stats.misses, manager.stats.host_hits, manager.stats.slot_hits) == (1, 1, 0)
    manager.check_invariants()


def test_slot_hit_does_not_copy_again(make_manager, monkeypatch):
    manager, _ = make_manager(max_loras=1, max_cpu_loras=1)
    load(manager, "a")
    copies = []
    load_slot = manager.lora_layers.load
    monkeypatch.setattr(manager.lora_layers, "load", lambda slot, w: (copies.append(slot), load_slot(slot, w)))
    slot = manager.acquire("a")
    manager.release("a")
    assert manager.acquire("a") == slot and manager.acquire("a") == slot
    assert copies == [slot] and manager.refcount("a") == 2
    assert (manager.stats.host_hits, manager.stats.slot_hits, manager.stats.evictions) == (1, 2, 0)


def test_empty_slots_are_used_before_evicting(make_manager):
    manager, _ = make_manager(max_loras=3, max_cpu_loras=3)
    load(manager, "a", "b", "c")
    use(manager, "a", "b", "c")
    assert sorted(manager.slot_keys) == ["a", "b", "c"]
    assert manager.stats.evictions == 0


def test_slot_eviction_takes_the_least_recently_used_idle_slot(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=3)
    disk.ranks.update(a=MAX_RANK, b=1, c=MAX_RANK)
    load(manager, "a", "b", "c")
    use(manager, "a", "b", "a")  # b is now the least recently used slot
    slot_b = manager.slot_of("b")
    assert manager.acquire("c") == slot_b
    assert manager.slot_of("b") is None and manager.is_loaded("b"), "evicted from the slot, kept in host memory"
    assert manager.stats.evictions == 1
    assert_slot_holds(manager.lora_layers, slot_b, disk.weights("c"))
    manager.release("c")
    use(manager, "b")  # back from host memory, no disk read; a is LRU now
    assert manager.slot_keys[slot_b] == "c" and manager.slot_of("a") is None
    assert_slot_holds(manager.lora_layers, manager.slot_of("b"), disk.weights("b"))  # no rows left of a's larger rank
    assert disk.num_loads("b") == 1 and manager.stats.host_hits == 4
    manager.check_invariants()


def test_pinned_adapters_leave_slots_last(make_manager):
    manager, _ = make_manager(max_loras=2, max_cpu_loras=4)
    load(manager, "p", "a", "b")
    manager.pin(src("p"))
    use(manager, "p", "a")  # p is the least recently used slot, but pinned
    assert manager.acquire("b") != manager.slot_of("p") and manager.slot_of("a") is None
    manager.release("b")
    manager.unpin("p")
    load(manager, "c")
    use(manager, "c")  # unpinned now: p (LRU) goes first
    assert manager.slot_of("p") is None and manager.slot_of("b") is not None


def test_referenced_adapters_are_never_evicted(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=3)
    load(manager, "a", "b", "c")
    slots = {x: manager.acquire(x) for x in ("a", "b")}
    assert not manager.can_acquire("c")
    with pytest.raises(RuntimeError, match="can_acquire"):
        manager.acquire("c")
    for other in ("d", "e", "f"):  # each load needs host room: only the unreferenced adapter can go
        load(manager, other)
        assert not manager.can_acquire(other)
    assert set(manager.host_keys) == {"a", "b", "f"} and manager.stats.host_evictions == 3
    for x, slot in slots.items():
        assert manager.slot_of(x) == slot and manager.refcount(x) == 1
        assert_slot_holds(manager.lora_layers, slot, disk.weights(x))
    manager.check_invariants()


def test_prefetch_and_put_refuse_when_nothing_can_leave_host_memory(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=2)
    load(manager, "a", "b")
    manager.acquire("a")
    manager.acquire("b")
    assert not manager.prefetch(src("c")) and not manager.put("c", disk.weights("c"))
    assert manager.stats.misses == 2 and manager.host_keys == ["a", "b"]
    manager.release("b")
    assert manager.put("c", disk.weights("c")) and manager.host_keys == ["a", "c"]


def test_host_eviction_is_lru_with_idle_slot_keys_last(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=3)
    load(manager, "s", "a", "b")
    use(manager, "s")  # s sits in the idle slot and is the most recently used
    manager.put("a", disk.weights("a"))  # put of a present id only refreshes it: b is now the LRU
    assert manager.host_keys == ["b", "s", "a"]
    load(manager, "c")
    assert manager.host_keys == ["s", "a", "c"]
    load(manager, "d")  # s is least recently used, but in a slot: a goes first
    assert manager.host_keys == ["s", "c", "d"]
    assert manager.prefetch(src("e"), keep={"c"})  # adapters of requests ahead are kept: d goes
    assert land(manager) == [] and manager.host_keys == ["s", "c", "e"]
    assert manager.put("f", disk.weights("f")) and manager.host_keys == ["s", "e", "f"]
    assert manager.stats.host_evictions == 4


def test_idle_slot_keys_leave_host_memory_when_nothing_else_can(make_manager):
    manager, _ = make_manager(max_loras=2, max_cpu_loras=2)
    load(manager, "s1", "s2")
    use(manager, "s1", "s2")
    slot = manager.slot_of("s1")
    load(manager, "c")  # only adapters in idle slots are left: the least recently used goes, slot and all
    assert manager.host_keys == ["s2", "c"] and manager.slot_of("s1") is None
    assert manager.slot_keys[slot] is None
    assert_slot_empty(manager.lora_layers, slot)
    manager.check_invariants()


def test_release_without_acquire_raises(make_manager):
    manager, _ = make_manager(max_loras=1, max_cpu_loras=1)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        manager.release("never-seen")
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        manager.release_slot(0)  # empty slot
    load(manager, "a")
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        manager.release("a")  # loaded, not acquired
    use(manager, "a")
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        manager.release("a")  # in a slot, every reference already released
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        manager.release_slot(manager.slot_of("a"))
    assert manager.refcount("a") == 0
    manager.check_invariants()


def test_cannot_acquire_an_adapter_that_is_not_loaded(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=2)
    disk.gates["slow"] = threading.Event()
    assert not manager.can_acquire("unknown")
    assert manager.prefetch(src("slow")) and manager.is_loading("slow")
    assert not manager.can_acquire("slow")
    with pytest.raises(RuntimeError, match="cannot be acquired now"):
        manager.acquire("slow")
    disk.gates["slow"].set()
    assert land(manager) == [] and manager.can_acquire("slow")


# ---- disk loads ----------------------------------------------------------------------------------


def test_loads_run_on_the_loader_thread_and_prefetch_does_not_wait(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=2)
    disk.gates["slow"] = threading.Event()  # the load blocks until the gate opens: prefetch must not wait for it
    assert manager.prefetch(src("slow"))
    assert manager.prefetch(src("slow"))  # already on its way: not queued twice
    manager.wait(0.05)
    assert manager.poll() == [] and manager.is_loading("slow") and not manager.is_loaded("slow")
    disk.gates["slow"].set()
    assert land(manager) == [] and manager.is_loaded("slow")
    assert disk.calls == [("slow", LOADER_THREAD)] and manager.stats.misses == 1


@pytest.mark.parametrize("error", [CorruptWeightsError("truncated"), AdapterNotFoundError("no such adapter")])
def test_load_failure_is_reported_once_and_not_cached(make_manager, error):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=2)
    disk.errors["bad"] = error
    assert manager.prefetch(src("bad"))
    assert land(manager) == [("bad", error)]
    assert manager.poll() == [] and not manager.is_loaded("bad") and not manager.is_loading("bad")
    assert manager.stats.load_failures == 1
    manager.check_invariants()
    del disk.errors["bad"]  # fixed on disk: the next prefetch reads it again
    load(manager, "bad")
    assert disk.num_loads("bad") == 2 and manager.stats.misses == 2 and manager.stats.load_failures == 1


def test_a_failed_load_does_not_disturb_other_adapters(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=3)
    disk.errors["bad"] = CorruptWeightsError("truncated")
    load(manager, "a")
    slot = manager.acquire("a")
    manager.prefetch(src("bad"))
    manager.prefetch(src("b"))
    failures = land(manager)
    assert [adapter_key for adapter_key, _ in failures] == ["bad"]
    assert manager.host_keys == ["a", "b"] and manager.slot_of("a") == slot
    assert_slot_holds(manager.lora_layers, slot, disk.weights("a"))


# ---- pins and removal ----------------------------------------------------------------------------


def test_pin_limit_is_max_cpu_loras_minus_max_loras_minus_one(make_manager):
    manager, _ = make_manager(max_loras=2, max_cpu_loras=4)  # limit 1
    load(manager, "a", "b")
    manager.pin(src("a"))
    manager.pin(src("a"))  # pinning twice is harmless
    with pytest.raises(ValueError, match=r"at most 1 adapters can be pinned .*raise max_cpu_loras"):
        manager.pin(src("b"))
    assert not manager.is_pinned("b")
    manager.unpin("a")
    manager.pin(src("b"))
    assert manager.is_pinned("b") and not manager.is_pinned("a")


def test_no_pins_when_host_memory_only_fits_the_slots_plus_one(make_manager):
    manager, _ = make_manager(max_loras=2, max_cpu_loras=3)
    with pytest.raises(ValueError, match="at most 0 adapters can be pinned"):
        manager.pin(src("a"))
    assert manager.num_loading == 0, "a refused pin starts no load"


def test_pinned_adapters_never_leave_host_memory(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=3)
    manager.pin(src("p"))  # loads it
    assert land(manager) == [] and manager.is_loaded("p")
    for other in "abcdef":
        load(manager, other)
        use(manager, other)
        assert manager.is_loaded("p")
    use(manager, "p")
    for other in "ghi":
        load(manager, other)  # p sits in the idle slot, the host tier's preferred choice if it were unpinned
        assert manager.is_loaded("p")
    assert disk.num_loads("p") == 1


def test_remove_of_an_idle_adapter_drops_it_and_clears_its_slot(make_manager):
    manager, _ = make_manager(max_loras=1, max_cpu_loras=3)
    load(manager, "a")
    use(manager, "a")
    manager.pin(src("a"))
    manager.remove("a")
    assert not manager.is_loaded("a") and not manager.is_pinned("a") and manager.slot_keys == [None]
    assert_slot_empty(manager.lora_layers, 0)
    manager.check_invariants()


def test_remove_of_an_adapter_in_use_drops_it_after_its_last_release(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=3)
    load(manager, "a", "b")
    slot = manager.acquire("a")
    manager.acquire("a")
    manager.pin(src("a"))
    manager.remove("a")
    assert not manager.is_pinned("a") and not manager.is_loaded("a"), "the id is free at once"
    assert manager.slot_of("a") is None
    assert_slot_holds(manager.lora_layers, slot, disk.weights("a"))  # running requests keep their weights
    assert not manager.can_acquire("b"), "the slot is still in use"
    manager.release_slot(slot)
    assert_slot_holds(manager.lora_layers, slot, disk.weights("a"))
    manager.check_invariants()
    manager.release_slot(slot)
    assert manager.slot_keys == [None] and manager.host_keys == ["b"]
    assert_slot_empty(manager.lora_layers, slot)
    assert manager.can_acquire("b")
    manager.check_invariants()


def test_readding_an_adapter_removed_in_use_serves_the_new_weights(make_manager):
    manager, disk = make_manager(max_loras=2, max_cpu_loras=4)
    load(manager, "a")
    old_slot = manager.acquire("a")
    manager.remove("a")
    assert manager.put("a", disk.weights("a-v2"))  # a new version under the same id
    manager.pin(src("a"))
    new_slot = manager.acquire("a")
    assert new_slot != old_slot
    assert_slot_holds(manager.lora_layers, new_slot, disk.weights("a-v2"))
    assert_slot_holds(manager.lora_layers, old_slot, disk.weights("a"))
    manager.check_invariants()
    manager.release_slot(old_slot)  # the last request on the old version finishes
    assert_slot_empty(manager.lora_layers, old_slot)
    assert manager.is_pinned("a") and manager.is_loaded("a") and manager.slot_of("a") == new_slot
    manager.release("a")
    manager.check_invariants()


def test_remove_of_a_loading_adapter_discards_it_when_it_lands(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=1)
    disk.gates["slow"] = threading.Event()
    manager.prefetch(src("slow"))
    manager.remove("slow")
    disk.gates["slow"].set()
    assert land(manager) == []
    assert not manager.is_loaded("slow") and manager.host_keys == []
    load(manager, "a")  # its host room is free again
    manager.check_invariants()


def test_prefetch_after_remove_of_a_loading_adapter_loads_it(make_manager):
    manager, disk = make_manager(max_loras=1, max_cpu_loras=2)
    disk.gates["a"] = threading.Event()
    manager.prefetch(src("a"))
    manager.remove("a")
    assert manager.prefetch(src("a"))  # wanted again before the first load landed: "on its way"
    disk.gates["a"].set()
    assert land(manager) == []
    assert manager.is_loaded("a") and disk.num_loads("a") == 1  # the load in flight is kept, not repeated
    manager.check_invariants()


# ---- reservations (fairness) ---------------------------------------------------------------------


def busy_three_slots(make_manager):
    """Slots 0, 1, 2 hold a (2 refs), b (1 ref) and c (1 ref, least recently used); x and y are loaded and wait."""
    manager, disk = make_manager(max_loras=3, max_cpu_loras=5)
    load(manager, "a", "b", "c", "x", "y")
    for adapter_key in ("a", "a", "b", "c", "b"):
        manager.acquire(adapter_key)
    manager.release("b")
    assert manager.slot_keys == ["a", "b", "c"] and not manager.can_acquire("x")
    return manager, disk


def test_reserve_picks_the_least_referenced_then_least_recently_used_slot(make_manager):
    manager, _ = busy_three_slots(make_manager)
    manager.reserve("x", waiting={"x"})
    assert manager.reservation == (2, "x")
    manager.check_invariants()


def test_reserved_slot_is_kept_for_the_waiting_adapter(make_manager):
    manager, disk = busy_three_slots(make_manager)
    manager.reserve("x", waiting={"x", "y"})
    assert not manager.can_acquire("c") and manager.can_acquire("a") and manager.can_acquire("b")
    with pytest.raises(RuntimeError):
        manager.acquire("c")  # no new request for c joins the slot being drained
    manager.release("c")
    assert not manager.can_acquire("y") and not manager.can_acquire("c"), "the free slot is x's"
    load(manager, "z")  # x is never the host tier's victim while it holds a reservation
    assert manager.is_loaded("x")
    assert manager.acquire("x") == 2
    assert manager.reservation is None and manager.slot_of("c") is None and manager.is_loaded("c")
    assert_slot_holds(manager.lora_layers, 2, disk.weights("x"))
    manager.check_invariants()


def test_reservation_stays_while_waiting_and_clears_when_not(make_manager):
    manager, _ = busy_three_slots(make_manager)
    manager.reserve("x", waiting={"x", "y"})
    manager.reserve("y", waiting={"x", "y"})  # x still waits: the slot being drained is not switched
    manager.reserve(None, waiting={"x"})
    assert manager.reservation == (2, "x")
    manager.reserve(None, waiting={"y"})
    assert manager.reservation is None and manager.can_acquire("c")
    manager.reserve("y", waiting={"y"})
    assert manager.reservation == (2, "y")
    manager.remove("y")
    assert manager.reservation is None


def test_reserve_does_nothing_for_adapters_that_can_acquire_or_are_not_loaded(make_manager):
    manager, _ = busy_three_slots(make_manager)
    manager.reserve("a", waiting={"a"})
    manager.reserve("not-loaded", waiting={"not-loaded"})
    assert manager.reservation is None
    manager.release("b")
    manager.reserve("x", waiting={"x"})  # b's slot is idle: x can take it now
    assert manager.reservation is None and manager.can_acquire("x")


# ---- config ------------------------------------------------------------------------------------


def test_max_cpu_loras_below_max_loras_is_refused(slots_for):
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        AdapterManager(slots_for(2), 1, read_fn=lambda adapter_key: None)


# ---- property: random operation sequences --------------------------------------------------------

IDS = [f"ad{i}" for i in range(8)]


class AdapterCacheMachine(RuleBasedStateMachine):
    """Random put/acquire/release/pin/unpin/remove/reserve against a model of held references and pins.

    Loads go through `put` only, so no loader thread runs. Rules draw mostly from the adapters where
    they do something (loaded ones for acquire and pin, held ones for release; remove only once the
    host tier is nearly full), so that full host tiers, busy slots, evictions and reservations are
    reached within a few steps. An adapter removed while in use lives on in its slot under a private
    name until its running requests release the slot (`release_slot`).
    """

    def __init__(self, slots_for: Callable[[int], LoRALayers], versions: dict[tuple[str, int], LoRAWeights]) -> None:
        super().__init__()
        self.slots_for = slots_for
        self.versions = versions  # (adapter id, version) -> weights: a re-added id may come with new weights

    @initialize(max_loras=st.integers(1, 3), extra=st.integers(0, 3), num_preloaded=st.integers(0, 6))
    def start(self, max_loras: int, extra: int, num_preloaded: int) -> None:
        self.manager = AdapterManager(self.slots_for(max_loras), max_loras + extra, read_fn=self._no_disk)
        self.pin_limit = extra - 1
        self.weights: dict[str, LoRAWeights] = {}  # adapter key -> the weights it was last put with
        self.held: Counter[str] = Counter()  # adapter key -> references taken by acquire
        self.held_slot: dict[str, int] = {}
        self.retired: dict[int, tuple[LoRAWeights, int]] = {}  # slot -> (weights, references) of removed adapters
        self.pinned: set[str] = set()
        self.slot_last_use = [0] * max_loras  # step of each slot's last acquire or release
        self.step = 0
        for adapter_key in IDS[: min(num_preloaded, max_loras + extra)]:
            assert self.manager.put(adapter_key, self.versions[adapter_key, 0])
            self.weights[adapter_key] = self.versions[adapter_key, 0]

    @staticmethod
    def _no_disk(adapter_key: str) -> LoRAWeights:
        raise AssertionError("the property test loads with put only")

    def _loaded_ids(self) -> list[str]:
        return [a for a in self.manager.host_keys if a in IDS]  # not the private names of removed ones

    def _draw(self, data: st.DataObject, preferred: list[str]) -> str:
        return data.draw(st.sampled_from(preferred or IDS))

    def _slot_refs(self) -> list[int]:
        owners = self.manager.slot_keys
        return [self.retired[i][1] if i in self.retired else self.held[owner] for i, owner in enumerate(owners)]

    def _touch(self, slot: int) -> None:
        self.step += 1
        self.slot_last_use[slot] = self.step

    def _evictable(self, adapter_key: str) -> bool:
        reserved = self.manager.reservation
        in_use = adapter_key not in IDS or self.held[adapter_key]
        return not (in_use or adapter_key in self.pinned or (reserved and reserved[1] == adapter_key))

    # ---- operations ----

    @rule(data=st.data(), new=st.booleans(), version=st.integers(0, 1))
    def put(self, data: st.DataObject, new: bool, version: int) -> None:
        host_before = self.manager.host_keys
        adapter_key = self._draw(data, [a for a in IDS if a not in host_before] if new else IDS)
        if self.manager.put(adapter_key, self.versions[adapter_key, version]):
            assert self.manager.host_keys[-1] == adapter_key
            if adapter_key not in host_before:  # a present id keeps its weights
                self.weights[adapter_key] = self.versions[adapter_key, version]
        else:
            assert len(host_before) == self.manager.max_cpu_loras
            assert not any(self._evictable(a) for a in host_before), "put refused although an adapter could go"

    @rule(data=st.data(), in_slot=st.booleans())
    def acquire(self, data: st.DataObject, in_slot: bool) -> None:
        loaded = self._loaded_ids()
        adapter_key = self._draw(data, [a for a in loaded if (self.manager.slot_of(a) is not None) == in_slot] or loaded)
        can = self.manager.can_acquire(adapter_key)
        assert can == self._expect_can_acquire(adapter_key)
        if not can:
            with pytest.raises(RuntimeError):
                self.manager.acquire(adapter_key)
            return
        expected = self.manager.slot_of(adapter_key)
        if expected is None:
            expected = self._slot_to_fill(adapter_key)
        assert self.manager.acquire(adapter_key) == expected
        assert self.held_slot.setdefault(adapter_key, expected) == expected
        self.held[adapter_key] += 1
        self._touch(expected)

    def _usable_slots(self, adapter_key: str) -> list[int]:
        """Slots without references and not reserved for another adapter."""
        reserved = self.manager.reservation
        reserved_away = reserved[0] if reserved and reserved[1] != adapter_key else None
        return [i for i, refs in enumerate(self._slot_refs()) if not refs and i != reserved_away]

    def _slot_to_fill(self, adapter_key: str) -> int:
        """An empty slot, else the least recently used idle one, pinned adapters' last."""
        usable = self._usable_slots(adapter_key)
        owners = self.manager.slot_keys
        empty = [i for i in usable if owners[i] is None]
        return empty[0] if empty else min(usable, key=lambda i: (owners[i] in self.pinned, self.slot_last_use[i]))

    def _expect_can_acquire(self, adapter_key: str) -> bool:
        if not self.manager.is_loaded(adapter_key):
            return False
        slot = self.manager.slot_of(adapter_key)
        reserved = self.manager.reservation
        if slot is not None:
            return not (reserved and reserved[0] == slot and reserved[1] != adapter_key)
        return bool(self._usable_slots(adapter_key))

    @rule(data=st.data(), every_reference=st.booleans())
    def release(self, data: st.DataObject, every_reference: bool) -> None:
        """Release one or every reference of a held adapter, or of a removed one's slot (`release_slot`)."""
        choice = data.draw(st.sampled_from([*sorted(+self.held), *sorted(self.retired)] or IDS))
        if isinstance(choice, int):
            self._release_removed(choice, every_reference)
        elif not self.held[choice]:
            with pytest.raises(RuntimeError, match="without a matching acquire"):
                self.manager.release(choice)
        else:
            slot = self.held_slot[choice]
            for _ in range(self.held[choice] if every_reference else 1):
                self.manager.release(choice)
                self.held[choice] -= 1
                self._touch(slot)
            if not self.held[choice]:
                del self.held_slot[choice]

    def _release_removed(self, slot: int, every_reference: bool) -> None:
        weights, refs = self.retired.pop(slot)
        for _ in range(refs if every_reference else 1):
            self.manager.release_slot(slot)
            self._touch(slot)
            refs -= 1
        if refs:
            self.retired[slot] = (weights, refs)
        else:
            assert self.manager.slot_keys[slot] is None, "a removed adapter goes with its last reference"

    @rule(data=st.data(), unpin=st.booleans())
    def pin_or_unpin(self, data: st.DataObject, unpin: bool) -> None:
        if unpin:
            adapter_key = self._draw(data, sorted(self.pinned))
            self.manager.unpin(adapter_key)
            self.pinned.discard(adapter_key)
            assert not self.manager.is_pinned(adapter_key)
            return
        adapter_key = self._draw(data, self._loaded_ids())
        if not self.manager.is_loaded(adapter_key):
            return  # pinning an adapter that is not loaded starts a disk load: not in this test
        if adapter_key in self.pinned or len(self.pinned) < self.pin_limit:
            self.manager.pin(src(adapter_key))
            self.pinned.add(adapter_key)
        else:
            with pytest.raises(ValueError, match="can be pinned"):
                self.manager.pin(src(adapter_key))
        assert self.manager.num_loading == 0

    @precondition(lambda self: len(self.manager.host_keys) >= self.manager.max_cpu_loras - 1)  # else puts rarely fill it
    @rule(data=st.data(), held=st.booleans())
    def remove(self, data: st.DataObject, held: bool) -> None:
        adapter_key = self._draw(data, sorted(+self.held) if held else IDS)
        self.manager.remove(adapter_key)
        self.pinned.discard(adapter_key)
        if self.held[adapter_key]:
            self.retired[self.held_slot.pop(adapter_key)] = (self.weights[adapter_key], self.held.pop(adapter_key))
        assert not self.manager.is_loaded(adapter_key) and self.manager.slot_of(adapter_key) is None

    @rule(data=st.data(), waiting=st.sets(st.sampled_from(IDS)))
    def reserve(self, data: st.DataObject, waiting: set[str]) -> None:
        not_in_slot = [a for a in self._loaded_ids() if self.manager.slot_of(a) is None]
        waiting_one = not_in_slot and data.draw(st.booleans())
        adapter_key = data.draw(st.sampled_from(not_in_slot if waiting_one else [None, *IDS]))
        if adapter_key is not None and data.draw(st.booleans()):
            waiting = waiting | {adapter_key}
        before = self.manager.reservation
        could_acquire = adapter_key is not None and self.manager.can_acquire(adapter_key)
        self.manager.reserve(adapter_key, waiting)
        after = self.manager.reservation
        if before is not None and before[1] in waiting and self.manager.slot_of(before[1]) is None:
            assert after == before, "a reservation for a waiting adapter is kept"
        elif after is not None:
            slot, reserved_for = after
            assert reserved_for == adapter_key and self.manager.is_loaded(adapter_key) and not could_acquire
            refs = self._slot_refs()
            assert all(refs), "slots are only reserved when every one is busy"
            assert min(range(len(refs)), key=lambda i: (refs[i], self.slot_last_use[i])) == slot, "fewest references, then LRU"

    # ---- invariants ----

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.manager.check_invariants()

    @invariant()
    def referenced_slots_keep_their_adapter_and_weights(self) -> None:
        for adapter_key, slot in self.held_slot.items():
            assert self.manager.slot_of(adapter_key) == slot and self.manager.refcount(adapter_key) == self.held[adapter_key]
        slots = self.manager.lora_layers
        for slot, owner in enumerate(self.manager.slot_keys):
            if slot in self.retired:
                assert owner not in IDS, "a removed adapter's slot is not reachable by its id"
                assert_slot_holds(slots, slot, self.retired[slot][0])
            elif owner is None:
                assert_slot_empty(slots, slot)
            else:
                assert_slot_holds(slots, slot, self.weights[owner])

    @invariant()
    def pinned_adapters_stay_in_host_memory(self) -> None:
        assert self.pinned <= set(self.manager.host_keys)
        assert all(self.manager.is_pinned(a) for a in self.pinned)

    @invariant()
    def reserved_slot_admits_no_one_else(self) -> None:
        reserved = self.manager.reservation
        if reserved is not None:
            owner = self.manager.slot_keys[reserved[0]]
            assert owner not in IDS or owner == reserved[1] or not self.manager.can_acquire(owner)


def test_random_operations_keep_invariants_and_never_evict_referenced_adapters(slots_for):
    targets = slots_for(1).targets
    versions = {(adapter_key, v): make_weights(targets, f"{adapter_key}-v{v}") for adapter_key in IDS for v in (0, 1)}
    run_state_machine_as_test(
        lambda: AdapterCacheMachine(slots_for, versions),
        settings=settings(max_examples=200, stateful_step_count=50, deadline=None),
    )
