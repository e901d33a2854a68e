"""One request never poisons its batch: parameter values at the edges of their ranges, an adapter with NaN
weights, a forward pass that raises for one request. Each time the bystanders (three adapters and the base
model, greedy and seeded-sampled) produce exactly the tokens they produce without it, and the engine's
allocators are back to zero afterwards (LORAX_DEBUG_INVARIANTS=1, set by conftest, checks it when idle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams
from lorax_lite.engine.request import RequestOutput

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
