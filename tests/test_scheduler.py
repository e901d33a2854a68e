"""Scheduler policy without a model: budgets, decode-first ordering, chunked prefill, preemption."""

from lorax_lite.engine.kv_cache import BlockManager
from lorax_lite.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from lorax_lite.engine.scheduler import Scheduler


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_seq_len=128):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_seq_len, eos_token_ids={0})


def make_request(rid, prompt_len, max_tokens=8, first_token=1, **params):
    prompt = list(range(first_token, first_token + prompt_len))
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **params))


def run_step(sched, token=7):
    """Schedule, pretend the model sampled `token` for every sampling request, apply."""
    batch = sched.schedule()
    n = len(batch.sampling_requests)
    sched.postprocess(batch, [token] * n, [-1.0] * n)
    sched.block_manager.check_invariants()
    return batch


def test_token_and_sequence_budgets():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(5):
        sched.add(make_request(f"r{i}", 6))
    batch = run_step(sched)
    assert batch.num_tokens <= 20 and len(sched.running) <= 3
    assert [r.request_id for r in batch.requests] == ["r0", "r1", "r2"]
    assert batch.num_new_tokens == [6, 6, 6]


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add(make_request("short", 4, max_tokens=50))
    run_step(sched)  # short prefilled, has one token
    sched.add(make_request("long", 40, first_token=100))  # no prefix in common with "short": nothing cached
    chunks = []
    while True:
        batch = run_step(sched)
        assert batch.requests[0].request_id == "short" and batch.num_new_tokens[0] == 1  # the decode is never stalled
        assert batch.num_tokens <= 16
        chunks.append(batch.num_new_tokens[1])
        long = batch.requests[1]
        if long.num_generated_tokens:  # sampled only after its last chunk
            break
    assert chunks == [15, 15, 10]


def test_preempts_newest_and_recomputes_it():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=64, max_seq_len=32)
    sched.add(make_request("old", 8, max_tokens=20))  # 28 tokens = 7 blocks each: both cannot fit at the end
    sched.add(make_request("new", 8, max_tokens=20))
    while not sched.num_preemptions:
        run_step(sched)
    new = next(r for r in list(sched.waiting) + sched.running if r.request_id == "new")
    old = next(r for r in sched.running if r.request_id == "old")
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert old.status is RequestStatus.RUNNING
    # it comes back and finishes with its full output
    while sched.has_unfinished():
        run_step(sched)
    assert new.is_finished and new.num_generated_tokens == 20 and old.num_generated_tokens == 20


def test_stop_conditions():
    sched = make_scheduler()
    eos, stop_tok, length = make_request("eos", 4), make_request("stop", 4, stop_token_ids=[7]), make_request("len", 4, max_tokens=1)
    ignore = make_request("ignore", 4, max_tokens=3, ignore_eos=True)
    for r in (eos, stop_tok, length, ignore):
        sched.add(r)
    batch = sched.schedule()
    tokens = {"eos": 0, "stop": 7, "len": 5, "ignore": 0}
    sched.postprocess(batch, [tokens[r.request_id] for r in batch.requests], [-1.0] * len(batch.requests))
    assert eos.finish_reason is FinishReason.EOS
    assert stop_tok.finish_reason is FinishReason.STOP and stop_tok.output_token_ids == [7]
    assert length.finish_reason is FinishReason.LENGTH
    assert not ignore.is_finished
    assert sched.running == [ignore] and sched.block_manager.num_used_blocks == 1


def test_max_seq_len_ends_generation():
    sched = make_scheduler(max_seq_len=10)
    req = make_request("r", 8, max_tokens=100)
    sched.add(req)
    while sched.has_unfinished():
        run_step(sched)
    assert req.num_tokens == 10 and req.finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_anywhere():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_request("a", 4))
    sched.add(make_request("b", 4))
    run_step(sched)
    assert sched.abort("a").finish_reason is FinishReason.ABORT
    assert sched.abort("b").finish_reason is FinishReason.ABORT
    assert sched.abort("missing") is None
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0


def test_a_max_seq_len_past_the_cache_is_refused_as_a_broken_invariant():
    """plan_kv_cache refuses such a setting with a message for the user; the scheduler guards its own invariant."""
    import pytest

    from lorax_lite.invariants import InvariantError

    with pytest.raises(InvariantError, match="exceeds the KV cache's 16 tokens"):
        make_scheduler(num_blocks=4, block_size=4, max_seq_len=17)
