"""AsyncLLM: the engine in a background thread, streams per request, aborts, concurrency."""

from __future__ import annotations

import asyncio
import threading

import pytest
from engine_helpers import wait_until_idle

from lorax_lite import AsyncLLM, SamplingParams


@pytest.fixture(scope="module")
def allm(tiny_llama_dir):
    llm = AsyncLLM(str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=64)
    yield llm
    llm.shutdown()


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


async def collect(allm, prompt, params, **kw):
    return [out async for out in allm.generate(prompt, params, **kw)]


def test_stream_is_cumulative_and_ends_finished(allm):
    outs = asyncio.run(collect(allm, "The quick brown fox", greedy(12)))
    assert len(outs) == 12 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    for prev, cur in zip(outs, outs[1:]):
        assert cur.token_ids[: len(prev.token_ids)] == prev.token_ids and cur.text.startswith(prev.text)
    assert outs[-1].finish_reason == "length" and outs[-1].metrics.first_token_time is not None


def test_concurrent_requests_match_offline_results(allm, tiny_llama_dir):
    from lorax_lite import LLM

    prompts = ["The quick brown fox", "Hello, world!", "What is the capital of France?", "Pricing"]
    max_tokens = [30, 5, 12, 8]

    async def main():
        return await asyncio.gather(*(collect(allm, p, greedy(m)) for p, m in zip(prompts, max_tokens)))

    streams = asyncio.run(main())
    offline = LLM(str(tiny_llama_dir), dtype="float32", device="cpu").generate(prompts, [greedy(m) for m in max_tokens])
    assert [s[-1].token_ids for s in streams] == [o.token_ids for o in offline]


def test_short_requests_finish_first_and_late_request_is_served_early(allm):
    """The seed experiment over the async API: 100/10/10 together, then one joining mid-flight."""
    finish_order = []

    async def one(name, prompt, max_tokens, after: asyncio.Event | None = None, running: asyncio.Event | None = None):
        if after is not None:
            await after.wait()
        async for out in allm.generate(prompt, greedy(max_tokens), request_id=name):
            if running is not None and len(out.token_ids) >= 5:
                running.set()
            if out.finished:
                finish_order.append(name)

    async def main():
        long_is_running = asyncio.Event()  # the late request arrives once the long one has 5 of its 100 tokens
        await asyncio.gather(
            one("long", "If you could have dinner with anyone", 100, running=long_is_running),
            one("short-1", "What one technology will matter most", 10),
            one("short-2", "Which country would you live in", 10),
            one("late", "Hello", 3, after=long_is_running),
        )

    asyncio.run(main())
    assert finish_order[-1] == "long"
    assert set(finish_order[:2]) <= {"short-1", "short-2", "late"}
    assert finish_order.index("late") < finish_order.index("long")


def test_leaving_the_stream_early_aborts_and_frees_blocks(allm):
    async def main():
        async for out in allm.generate("The quick brown fox", greedy(200), request_id="leaver"):
            if len(out.token_ids) >= 3:
                break

    asyncio.run(main())
    wait_until_idle(allm)
    allm.engine.block_manager.check_invariants()


def test_abort_ends_the_stream_with_reason_abort(allm):
    async def main():
        outs = []
        async for out in allm.generate("The quick brown fox", greedy(500), request_id="to-abort"):
            outs.append(out)
            if len(outs) == 2:
                await allm.abort("to-abort")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 500
    wait_until_idle(allm)


def test_bad_request_raises_and_others_keep_streaming(allm):
    async def bad():
        with pytest.raises(ValueError, match="empty"):
            await collect(allm, "", greedy(3))
        with pytest.raises(ValueError, match="max_tokens"):
            await collect(allm, "x", SamplingParams(max_tokens=0))

    async def main():
        good = asyncio.create_task(collect(allm, "Hello", greedy(20)))
        await bad()
        return await good

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].token_ids) == 20


def test_duplicate_request_id_is_refused(allm):
    async def main():
        first = allm.generate("Hello", greedy(50), request_id="dup")
        out = await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(allm, "Hello", greedy(2), request_id="dup")
        await first.aclose()
        return out

    assert not asyncio.run(main()).finished
    wait_until_idle(allm)


def test_shutdown_stops_the_loop(tiny_llama_dir):
    from lorax_lite.engine.async_llm import EngineDeadError

    llm = AsyncLLM(str(tiny_llama_dir), device="cpu")
    assert llm.is_running
    llm.shutdown()
    assert not llm.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(llm, "Hello", greedy(2)))


def test_an_unknown_message_to_the_engine_thread_is_refused_by_the_sender(allm):
    """Messages are typed: a kind the engine does not know is a bug, never a silent abort."""
    with pytest.raises(TypeError, match="unknown engine message"):
        allm._send(("abort", "some-request"))
    with pytest.raises(TypeError, match="unknown engine message"):  # the engine thread would refuse it too
        allm._apply(("abort", "some-request"), [])
    assert allm.is_running and asyncio.run(collect(allm, "Hello", greedy(2)))[-1].finished


def test_generate_resolves_and_tokenizes_off_the_event_loop(allm, monkeypatch):
    """A text prompt (tokenizer) and an adapter id (registry) are handled in a worker thread."""
    threads = []
    make_request = allm.engine.make_request

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return make_request(*args, **kwargs)

    monkeypatch.setattr(allm.engine, "make_request", recording)

    async def main():
        outs = await collect(allm, "Hello there", greedy(2))
        return threading.current_thread(), outs

    loop_thread, outs = asyncio.run(main())
    assert outs[-1].finished and threads and all(t is not loop_thread for t in threads)


def test_the_snapshot_is_a_copy_published_by_the_engine_thread(allm):
    before = allm.snapshot()
    steps_before, buckets_before = before.stats.steps, list(before.stats.batch_size_buckets)
    asyncio.run(collect(allm, "Hello there", greedy(3)))
    wait_until_idle(allm)
    after = allm.snapshot()
    assert after.stats.steps >= steps_before + 3 and sum(after.stats.batch_size_buckets) >= sum(buckets_before) + 3
    assert (before.stats.steps, before.stats.batch_size_buckets) == (steps_before, buckets_before)  # not a live view
    assert after.num_kv_blocks == allm.engine.block_manager.num_blocks and after.num_kv_blocks_used == 0


def slow_make_request(llm, monkeypatch) -> threading.Event:
    """Hold AsyncLLM's worker-thread hop (building a request from text) until the returned event is set."""
    gate, make = threading.Event(), llm.engine.make_request

    def held(*args, **kwargs):
        gate.wait(timeout=30)
        return make(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "make_request", held)
    return gate


def test_a_request_id_is_taken_while_its_request_is_still_being_built(allm, monkeypatch):
    gate = slow_make_request(allm, monkeypatch)

    async def main():
        first = asyncio.ensure_future(collect(allm, "Hello there", greedy(3), request_id="dup"))
        await asyncio.sleep(0)  # `first` claimed its id and waits in its worker-thread hop
        with pytest.raises(ValueError, match="'dup' is already in use"):
            await collect(allm, "Hello there", greedy(3), request_id="dup")
        gate.set()
        return await first

    assert asyncio.run(main())[-1].finish_reason == "length"
    wait_until_idle(allm)


def test_an_abort_that_comes_while_the_request_is_being_built_ends_it(allm, monkeypatch):
    gate = slow_make_request(allm, monkeypatch)

    async def main():
        task = asyncio.ensure_future(collect(allm, "Hello there", greedy(50), request_id="early"))
        await asyncio.sleep(0)
        await allm.abort("early")  # the engine has not seen the request yet
        gate.set()
        return await task

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 50
    wait_until_idle(allm)


def test_a_request_built_while_the_engine_stops_fails_instead_of_waiting_forever(tiny_llama_dir, monkeypatch):
    from lorax_lite.engine.async_llm import EngineDeadError

    llm = AsyncLLM(str(tiny_llama_dir), device="cpu")
    gate = slow_make_request(llm, monkeypatch)

    async def main():
        task = asyncio.ensure_future(collect(llm, "Hello there", greedy(3)))
        await asyncio.sleep(0)
        llm.shutdown()  # while the request is in its worker-thread hop
        gate.set()
        return await asyncio.wait_for(task, timeout=30)

    with pytest.raises(EngineDeadError):
        asyncio.run(main())
