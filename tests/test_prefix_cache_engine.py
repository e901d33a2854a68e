"""Prefix caching in the engine (tiny random model, fp32): greedy outputs are token-identical with caching on and
off, under the base model and two adapters, across adapter versions, after evictions, with preemption and with
chunked prefill; a repeated prompt does hit, and computes fewer tokens; a request that fails before a finite
sample leaves nothing in the cache; /info and /metrics report it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter, make_versions
from server_helpers import call
from test_fault_isolation import inject_forward_failure
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.engine.request import RequestOutput
from lorax_lite.registry import admin
from lorax_lite.registry.factory import open_registry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.server import create_app

ENGINE = dict(dtype="float32", device="cpu", max_loras=2, max_lora_rank=8, block_size=4)
ADAPTERS: list[str | None] = [None, "a1", "a2"]
rng = random.Random(0)
SYSTEM = [rng.randrange(3, 320) for _ in range(37)]  # a shared system prompt: 9 full blocks of 4
QUESTIONS = [[rng.randrange(3, 320) for _ in range(n)] for n in (3, 8, 13, 21)]
PROMPTS = [SYSTEM + q for q in QUESTIONS]


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("prefix-cache-adapters")
    specs = {"a1": AdapterSpec(rank=8, alpha=16, seed=21),
             "a2": AdapterSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=22)}
    return {name: make_peft_adapter(model, root / name, spec) for name, spec in specs.items()}


def make_llm(model_dir: Path, adapter_dirs: dict[str, Path], caching: bool, **settings: object) -> LLM:
    llm = LLM(str(model_dir), **{**ENGINE, **settings}, enable_prefix_caching=caching)
    for name, path in adapter_dirs.items():
        llm.add_adapter(name, path)
    return llm


def run(llm: LLM, jobs: list[tuple[list[int], str | None]], max_tokens: int = 8) -> list[RequestOutput]:
    outs = llm.generate([p for p, _ in jobs], greedy(max_tokens), adapter_ids=[a for _, a in jobs])
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    llm.engine.check_invariants(idle=True)
    return outs


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


def rounds(llm: LLM, max_tokens: int = 8) -> tuple[list[list[int]], list[RequestOutput]]:
    """Every prompt under every adapter, three times: fresh, repeated, and as a second turn (prompt + answer +
    a follow-up); the tokens of all rounds, and the outputs of the repeated round."""
    jobs = [(p, a) for a in ADAPTERS for p in PROMPTS]
    first = run(llm, jobs, max_tokens)
    repeated = run(llm, jobs, max_tokens)
    follow_up = [(p + out.token_ids + [5, 6, 7], a) for (p, a), out in zip(jobs, first, strict=True)]
    return tokens(first) + tokens(repeated) + tokens(run(llm, follow_up, max_tokens)), repeated


@pytest.mark.parametrize("settings", [
    {},
    {"max_num_batched_tokens": 8, "max_num_seqs": 4},  # chunked prefill: prompts start in the middle of a chunk
    {"num_kv_blocks": 40},  # 160 tokens for 12 sequences: preemption, and LRU eviction of cached blocks
], ids=["plain", "chunked-prefill", "preemption"])
def test_greedy_outputs_are_identical_with_caching_on_and_off(
    settings: dict, tiny_llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    off, _ = rounds(make_llm(tiny_llama_dir, adapter_dirs, caching=False, **settings))
    llm = make_llm(tiny_llama_dir, adapter_dirs, caching=True, **settings)
    on, repeated = rounds(llm)
    assert on == off
    hits = [out.num_cached_tokens > 0 for out in repeated]
    assert any(hits) if "num_kv_blocks" in settings else all(hits)  # a small cache evicts some
    stats = llm.engine.snapshot().prefix_cache.stats
    assert 0 < stats.num_hit_tokens < stats.num_queried_tokens
    if "num_kv_blocks" in settings:
        assert llm.engine.scheduler.num_preemptions > 0


def test_a_repeated_prompt_hits_its_full_blocks_but_its_last_token_and_computes_only_the_rest(
    tiny_llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    llm = make_llm(tiny_llama_dir, adapter_dirs, caching=True)
    stats = llm.engine.stats
    for prompt, expected_hits in ((SYSTEM[:30], 28), (SYSTEM[::-1][:32], 28)):  # 32 tokens: its last block is redone
        before = stats.batched_tokens
        [first] = run(llm, [(prompt, "a1")])
        computed_first, before = stats.batched_tokens - before, stats.batched_tokens
        [second] = run(llm, [(prompt, "a1")])
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == expected_hits
        assert stats.batched_tokens - before == computed_first - expected_hits  # its prefill computed fewer tokens
        assert second.token_ids == first.token_ids


def test_the_same_tokens_under_another_adapter_or_the_base_model_or_a_cache_salt_share_nothing(
    tiny_llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    llm = make_llm(tiny_llama_dir, adapter_dirs, caching=True)
    prompt = PROMPTS[3]
    for adapter in ADAPTERS:
        [out] = run(llm, [(prompt, adapter)])
        assert out.num_cached_tokens == 0, adapter
    engine = llm.engine
    for salt, expected in (("tenant-a", 0), ("tenant-b", 0), ("tenant-a", 56)):
        request = engine.add_request(prompt, greedy(), adapter_id="a1", cache_salt=salt)
        while engine.has_unfinished_requests():
            engine.step()
        assert request.num_cached_tokens == expected, salt
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        engine.add_request(prompt, greedy(), cache_salt="")


def test_a_new_adapter_version_never_reuses_the_old_versions_blocks(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sources = make_versions(tiny_llama_dir, tmp_path / "sources", 2)
    registry, store = open_registry(f"sqlite:///{tmp_path / 'registry.db'}"), AdapterStore(tmp_path / "store")
    settings = {**ENGINE, "registry": registry}
    llm, off = LLM(str(tiny_llama_dir), **settings), LLM(str(tiny_llama_dir), **settings, enable_prefix_caching=False)
    prompt = PROMPTS[2]
    admin.register(registry, store, "unit", sources["v1"], tiny_llama_dir)
    v1 = [run(llm, [(prompt, "unit")])[0] for _ in range(2)]
    assert v1[0].num_cached_tokens == 0 and v1[1].num_cached_tokens == 48  # the same version hits
    admin.register(registry, store, "unit", sources["v2"], tiny_llama_dir)  # a new version, between two requests
    [v2] = run(llm, [(prompt, "unit")])
    assert v2.num_cached_tokens == 0
    assert v2.token_ids == run(off, [(prompt, "unit")])[0].token_ids != v1[0].token_ids
    # the same for an adapter added by path, removed and added again (a new adapter key, `id#2`)
    llm.add_adapter("local", sources["v1"])
    run(llm, [(prompt, "local")])
    llm.remove_adapter("local")
    llm.add_adapter("local", sources["v2"])
    [again] = run(llm, [(prompt, "local")])
    assert again.num_cached_tokens == 0 and again.token_ids == v2.token_ids
    registry.close()


def test_least_recently_used_blocks_are_evicted_and_outputs_stay_identical(
    tiny_llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    distinct = [[rng.randrange(3, 320) for _ in range(30)] for _ in range(4)]
    jobs = [(p, a) for p in PROMPTS[:2] + distinct for a in ("a1", None)]
    sequence = jobs + jobs + jobs[-1:]  # one at a time; the last one twice in a row
    settings = {"num_kv_blocks": 24}  # 96 tokens: the cache holds the blocks of the last two or three requests
    off_llm = make_llm(tiny_llama_dir, adapter_dirs, caching=False, **settings)
    off = [run(off_llm, [job])[0] for job in sequence]
    llm = make_llm(tiny_llama_dir, adapter_dirs, caching=True, **settings)
    on = [run(llm, [job])[0] for job in sequence]
    assert tokens(on) == tokens(off)
    assert on[len(jobs)].num_cached_tokens == 0  # the first prompt's blocks were evicted since its first run
    assert on[-1].num_cached_tokens == 28  # it ran just before: still cached
    assert llm.engine.block_manager.num_cached_blocks <= 24


@pytest.mark.parametrize("after_tokens", [0, 3])
def test_a_request_that_fails_caches_only_what_a_finite_sample_vouched_for(
    after_tokens: int, tiny_llama_dir: Path, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its forward pass raises at its prefill (nothing vouched: nothing cached, its blocks are zeroed) or once
    it has 3 tokens (its prompt's blocks were vouched by the first sample: a retry hits them)."""
    llm = make_llm(tiny_llama_dir, adapter_dirs, caching=True)
    prompt = PROMPTS[3]
    [reference] = run(make_llm(tiny_llama_dir, adapter_dirs, caching=False), [(prompt, "a1")])
    with monkeypatch.context() as patch:
        inject_forward_failure(llm, patch, lambda requests: any(
            r.prompt_token_ids == prompt and r.num_generated_tokens >= after_tokens for r in requests))
        [failed] = llm.generate([prompt], greedy(), adapter_ids="a1")
    assert failed.finish_reason == "error" and len(failed.token_ids) == after_tokens
    llm.engine.check_invariants(idle=True)
    [retry] = run(llm, [(prompt, "a1")])
    assert retry.num_cached_tokens == (0 if after_tokens == 0 else 56)
    assert retry.token_ids == reference.token_ids


def test_info_and_metrics_report_the_prefix_cache(tiny_llama_dir: Path) -> None:
    llm = AsyncLLM(str(tiny_llama_dir), **{**ENGINE, "max_loras": 0})
    try:
        app = create_app(llm, "tiny")

        async def generate(cache_salt: str | None) -> RequestOutput:
            async for out in llm.generate(PROMPTS[3], greedy(), cache_salt=cache_salt):
                last = out
            return last

        outs = [asyncio.run(generate(salt)) for salt in ("t1", "t1", "t2")]
        assert [out.num_cached_tokens for out in outs] == [0, 56, 0]
        info = call(app, "GET", "/info").json()
        assert info["engine_config"]["enable_prefix_caching"] is True
        cache = info["prefix_cache"]
        assert cache["enabled"] is True and cache["cached_blocks"] > 0
        assert cache["hit_tokens"] == 56 and cache["queried_tokens"] == 3 * 58
        assert cache["hit_rate"] == pytest.approx(56 / (3 * 58))
        metrics = call(app, "GET", "/metrics").text
        assert "lorax_prefix_cache_hits_total 56.0" in metrics
        assert f"lorax_prefix_cache_queries_total {3 * 58}.0" in metrics
        assert f"lorax_prefix_cache_blocks {cache['cached_blocks']}.0" in metrics
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_default_model_multi_turn_chat_is_identical_with_caching_on_and_off(default_model_dir: Path) -> None:
    conversation = [{"role": "system", "content": "You are the pricing assistant of a wholesale business."},
                    {"role": "user", "content": "What discount do orders above ten thousand euros get?"}]
    answers = {}
    for caching in (True, False):
        llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_loras=0, enable_prefix_caching=caching)
        turns = [dict(m) for m in conversation]
        outs = []
        for follow_up in ("And above fifty thousand?", "Thank you."):
            [out] = llm.chat(turns, greedy(12))
            outs.append(out)
            turns += [{"role": "assistant", "content": out.text}, {"role": "user", "content": follow_up}]
        answers[caching] = [out.token_ids for out in outs]
        if caching:
            assert outs[1].num_cached_tokens > 0
    assert answers[True] == answers[False]
