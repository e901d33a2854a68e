"""Continuous batching: which tokens of which requests run in the next forward pass.

Every step is scheduled from scratch under two budgets, `max_num_seqs` running sequences and
`max_num_batched_tokens` tokens. Running decodes go first (one token each), then running prefill
chunks, then waiting requests in arrival order; a prompt longer than the token budget left is
prefilled in chunks over several steps, so it never stalls the decodes. When the KV cache runs
out, the newest running request is preempted: its blocks are freed and it goes back to the front
of the waiting queue, to be recomputed (prompt + what it generated so far) later.

Adapters: a request for an adapter runs only while it holds a reference to that adapter's device
slot, so at most `max_loras` distinct adapters are in a batch. A waiting request whose adapter is
not ready (still loading from disk, or no slot free) is skipped, and requests behind it go ahead:
no head-of-line blocking. Its disk load starts at once on the adapter manager's loader thread.
When every slot is busy, the oldest request waiting for a slot gets one reserved (see
`AdapterManager.reserve`), so a hot adapter cannot starve cold ones. A request whose adapter fails
to load finishes with that error; nothing else is affected.

Prefix caching (when the block manager has a PrefixCache): a request is admitted with the cached
blocks of its longest cached prefix, its computed tokens set past them, and only the rest is
prefilled; at least its last token is always computed, for the logits. A step whose sampled logits
were finite vouches for every K/V its request has written so far (the sampled token attended them
all), so the full blocks among them are offered to the cache then (`_cache_computed`). A request
that leaves unvouched (failed, aborted, timed out or preempted) clears only its uncached blocks:
the cached ones were vouched already, and may be shared.

Deadlines: each step first finishes the requests whose deadline has passed (`Request.deadline`),
waiting or running, with FinishReason.TIMEOUT; their blocks and slot references are freed at once.

The scheduler keeps the books only: tokens, budgets, blocks, slots, and the finish conditions it
can see from token ids (eos, stop token ids, max_tokens, max_seq_len). Text and stop strings are
the output stage's (`engine/output.py`), which finishes a request through `finish_request`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorax_lite.engine.catalog import ResolvedAdapter
from lorax_lite.engine.kv_cache import BlockManager
from lorax_lite.engine.prefix_cache import BlockHash, PrefixCacheStats, hash_blocks, prefix_salt
from lorax_lite.engine.request import FinishReason, Request, RequestStatus
from lorax_lite.invariants import require
from lorax_lite.lora.manager import AdapterManager


@dataclass
class ScheduledBatch:
    """The work of one step: `num_new_tokens[i]` tokens of `requests[i]`, after its computed ones."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether request i gets a next token this step (its scheduled tokens reach its end)."""
        req = self.requests[i]
        return req.num_computed_tokens + self.num_new_tokens[i] == req.num_tokens

    @property
    def sampling_requests(self) -> list[Request]:
        return [r for i, r in enumerate(self.requests) if self.samples(i)]

    def split(self) -> tuple[ScheduledBatch, ScheduledBatch]:
        """Its first and second half, each a batch of its own (to find the request a failed forward pass fails for)."""
        half = len(self.requests) // 2
        return (ScheduledBatch(self.requests[:half], self.num_new_tokens[:half]),
                ScheduledBatch(self.requests[half:], self.num_new_tokens[half:]))


class Scheduler:
    """Decides each step's batch and applies its results; owns the waiting and running queues."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_seq_len: int,
        eos_token_ids: set[int],
        adapter_manager: AdapterManager | None = None,
        clear_blocks: Callable[[list[int]], None] | None = None,
    ) -> None:
        """`max_seq_len` must fit in the KV cache alone (`plan_kv_cache` sees to it), else a long request
        could preempt itself forever.

        `clear_blocks` zeroes the K/V of blocks (the runner's `clear_blocks`). It is called on the blocks of
        a request that leaves before a finished generation vouched for its K/V (failed, aborted, timed out or
        preempted), before anyone else can get them: padded attention multiplies masked rows by 0, and
        0 x NaN is NaN, so a NaN one request wrote would reach the next owner of its blocks."""
        capacity = block_manager.num_blocks * block_manager.block_size
        require(max_seq_len <= capacity, f"max_seq_len {max_seq_len} exceeds the KV cache's {capacity} tokens")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.eos_token_ids = set(eos_token_ids)
        self.adapter_manager = adapter_manager
        self.clear_blocks = clear_blocks
        self._finished: list[Request] = []  # finished by the scheduler itself, between steps; see take_finished
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the newest
        self.num_preemptions = 0
        self.prefix_cache_stats = PrefixCacheStats()
        self._preempted_this_step = False

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """Requests are waiting or running, or finished by the scheduler with outputs not yet taken."""
        return bool(self.waiting or self.running or self._finished)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request wherever it is, freeing its blocks. Unknown or finished ids: None."""
        for req in list(self.waiting) + self.running:
            if req.request_id == request_id:
                self.finish_request(req, FinishReason.ABORT)
                return req
        return None

    def fail_waiting(self, adapter_key: str, error: Exception) -> None:
        """Finish the waiting requests for `adapter_key` with `error` (its adapter was removed)."""
        for req in [r for r in self.waiting if r.adapter_key == adapter_key]:
            self.finish_request(req, FinishReason.ERROR, error)
            self._finished.append(req)

    def take_finished(self) -> list[Request]:
        """The requests the scheduler finished itself since the last call (adapter load failed or removed,
        deadline passed)."""
        finished, self._finished = self._finished, []
        return finished

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline (time.monotonic()) of a waiting or running request; None if none has one."""
        deadlines = [r.deadline for r in (*self.waiting, *self.running) if r.deadline is not None]
        return min(deadlines, default=None)

    def _expire(self) -> None:
        now = time.monotonic()
        for req in [r for r in (*self.waiting, *self.running) if r.is_past_deadline(now)]:
            self.finish_request(req, FinishReason.TIMEOUT)
            self._finished.append(req)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._preempted_this_step = False
        self._expire()
        self._fail_adapter_loads()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not self._preempted_this_step:  # memory is tight: admit nobody new this step
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1]
        prefills = [r for r in self.running if r.num_uncomputed_tokens > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(req.num_uncomputed_tokens, budget)
            budget = self._reserve(batch, req, n, budget)
            if req.status is RequestStatus.RUNNING:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
        return budget

    def _reserve(self, batch: ScheduledBatch, req: Request, n: int, budget: int) -> int:
        """Make room for `n` more tokens of `req`, preempting the newest running requests; returns the budget."""
        total = req.num_computed_tokens + n
        while not self.block_manager.can_append(req.request_id, total):
            victim = self.running[-1]
            budget += self._unschedule(batch, victim)
            self._preempt(victim)
            if victim is req:
                return budget
        self.block_manager.append(req.request_id, total)
        return budget

    def _unschedule(self, batch: ScheduledBatch, req: Request) -> int:
        if req not in batch.requests:
            return 0
        i = batch.requests.index(req)
        batch.requests.pop(i)
        return batch.num_new_tokens.pop(i)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req, vouched=False)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        self._preempted_this_step = True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        blocked_on_slot = None  # adapter of the oldest request that is loaded but finds no free slot
        ahead: set[str] = set()  # adapters of the waiting requests seen so far: loading others never evicts them
        for req in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            adapter = req.adapter
            if adapter is not None and not self._adapter_ready(adapter, ahead):
                if blocked_on_slot is None and self._manager().is_loaded(adapter.adapter_key):
                    blocked_on_slot = adapter.adapter_key
                ahead.add(adapter.adapter_key)
                continue  # no head-of-line blocking: later requests for ready adapters go ahead
            cached = self._cached_prefix(req)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            n = min(req.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.can_allocate(num_cached_tokens + n, cached):
                break  # first come, first served for KV memory: nobody overtakes this request
            self._admit(batch, req, n, cached)
            budget -= n
        if self.adapter_manager is not None:
            waiting = {r.adapter_key for r in self.waiting if r.adapter_key is not None}
            self.adapter_manager.reserve(blocked_on_slot, waiting)

    def _adapter_ready(self, adapter: ResolvedAdapter, ahead: set[str]) -> bool:
        """Whether the adapter can take a slot now; if it is not in memory yet, start loading it."""
        manager = self._manager()
        if manager.can_acquire(adapter.adapter_key):
            return True
        if not manager.is_loaded(adapter.adapter_key) and manager.num_loading < manager.max_loras:
            manager.prefetch(adapter.source, keep=ahead)
        return False

    def _manager(self) -> AdapterManager:
        """The adapter manager, which only requests with an adapter use (the engine refuses them when LoRA is off)."""
        if self.adapter_manager is None:
            raise RuntimeError("a request has an adapter but this scheduler has no adapter manager (LoRA is off)")
        return self.adapter_manager

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks of its longest cached prefix, short of its last token (which must be computed)."""
        if self.block_manager.prefix_cache is None:
            return []
        hashes = self._block_hashes(req, req.num_tokens)
        return self.block_manager.find_cached(hashes[: (req.num_tokens - 1) // self.block_manager.block_size])

    def _block_hashes(self, req: Request, num_tokens: int) -> list[BlockHash]:
        """Its block hashes, extended to cover the full blocks of its first `num_tokens` tokens (at least)."""
        block_size, hashes = self.block_manager.block_size, req.block_hashes
        if len(hashes) < num_tokens // block_size:
            start = len(hashes) * block_size
            salt = prefix_salt(req.adapter_key, req.cache_salt)
            hashes += hash_blocks(hashes[-1] if hashes else None, req.token_ids_slice(start, num_tokens), block_size,
                                  salt)
        return hashes

    def _cache_computed(self, req: Request) -> None:
        """Offer its fully computed blocks to the prefix cache: this step sampled from finite logits, which
        vouches for them."""
        if self.block_manager.prefix_cache is None:
            return
        num_blocks = req.num_computed_tokens // self.block_manager.block_size
        self.block_manager.cache_blocks(req.request_id, self._block_hashes(req, req.num_computed_tokens), num_blocks)

    def _admit(self, batch: ScheduledBatch, req: Request, n: int, cached: list[int]) -> None:
        self.waiting.remove(req)
        num_cached_tokens = len(cached) * self.block_manager.block_size
        self.block_manager.allocate(req.request_id, num_cached_tokens + n, cached)
        req.num_computed_tokens = num_cached_tokens
        if req.num_cached_tokens is None:
            req.num_cached_tokens = num_cached_tokens
        if self.block_manager.prefix_cache is not None:
            self.prefix_cache_stats.observe(req.num_tokens, num_cached_tokens)
        if req.adapter_key is not None:
            req.lora_slot = self._manager().acquire(req.adapter_key)
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.time()
        self.running.append(req)
        batch.requests.append(req)
        batch.num_new_tokens.append(n)

    def _release_adapter(self, req: Request) -> None:
        if req.lora_slot is not None:
            self._manager().release_slot(req.lora_slot)
            req.lora_slot = None

    def _fail_adapter_loads(self) -> None:
        if self.adapter_manager is None:
            return
        for adapter_key, error in self.adapter_manager.poll():
            self.fail_waiting(adapter_key, error)

    @property
    def is_waiting_for_adapters(self) -> bool:
        """Nothing could be scheduled only because adapters are still loading from disk."""
        return not self.running and self.adapter_manager is not None and self.adapter_manager.num_loading > 0

    def postprocess(self, batch: ScheduledBatch, sampled: list[int], logprobs: list[float]) -> list[Request]:
        """Apply a step's results (one token, and its logprob, per sampling request not finished); returns the
        requests that got a new token (finished or not). Requests that failed this step are finished already
        and skipped."""
        sampling = iter(zip(sampled, logprobs, strict=True))
        updated = []
        for i, req in enumerate(batch.requests):
            if req.is_finished:
                continue
            samples = batch.samples(i)
            req.num_computed_tokens += batch.num_new_tokens[i]
            if samples:
                self._cache_computed(req)
                self._append_token(req, *next(sampling))
                updated.append(req)
        return updated

    def _append_token(self, req: Request, token_id: int, logprob: float) -> None:
        req.output_token_ids.append(token_id)
        req.output_logprobs.append(logprob)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.time()
        reason = self._stop_reason(req, token_id)
        if reason is not None:
            self.finish_request(req, reason)

    def _stop_reason(self, req: Request, token_id: int) -> FinishReason | None:
        params = req.sampling_params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return FinishReason.STOP
        if req.num_generated_tokens >= params.max_tokens or req.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def finish_request(self, req: Request, reason: FinishReason, error: str | Exception | None = None) -> None:
        """End a request wherever it is: its blocks and its adapter slot reference are freed now."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req, vouched=reason in (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH))
        req.finish(reason, error)

    def _free(self, req: Request, vouched: bool) -> None:
        """Give back its blocks and its adapter slot reference. `vouched`: its last step sampled from finite
        logits, which attended every K/V it wrote, so they are finite; otherwise its blocks are cleared first,
        except the cached ones (vouched when they were cached, and maybe shared)."""
        if not vouched and self.clear_blocks is not None:
            self.clear_blocks(self.block_manager.uncached_blocks(req.request_id))
        self.block_manager.free(req.request_id)
        self._release_adapter(req)
