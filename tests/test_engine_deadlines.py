"""Request deadlines: past its `timeout` a request, waiting or running, finishes with finish_reason "timeout"
and what it has so far; its KV blocks and adapter slot reference are freed at once; the others are unaffected.

The offline engine's tests move time.monotonic (the deadlines' clock) by hand; the async ones use real time
with a request that cannot progress (its adapter's load is held), so none depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import wait_until_idle
from lora_helpers import AdapterSpec, make_peft_adapter
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.engine.request import OutputKind, RequestOutput
from lorax_lite.lora.loader import AdapterSource

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64)
PROMPTS = ["The quick brown fox", "What is the capital of France?", "Pricing: the price of"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


class Clock:
    """A time.monotonic that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    return clock


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), **ENGINE)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(PROMPTS, greedy(12))]


def check_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0
    llm.engine.check_invariants(idle=True)


def step(llm: LLM, outputs: dict[str, list[RequestOutput]]) -> list[RequestOutput]:
    """One engine step; its outputs are also appended to `outputs` (request id -> outputs)."""
    outs = llm.engine.step()
    for out in outs:
        outputs.setdefault(out.request_id, []).append(out)
    return outs


def step_until_done(llm: LLM) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while llm.engine.has_unfinished_requests():
        step(llm, outputs)
    return outputs


@pytest.mark.parametrize("kind", [OutputKind.CUMULATIVE, OutputKind.DELTA])
def test_a_running_request_times_out_with_what_it_generated(
    kind: OutputKind, llm: LLM, reference: list[list[int]], clock: Clock
) -> None:
    engine = llm.engine
    late = engine.make_request(PROMPTS[0], greedy(50), "late", output_kind=kind, timeout=5.0)
    engine.add(late)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, greedy(12), request_id=f"other-{i}")
    outputs: dict[str, list[RequestOutput]] = {}
    while late.num_generated_tokens < 3:
        step(llm, outputs)
    clock.now += 4.99
    step(llm, outputs)
    assert not late.is_finished and late.num_generated_tokens == 4 and engine.block_manager.has("late")
    clock.now += 0.01  # the deadline: the next step finishes it before its forward pass
    [last] = [out for out in step(llm, outputs) if out.request_id == "late"]
    assert last.finished and last.finish_reason == "timeout" and last.error is None and last.exception is None
    assert not engine.block_manager.has("late") and late.num_generated_tokens == 4
    if kind is OutputKind.DELTA:
        assert last.token_ids == [] and last.text == ""
        assert sum((o.token_ids for o in outputs["late"]), []) == late.output_token_ids
    else:
        assert last.token_ids == late.output_token_ids == reference[0][:4]
        assert last.text == llm.tokenizer.decode(late.output_token_ids)
    for request_id, outs in step_until_done(llm).items():
        outputs[request_id] += outs
    for i in range(len(PROMPTS)):
        assert outputs[f"other-{i}"][-1].finish_reason == "length"
        tokens = outputs[f"other-{i}"][-1].token_ids
        assert tokens == reference[i]
    check_idle(llm)


def test_a_waiting_request_times_out_with_no_tokens(tiny_llama_dir: Path, clock: Clock) -> None:
    """It waits because the KV cache is full; its deadline frees it, and the running ones go on."""
    llm = LLM(str(tiny_llama_dir), **ENGINE, num_kv_blocks=4, block_size=16)  # 64 tokens in all
    big = [7] * 50  # all 4 blocks from its first step on
    alone = llm.generate([big], greedy(10))[0].token_ids
    engine = llm.engine
    engine.add_request(big, greedy(10), request_id="big")
    engine.step()
    stuck = engine.make_request([5] * 4, greedy(5), "stuck", timeout=2.0)
    engine.add(stuck)
    for _ in range(5):
        engine.step()
    assert stuck.metrics.first_scheduled_time is None
    clock.now += 2.0
    [out] = [o for o in engine.step() if o.request_id == "stuck"]
    assert out.finished and out.finish_reason == "timeout" and out.token_ids == [] and out.text == ""
    assert out.metrics.first_token_time is None
    outputs = step_until_done(llm)
    assert outputs["big"][-1].token_ids == alone
    check_idle(llm)


def test_generate_times_out_every_unfinished_request_of_the_call(llm: LLM, reference: list[list[int]],
                                                                 clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    step = llm.engine.step

    def ticking_step():  # one second per step
        clock.now += 1.0
        return step()

    monkeypatch.setattr(llm.engine, "step", ticking_step)
    outs = llm.generate(PROMPTS, [greedy(2), greedy(50), greedy(3)], timeout=4.5)
    assert [o.finish_reason for o in outs] == ["length", "timeout", "length"]
    assert outs[1].token_ids == reference[1][:4]  # steps at t+1 .. t+4 each gave it a token; t+5 ended it
    assert outs[0].token_ids == reference[0][:2] and outs[2].token_ids == reference[2][:3]
    check_idle(llm)


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, "1", True])
def test_a_bad_timeout_is_refused(llm: LLM, timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
        llm.engine.make_request("Hello", greedy(2), timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        llm.generate("Hello", greedy(2), timeout=timeout)
    assert not llm.engine.has_unfinished_requests()


# --- the async engine: a request stuck waiting for its adapter still times out -----------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return make_peft_adapter(model, tmp_path_factory.mktemp("deadline-adapter") / "slow", AdapterSpec(rank=4, seed=3))


def test_a_request_stuck_on_its_adapter_load_times_out_while_others_stream(
    tiny_llama_dir: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allm = AsyncLLM(str(tiny_llama_dir), **ENGINE, max_loras=2)
    release = threading.Event()
    manager = allm.engine.adapter_manager
    real_read = manager._read_fn

    def held_read(source: AdapterSource):  # the loader thread waits here until the test ends
        release.wait(timeout=60)
        return real_read(source)

    monkeypatch.setattr(manager, "_read_fn", held_read)
    allm.engine.add_adapter_path("slow", adapter_dir)  # read on first use, by the (held) loader thread

    async def main() -> tuple[list[RequestOutput], list[RequestOutput], list[RequestOutput]]:
        async def collect(**kw) -> list[RequestOutput]:
            return [out async for out in allm.generate(PROMPTS[0], greedy(6), **kw)]

        return await asyncio.wait_for(asyncio.gather(
            collect(adapter_id="slow", timeout=0.3),
            collect(adapter_id="slow", timeout=0.6, output_kind=OutputKind.DELTA),
            collect(timeout=600.0),
        ), timeout=60)

    try:
        stuck, stuck_delta, served = asyncio.run(main())
        for outs in (stuck, stuck_delta):
            assert len(outs) == 1 and outs[0].finish_reason == "timeout" and outs[0].token_ids == []
        assert served[-1].finish_reason == "length" and len(served[-1].token_ids) == 6
        snapshot = allm.snapshot()
        assert snapshot.num_waiting == snapshot.num_running == 0
    finally:
        release.set()
        wait_until_idle(allm)
        allm.shutdown()


def test_async_generate_refuses_a_bad_timeout(tiny_llama_dir: Path) -> None:
    allm = AsyncLLM(str(tiny_llama_dir), **ENGINE)

    async def first(timeout: object) -> RequestOutput:
        async for out in allm.generate([5, 6, 7], greedy(2), timeout=timeout):
            return out
        raise AssertionError("no output")

    try:
        with pytest.raises(ValueError, match="timeout"):
            asyncio.run(first(0.0))
        assert asyncio.run(first(30.0)).token_ids  # and a good one is served
    finally:
        allm.shutdown()
