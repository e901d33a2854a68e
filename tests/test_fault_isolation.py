"""One request never poisons its batch: (i) parameter values at the edges of their ranges, (ii) an adapter
with NaN weights, (iii) a forward pass that raises for one request or one adapter. Each time the bystanders
(three adapters and the base model, greedy and seeded-sampled) produce exactly the tokens they produce
without it, and the engine's allocators are back to zero afterwards (LORAX_DEBUG_INVARIANTS=1, set by
conftest, checks it when idle)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams
from lorax_lite.engine.request import Request, RequestOutput
from lorax_lite.engine.runner import ForwardError
from lorax_lite.engine.sampler import SamplingError

ENGINE = dict(dtype="float32", device="cpu", max_loras=4, max_lora_rank=8, max_num_batched_tokens=256)
SPECS = {
    "a1": AdapterSpec(rank=8, alpha=16, seed=11),
    "a2": AdapterSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=12),
    "a3": AdapterSpec(rank=2, alpha=4, target_modules=("o_proj", "up_proj"), seed=13),
}
ADAPTERS: list[str | None] = ["a1", "a2", "a3", None]
PROMPTS = ["The quick brown fox", "What is the capital of France?", "Pricing: the price of", "Hello, world!"]
POISON_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Job:
    prompt: str
    params: SamplingParams
    adapter: str | None


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def seeded(seed: int, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=20, top_p=0.95, seed=seed, ignore_eos=True)


BYSTANDERS = [
    job
    for i, adapter in enumerate(ADAPTERS)
    for job in (Job(PROMPTS[i], greedy(), adapter), Job(PROMPTS[(i + 1) % 4], seeded(100 + i), adapter))
]


def run(llm: LLM, jobs: list[Job]) -> list[RequestOutput]:
    return llm.generate([j.prompt for j in jobs], [j.params for j in jobs], adapter_ids=[j.adapter for j in jobs])


def check_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    engine.check_invariants(idle=True)


def assert_bystanders_unaffected(outs: list[RequestOutput], reference: list[list[int]]) -> None:
    for job, out, expected in zip(BYSTANDERS, outs, reference, strict=True):
        assert out.finish_reason == "length" and out.exception is None, (job, out.error)
        assert out.token_ids == expected, job


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("fault-isolation-adapters")
    return {name: make_peft_adapter(model, root / name, spec) for name, spec in SPECS.items()}


def make_llm(tiny_llama_dir: Path, adapter_dirs: dict[str, Path], **settings: object) -> LLM:
    llm = LLM(str(tiny_llama_dir), **{**ENGINE, **settings})
    for name, path in adapter_dirs.items():
        llm.add_adapter(name, path)
    return llm


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, adapter_dirs: dict[str, Path]) -> LLM:
    return make_llm(tiny_llama_dir, adapter_dirs)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[list[int]]:
    """The bystanders' tokens when they run alone."""
    return [out.token_ids for out in run(llm, BYSTANDERS)]


@pytest.fixture(scope="module")
def greedy_poison_reference(llm: LLM) -> dict[str | None, list[int]]:
    """adapter -> the greedy tokens of POISON_PROMPT."""
    outs = run(llm, [Job(POISON_PROMPT, greedy(), a) for a in ADAPTERS])
    return {a: out.token_ids for a, out in zip(ADAPTERS, outs, strict=True)}


# --- (i) values at the edges of their accepted ranges ----------------------------------------------------


@pytest.mark.parametrize("poison", [
    {"temperature": 1e-300}, {"temperature": 1e-38}, {"temperature": 5e-324},
    {"top_p": 1e-300}, {"top_p": 5e-324}, {"top_p": 1e-300, "temperature": 1.7, "seed": 3},
])
def test_tiny_temperature_or_top_p_is_served_as_the_top_token_beside_bystanders(
    poison: dict, llm: LLM, reference: list[list[int]], greedy_poison_reference: dict[str | None, list[int]]
) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True, **poison)
    poisons = [Job(POISON_PROMPT, params, a) for a in ADAPTERS]
    outs = run(llm, poisons[:2] + BYSTANDERS + poisons[2:])
    poisoned, bystanders = outs[:2] + outs[-2:], outs[2:-2]
    assert_bystanders_unaffected(bystanders, reference)
    for adapter, out in zip(ADAPTERS, poisoned, strict=True):  # served: the top token every time, as greedy
        assert out.finish_reason == "length" and out.exception is None, out.error
        assert out.token_ids == greedy_poison_reference[adapter]
    check_idle(llm)


def test_repetition_penalty_outside_its_range_is_refused_and_its_bounds_are_served(
    llm: LLM, reference: list[list[int]]
) -> None:
    for penalty in (1e-300, 5e-324, 0.0099, 100.01, 1e300):
        with pytest.raises(ValueError, match=r"repetition_penalty must be a number in \[0\.01, 100\]"):
            SamplingParams(temperature=0.9, repetition_penalty=penalty)
    edges = [
        Job(POISON_PROMPT, SamplingParams(max_tokens=8, temperature=t, repetition_penalty=p, seed=5, ignore_eos=True),
            a)
        for p in (0.01, 100.0) for t in (0.0, 1e-5, 0.9) for a in ADAPTERS
    ]
    alone = [out.token_ids for out in run(llm, edges)]
    outs = run(llm, edges + BYSTANDERS)
    assert_bystanders_unaffected(outs[len(edges):], reference)
    for out, tokens in zip(outs[: len(edges)], alone, strict=True):
        assert out.finish_reason == "length" and out.exception is None, out.error
        assert out.token_ids == tokens  # served, and as reproducible as any request
    check_idle(llm)


# --- (ii) an adapter whose weights are NaN ------------------------------------------------------------------


def nan_weights(llm: LLM, path: Path):
    """The adapter at `path`, read and validated, with one weight of one module set to NaN."""
    weights = llm.engine.read_adapter(path)
    name = sorted(weights.modules)[0]
    lora_a, lora_b = weights.modules[name]
    corrupt = lora_a.clone()
    corrupt[0, 0] = float("nan")
    return dataclasses.replace(weights, modules={**weights.modules, name: (corrupt, lora_b)})


def test_an_adapter_with_nan_weights_fails_only_its_own_requests(
    tiny_llama_dir: Path, adapter_dirs: dict[str, Path], reference: list[list[int]]
) -> None:
    # Long prompts are prefilled in chunks, and a small KV cache hands the NaN requests' blocks on at once.
    llm = make_llm(tiny_llama_dir, adapter_dirs, max_num_batched_tokens=48, num_kv_blocks=24, block_size=16)
    llm.engine.add_adapter("nan", adapter_dirs["a1"], nan_weights(llm, adapter_dirs["a1"]))
    long_prompt = " ".join(PROMPTS * 4)
    # The long one holds block 0 and writes NaN K/V for three steps before it samples; the first bystanders'
    # prefills share its last step, where their block tables are padded (see ModelRunner._prepare_block_tables).
    bad = [Job(long_prompt, seeded(7), "nan"), Job(POISON_PROMPT, greedy(), "nan")]
    outs = run(llm, bad[:1] + BYSTANDERS + bad[1:])
    assert_bystanders_unaffected(outs[1:-1], reference)
    for out in (outs[0], outs[-1]):
        assert out.finish_reason == "error" and out.token_ids == []
        assert isinstance(out.exception, SamplingError) and "not finite" in (out.error or "")
    check_idle(llm)
    # the KV blocks the NaN requests wrote are reused by the next requests, which do not notice
    assert_bystanders_unaffected(run(llm, BYSTANDERS), reference)
    outs = run(llm, BYSTANDERS[:4] + bad + BYSTANDERS[4:])
    assert_bystanders_unaffected(outs[:4] + outs[6:], reference)
    assert [out.finish_reason for out in outs[4:6]] == ["error", "error"]
    check_idle(llm)


# --- (iii) a forward pass that raises whenever one request, or one adapter, is in the batch ---------------------


def inject_forward_failure(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, fails: Callable[[list[Request]], bool]
) -> list[int]:
    """Decoder layer 1 raises (after layer 0 wrote its K/V) whenever `fails(the batch's requests)`; returns a list
    that gets the size of every batch the forward pass ran for."""
    runner = llm.engine.runner
    prepare, layer = runner._prepare_inputs, runner.model.model.layers[1]
    forward = layer.forward
    current: list[list[Request]] = []
    sizes: list[int] = []

    def recording_prepare(batch, block_manager):
        current[:] = [batch.requests]
        sizes.append(len(batch.requests))
        return prepare(batch, block_manager)

    def failing_forward(*args, **kwargs):
        if fails(current[0]):
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "_prepare_inputs", recording_prepare)
    monkeypatch.setattr(layer, "forward", failing_forward)
    return sizes


def assert_failed_in_forward(out: RequestOutput, num_tokens: int) -> None:
    assert out.finished and out.finish_reason == "error" and len(out.token_ids) == num_tokens
    assert isinstance(out.exception, ForwardError) and "injected failure" in (out.error or "")
    assert isinstance(out.exception.__cause__, RuntimeError)


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("after_tokens", [0, 3])
def test_a_forward_pass_that_raises_for_one_request_fails_it_alone(
    adapter: str | None, after_tokens: int, llm: LLM, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It raises from the poison request's first step (its prefill), or once it has 3 tokens (a decode)."""
    poison = Job(POISON_PROMPT, seeded(9), adapter)

    def fails(requests: list[Request]) -> bool:
        return any(r.prompt == POISON_PROMPT and r.num_generated_tokens >= after_tokens for r in requests)

    sizes = inject_forward_failure(llm, monkeypatch, fails)
    outs = run(llm, BYSTANDERS[:3] + [poison] + BYSTANDERS[3:])
    assert_bystanders_unaffected(outs[:3] + outs[4:], reference)
    assert_failed_in_forward(outs[3], after_tokens)
    assert max(sizes) == len(BYSTANDERS) + 1  # they all started in one batch
    check_idle(llm)


def test_a_forward_pass_that_raises_for_one_adapter_fails_only_its_requests(
    llm: LLM, adapter_dirs: dict[str, Path], reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    llm.add_adapter("boom", adapter_dirs["a1"])  # a1's weights under another id: its own slot
    try:
        inject_forward_failure(llm, monkeypatch, lambda requests: any(r.adapter_id == "boom" for r in requests))
        booms = [Job(p, params, "boom") for p, params in ((PROMPTS[0], greedy()), (PROMPTS[1], seeded(4)))]
        outs = run(llm, booms[:1] + BYSTANDERS + booms[1:])
    finally:
        llm.remove_adapter("boom")
    assert_bystanders_unaffected(outs[1:-1], reference)
    for out in (outs[0], outs[-1]):
        assert_failed_in_forward(out, 0)
    check_idle(llm)


def test_a_forward_pass_that_always_raises_fails_every_request_and_the_engine_serves_on(
    llm: LLM, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        sizes = inject_forward_failure(llm, patch, lambda requests: True)
        outs = run(llm, BYSTANDERS)
    for out in outs:
        assert_failed_in_forward(out, 0)
    assert len(sizes) < 4 * len(BYSTANDERS)  # halving: at most 2n - 1 forward passes for n requests
    check_idle(llm)
    assert_bystanders_unaffected(run(llm, BYSTANDERS), reference)
