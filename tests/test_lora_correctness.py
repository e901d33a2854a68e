"""Greedy output of mixed multi-adapter batches is token-identical to PEFT, one adapter at a time (fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from lora_helpers import ALL_PROJECTIONS, AdapterSpec, make_peft_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# ten adapters: ranks 1-16 (several not powers of two), varied alphas and targets, one rsLoRA
ADAPTER_SPECS = {
    "r1-qv": AdapterSpec(rank=1, alpha=2, target_modules=("q_proj", "v_proj"), seed=1),
    "r2-attn": AdapterSpec(rank=2, alpha=3, target_modules=ATTENTION, seed=2),
    "r3-mlp": AdapterSpec(rank=3, alpha=7, target_modules=MLP, seed=3),
    "r5-all": AdapterSpec(rank=5, alpha=5, target_modules=ALL_PROJECTIONS, seed=4),
    "r6-od": AdapterSpec(rank=6, alpha=12, target_modules=("o_proj", "down_proj"), seed=5),
    "r7-kv": AdapterSpec(rank=7, alpha=4, target_modules=("k_proj", "v_proj", "up_proj"), seed=6),
    "r8-all": AdapterSpec(rank=8, alpha=16, target_modules=ALL_PROJECTIONS, seed=7),
    "r11-rs": AdapterSpec(rank=11, alpha=9, target_modules=ALL_PROJECTIONS, use_rslora=True, seed=8),
    "r12-q": AdapterSpec(rank=12, alpha=24, target_modules=("q_proj", "gate_proj"), seed=9),
    "r16-all": AdapterSpec(rank=16, alpha=32, target_modules=ALL_PROJECTIONS, seed=10),
}


def make_adapters(model_dir: Path, out: Path, std: float) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: make_peft_adapter(model, out / name, spec, std=std) for name, spec in ADAPTER_SPECS.items()}


def make_workload(vocab_size: int, per_adapter: int, num_base: int, seed: int = 0):
    """Prompts (token ids), adapter ids (None = base) and max_tokens, interleaved."""
    rng = random.Random(seed)
    adapter_ids = [name for name in ADAPTER_SPECS for _ in range(per_adapter)] + [None] * num_base
    rng.shuffle(adapter_ids)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 40))] for _ in adapter_ids]
    max_tokens = [rng.randint(4, 14) for _ in adapter_ids]
    return prompts, adapter_ids, max_tokens


def peft_references(model_dir: Path, adapters: dict[str, Path], prompts, adapter_ids, max_tokens) -> list[list[int]]:
    """Each request alone through PeftModel with only its adapter (or the plain model), HF generate, greedy."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    refs: list[list[int] | None] = [None] * len(prompts)
    for adapter_id in [None, *adapters]:
        model = base if adapter_id is None else PeftModel.from_pretrained(base, adapters[adapter_id])
        for i, (prompt, a, m) in enumerate(zip(prompts, adapter_ids, max_tokens)):
            if a == adapter_id:
                ids = torch.tensor([prompt])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, do_sample=False)
                refs[i] = out[0, len(prompt) :].tolist()
        if adapter_id is not None:
            model.unload()  # back to the plain base model for the next adapter
    return refs


def record_distinct_adapters(llm: LLM) -> list[int]:
    """Wrap the runner: the returned list gets, per forward pass, the number of distinct adapters in it."""
    counts: list[int] = []
    run = llm.engine.runner.run

    def recording_run(batch, block_manager):
        counts.append(len({r.adapter_id for r in batch.requests if r.adapter_id is not None}))
        return run(batch, block_manager)

    llm.engine.runner.run = recording_run
    return counts


def run_engine(llm: LLM, prompts, adapter_ids, max_tokens) -> tuple[list, int]:
    """Outputs, and the largest number of distinct adapters that shared one forward pass."""
    counts = record_distinct_adapters(llm)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
    outs = llm.generate(prompts, params, adapter_ids=adapter_ids)
    return outs, max(counts)


def check_against_peft(outs, refs, adapter_ids) -> None:
    for i, (out, ref, a) in enumerate(zip(outs, refs, adapter_ids)):
        assert out.finish_reason in ("length", "eos"), out.error
        assert out.token_ids == ref, f"request {i} (adapter {a})"
        assert out.adapter_id == a


def check_drained(llm: LLM) -> None:
    engine = llm.engine
    engine.block_manager.check_invariants()
    engine.adapter_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0
    assert all(engine.adapter_manager.refcount(a) == 0 for a in ADAPTER_SPECS)


@pytest.fixture(params=["tiny_llama_dir", "tiny_qwen2_dir"], scope="module")
def tiny_case(request, tmp_path_factory):
    model_dir = request.getfixturevalue(request.param)
    adapters = make_adapters(model_dir, tmp_path_factory.mktemp("adapters"), std=0.5)
    prompts, adapter_ids, max_tokens = make_workload(320, per_adapter=2, num_base=4)
    refs = peft_references(model_dir, adapters, prompts, adapter_ids, max_tokens)
    return model_dir, adapters, (prompts, adapter_ids, max_tokens), refs


def test_adapters_change_the_output(tiny_case):
    """Guard: the references differ from the base model, so matching them means the deltas are applied."""
    model_dir, adapters, (prompts, adapter_ids, max_tokens), refs = tiny_case
    base_refs = peft_references(model_dir, {}, prompts, [None] * len(prompts), max_tokens)
    changed = [ref != base for ref, base, a in zip(refs, base_refs, adapter_ids) if a is not None]
    assert sum(changed) >= 0.8 * len(changed)


def test_one_mixed_batch_of_ten_adapters_and_base_matches_peft(tiny_case):
    model_dir, adapters, workload, refs = tiny_case
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=10)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    outs, most = run_engine(llm, *workload)
    check_against_peft(outs, refs, workload[1])
    assert most == 10  # every adapter was in one forward pass
    assert llm.engine.adapter_manager.stats.evictions == 0
    check_drained(llm)


def test_two_slots_for_ten_adapters_thrash_and_stay_correct(tiny_case):
    """Lazily added adapters (disk loads on the loader thread), 2 slots, 4 in host memory; half the requests
    arrive at once and the rest one per step; the allocators' invariants hold after every step."""
    model_dir, adapters, (prompts, adapter_ids, max_tokens), refs = tiny_case
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=2, max_cpu_loras=4, max_num_seqs=8)
    engine = llm.engine
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    counts = record_distinct_adapters(llm)
    jobs = list(zip(prompts, adapter_ids, max_tokens, strict=True))
    requests = []

    def feed() -> None:
        prompt, adapter_id, n = jobs[len(requests)]
        requests.append(engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0), adapter_id=adapter_id))

    while len(requests) < len(jobs) // 2:
        feed()
    for _ in range(3000):
        engine.step()
        engine.check_invariants()
        if len(requests) < len(jobs):
            feed()
        elif not engine.has_unfinished_requests():
            break
    assert all(r.is_finished and r.error is None and r.finish_reason.value in ("length", "eos") for r in requests)
    assert [r.output_token_ids for r in requests] == refs
    stats = engine.adapter_manager.stats
    assert max(counts) <= 2 and stats.evictions > 0 and stats.host_evictions > 0 and stats.load_failures == 0
    check_drained(llm)


def test_chunked_prefill_and_preemption_with_adapters(tiny_case):
    model_dir, adapters, workload, refs = tiny_case
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=4, max_num_batched_tokens=16, num_kv_blocks=8, block_size=8)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    outs, _ = run_engine(llm, *workload)
    check_against_peft(outs, refs, workload[1])
    assert llm.engine.scheduler.num_preemptions > 0
    check_drained(llm)


@pytest.mark.slow
def test_default_model_mixed_batch_and_thrash_match_peft(default_model_dir, tmp_path_factory):
    adapters = make_adapters(default_model_dir, tmp_path_factory.mktemp("default-adapters"), std=0.3)
    vocab = AutoModelForCausalLM.from_pretrained(default_model_dir).config.vocab_size
    workload = make_workload(vocab, per_adapter=1, num_base=2, seed=1)
    refs = peft_references(default_model_dir, adapters, *workload)
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_loras=10)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    outs, most = run_engine(llm, *workload)
    check_against_peft(outs, refs, workload[1])
    assert most == 10
    del llm
    thrash = LLM(str(default_model_dir), dtype="float32", device="cpu", max_loras=2, max_cpu_loras=3)
    for name, path in adapters.items():
        thrash.engine.add_adapter(name, path)
    outs, most = run_engine(thrash, *workload)
    check_against_peft(outs, refs, workload[1])
    assert most <= 2 and thrash.engine.adapter_manager.stats.evictions > 0
    check_drained(thrash)
