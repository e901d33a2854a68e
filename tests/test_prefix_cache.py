"""Prefix caching without a model: the salted hash chain, the block manager's sharing, LRU eviction and invariants
(property-tested with hypothesis), and the scheduler's rules (the last token is computed; only vouched blocks
are cached; an unvouched request clears its uncached blocks only). Engine-level correctness:
test_prefix_cache_engine.py.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorax_lite.engine.kv_cache import BlockManager
from lorax_lite.engine.prefix_cache import hash_blocks, prefix_salt
from lorax_lite.engine.request import FinishReason, Request, SamplingParams
from lorax_lite.engine.scheduler import Scheduler

BASE, PRICING_V1, PRICING_V2 = prefix_salt(None, None), prefix_salt("pricing@1", None), prefix_salt("pricing@2", None)


def test_the_hash_chain_names_the_whole_prefix_under_its_salt():
    tokens = list(range(10, 22))
    hashes = hash_blocks(None, tokens, 4, BASE)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    assert hash_blocks(None, tokens + [1, 2], 4, BASE) == hashes  # a partial block gets no hash
    assert hash_blocks(hashes[0], tokens[4:], 4, BASE) == hashes[1:]  # extending a chain = hashing it at once
    assert hash_blocks(None, [99] + tokens[1:], 4, BASE)[1:] != hashes[1:]  # a block's hash covers what came before
    for salt in (PRICING_V1, PRICING_V2, prefix_salt("pricing@1", "tenant-a"), prefix_salt(None, "tenant-a")):
        assert not set(hash_blocks(None, tokens, 4, salt)) & set(hashes)
    assert prefix_salt("a", None) != prefix_salt(None, "a") != prefix_salt("a", "")


def written(bm: BlockManager, seq: str, tokens: list[int], salt: bytes, num_computed: int) -> list[bytes]:
    """Vouch for a sequence's first `num_computed` tokens, as the scheduler does after a finite sample."""
    hashes = hash_blocks(None, tokens, bm.block_size, salt)
    bm.cache_blocks(seq, hashes, num_computed // bm.block_size)
    return hashes


def test_finished_blocks_stay_cached_shared_and_evicted_least_recent_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt = list(range(1, 13))  # 3 full blocks
    bm.allocate("a", 12)
    hashes = written(bm, "a", prompt, BASE, 12)
    bm.free("a")
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 3 and bm.num_free_blocks == 6
    bm.check_invariants(idle=True)
    assert bm.find_cached(hashes) == [0, 1, 2]
    assert bm.find_cached(hash_blocks(None, prompt, 4, PRICING_V1)) == []  # another adapter finds nothing
    bm.allocate("b", 13, cached=[0, 1])  # shares two cached blocks, gets two new ones
    bm.allocate("c", 9, cached=[0, 1])
    assert bm.block_table("b")[:2] == bm.block_table("c")[:2] == [0, 1]
    bm.check_invariants()
    assert bm.uncached_blocks("b") == bm.block_table("b")[2:]  # what an unvouched b would clear: never 0 or 1
    # 6 blocks: 0, 1 shared; b holds 3, 4; c holds 5; only 2 is evictable
    assert bm.num_free_blocks == 1 and bm.can_allocate(4) and not bm.can_allocate(5)
    bm.allocate("d", 4)  # evicts block 2, the only unreferenced cached block
    assert bm.block_table("d") == [2] and bm.find_cached(hashes) == [0, 1]
    for seq in ("b", "c", "d"):
        bm.free(seq)
    bm.check_invariants(idle=True)
    assert bm.num_cached_blocks == 2 and bm.num_used_blocks == 0


def test_a_hash_cached_twice_keeps_its_first_block():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.allocate("b", 4)  # the same prompt, computed in the same step: no hit for either
    hashes = written(bm, "a", [1, 2, 3, 4], BASE, 4)
    written(bm, "b", [1, 2, 3, 4], BASE, 4)
    assert bm.find_cached(hashes) == bm.block_table("a") and bm.uncached_blocks("b") == bm.block_table("b")
    bm.free("a")
    bm.free("b")
    assert bm.num_cached_blocks == 2 and len(bm._free) == 2
    bm.check_invariants(idle=True)


def test_without_caching_nothing_is_cached():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=False)
    bm.allocate("a", 4)
    hashes = written(bm, "a", [1, 2, 3, 4], BASE, 4)
    bm.free("a")
    assert bm.find_cached(hashes) == [] and bm.num_cached_blocks == 0 and bm.num_free_blocks == 4
    bm.check_invariants(idle=True)


# --- property test: random operations under three salts -----------------------------------------------------------

SALTS = [BASE, PRICING_V1, PRICING_V2]
PREFIXES = [[7, 7, 7, 7, 7, 7], [7, 7, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]]  # share leading tokens with each other


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences are admitted (with their cached prefix), compute tokens, decode new ones, and finish vouched or
    fail (clearing their uncached blocks). A model of what each block holds checks every lookup."""

    @initialize(num_blocks=st.integers(3, 24), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.seqs: dict[str, dict] = {}  # seq -> tokens, salt, num_computed
        self.holds: dict[int, tuple | None] = {}  # block -> (salt, the tokens up to its end) it holds; None: zeros
        self.next_id = 0

    @rule(salt=st.sampled_from(SALTS), prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(1, 9), max_size=8))
    def admit(self, salt: bytes, prefix: list[int], suffix: list[int]) -> None:
        tokens, bs = prefix + suffix, self.bm.block_size
        hashes = hash_blocks(None, tokens, bs, salt)
        cached = self.bm.find_cached(hashes[: (len(tokens) - 1) // bs])
        for i, block in enumerate(cached):  # a lookup finds only K/V written for these tokens under this salt
            assert self.holds.get(block) == (salt, tuple(tokens[: (i + 1) * bs]))
        if not self.bm.can_allocate(len(tokens), cached):
            return
        seq = f"s{self.next_id}"
        self.next_id += 1
        self.bm.allocate(seq, len(tokens), cached)
        self.seqs[seq] = {"tokens": tokens, "salt": salt, "num_computed": len(cached) * bs}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """Its next tokens are written (never into a cached block) and the step vouches for them."""
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        state, bs = self.seqs[seq], self.bm.block_size
        start = state["num_computed"]
        end = data.draw(st.integers(start, len(state["tokens"])))
        table = self.bm.block_table(seq)
        for pos in range(start, end):
            block = table[pos // bs]
            assert self.bm.prefix_cache is not None and not self.bm.prefix_cache.is_cached(block)
            full = (pos + 1) % bs == 0
            self.holds[block] = (state["salt"], tuple(state["tokens"][: pos + 1])) if full else ("partial",)
        state["num_computed"] = end
        written(self.bm, seq, state["tokens"], state["salt"], end)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(1, 9), min_size=1, max_size=5))
    def decode(self, data: st.DataObject, new: list[int]) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        state = self.seqs[seq]
        if state["num_computed"] == len(state["tokens"]) and self.bm.can_append(seq, len(state["tokens"]) + len(new)):
            state["tokens"] = state["tokens"] + new
            self.bm.append(seq, len(state["tokens"]))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), vouched=st.booleans())
    def finish(self, data: st.DataObject, vouched: bool) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        if not vouched:  # failed, aborted or preempted: what it alone holds is zeroed
            for block in self.bm.uncached_blocks(seq):
                self.holds[block] = None
        self.bm.free(seq)
        del self.seqs[seq]

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "bm"):
            self.bm.check_invariants(idle=not self.seqs)


TestBlockManagerProperties = BlockManagerMachine.TestCase
TestBlockManagerProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])


# --- the scheduler's rules ------------------------------------------------------------------------------------------


def make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64, cleared=None):
    bm = BlockManager(num_blocks, block_size)
    clear = None if cleared is None else cleared.extend
    return Scheduler(bm, 8, max_num_batched_tokens, max_seq_len=num_blocks * block_size, eos_token_ids={0},
                     clear_blocks=clear)


def make_request(rid, prompt, max_tokens=4, cache_salt=None):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), cache_salt=cache_salt)


def run_to_end(sched, token=7):
    while sched.has_unfinished():
        batch = sched.schedule()
        n = len(batch.sampling_requests)
        sched.postprocess(batch, [token] * n, [-1.0] * n)
        sched.block_manager.check_invariants()


def test_a_repeated_prompt_skips_its_cached_full_blocks_but_never_its_last_token():
    sched = make_scheduler()
    for prompt_len, expected_hit in ((10, 8), (12, 8), (13, 12), (3, 0)):
        prompt = list(range(prompt_len * 100, prompt_len * 101))  # no prefix in common with the other cases
        first, second = make_request(f"a{prompt_len}", prompt), make_request(f"b{prompt_len}", prompt)
        sched.add(first)
        run_to_end(sched)
        assert first.num_cached_tokens == 0
        sched.add(second)
        batch = sched.schedule()
        assert second.num_cached_tokens == expected_hit == second.num_computed_tokens
        assert batch.num_new_tokens == [prompt_len - expected_hit] and batch.samples(0)  # the rest, and it samples
        sched.postprocess(batch, [7], [-1.0])
        run_to_end(sched)
    stats = sched.prefix_cache_stats
    assert stats.num_hit_tokens == 8 + 8 + 12 and stats.num_queried_tokens == 2 * (10 + 12 + 13 + 3)


def test_a_cache_salt_keeps_requests_apart():
    sched = make_scheduler()
    prompt = list(range(1, 14))
    for rid, salt, expected in (("t1", "tenant-a", 0), ("t2", "tenant-b", 0), ("t3", None, 0), ("t4", "tenant-a", 12)):
        req = make_request(rid, prompt, cache_salt=salt)
        sched.add(req)
        run_to_end(sched)
        assert req.num_cached_tokens == expected, rid


def test_chunks_that_have_not_sampled_are_not_cached_and_are_cleared_when_preempted():
    """A prefill chunk that does not sample vouches for nothing: preempted then, its blocks are zeroed and none
    is cached. A request preempted after sampling keeps its vouched blocks cached, uncleared, for its return."""
    cleared: list[int] = []
    sched = make_scheduler(max_num_batched_tokens=8, cleared=cleared)
    req = make_request("long", list(range(1, 21)), max_tokens=8)
    sched.add(req)
    sched.postprocess(sched.schedule(), [], [])  # its first chunk of 8: computed, not sampled
    assert req.num_computed_tokens == 8 and sched.block_manager.num_cached_blocks == 0
    own = list(sched.block_manager.block_table("long"))
    sched._preempt(req)
    assert cleared == own and sched.block_manager.num_cached_blocks == 0
    run_to_end(sched)  # back from the waiting queue: prefilled in chunks, samples, decodes, finishes
    assert req.is_finished and sched.block_manager.num_cached_blocks == 27 // 4  # computed: all but its last token
    cleared.clear()
    again = make_request("again", req.all_token_ids[:24] + [99], max_tokens=8)  # its answer is in the prefix too
    sched.add(again)
    sched.schedule()
    assert again.num_cached_tokens == 24
    own = sched.block_manager.block_table("again")[6:]
    sched._preempt(again)  # its cached blocks were vouched (and may be shared): only its own new block is cleared
    assert cleared == own and sched.block_manager.num_cached_blocks == 6
    run_to_end(sched)
    assert again.is_finished and again.num_preemptions == 1


def test_a_failed_request_leaves_nothing_unvouched_in_the_cache_and_clears_only_its_own_blocks():
    cleared: list[int] = []
    sched = make_scheduler(cleared=cleared)
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks
    first = make_request("first", prompt, max_tokens=6)
    sched.add(first)
    batch = sched.schedule()
    sched.postprocess(batch, [7], [-1.0])  # the prefill sampled: its 4 full prompt blocks are cached
    assert sched.block_manager.num_cached_blocks == 4
    shared = make_request("shared", prompt, max_tokens=6)
    sched.add(shared)
    sched.schedule()
    assert shared.num_cached_tokens == 16
    sched.finish_request(first, FinishReason.ERROR, "boom")  # fails later: its vouched blocks stay, shared
    own = sched.block_manager.block_table("shared")
    assert cleared and not set(cleared) & set(own)
    assert sched.block_manager.find_cached(first.block_hashes[:4]) == own[:4]
    sched.abort("shared")
    run_to_end(sched)
    sched.block_manager.check_invariants(idle=True)
    assert sched.block_manager.num_cached_blocks == 4
