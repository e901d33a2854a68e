"""Greedy output is token-identical to transformers `generate` (fp32), whatever the batching."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams


def varied_prompts(vocab_size: int, n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 17, 24, 31, 40, 47, 64, 70, 90, 111, 128][:n]
    # ids 3.. avoid the special tokens of the tiny tokenizer
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for length in lengths]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference: one prompt at a time (no padding), HF's own KV cache."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def check_identical(model_dir, prompts, max_tokens, ignore_eos=False, **engine_config):
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **engine_config)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=ignore_eos) for m in max_tokens]
    outs = llm.generate(prompts, params)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, out, m in zip(prompts, outs, max_tokens):
        ref = hf_greedy(ref_model, prompt, m) if not ignore_eos else None
        if ref is not None:
            assert out.token_ids == ref, f"prompt of {len(prompt)} tokens"
        assert out.finished and out.prompt_token_ids == prompt
    llm.engine.block_manager.check_invariants()
    assert llm.engine.block_manager.num_used_blocks == 0
    return llm


@pytest.fixture(params=["tiny_llama_dir", "tiny_qwen2_dir"])
def tiny_model_dir(request):
    return request.getfixturevalue(request.param)


def test_matches_hf_generate_many_prompts_together(tiny_model_dir):
    prompts = varied_prompts(320)
    max_tokens = [1, 3, 5, 8, 12, 16, 20, 24, 6, 10, 14, 18, 22, 26, 30, 32]
    check_identical(tiny_model_dir, prompts, max_tokens)


def test_matches_hf_with_chunked_prefill(tiny_model_dir):
    prompts = varied_prompts(320, seed=1)
    max_tokens = [16] * len(prompts)
    llm = check_identical(tiny_model_dir, prompts, max_tokens, max_num_batched_tokens=24, max_num_seqs=5)
    assert llm.engine.scheduler.num_preemptions == 0


def test_matches_hf_when_kv_cache_forces_preemption(tiny_model_dir):
    prompts = varied_prompts(320, seed=2)
    max_tokens = [24] * len(prompts)
    # 40 blocks of 4 = 160 slots: the longest sequence fits alone, the batch does not
    llm = check_identical(tiny_model_dir, prompts, max_tokens, block_size=4, num_kv_blocks=40)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.slow
def test_default_model_matches_hf_generate(default_model_dir):
    rng = random.Random(0)
    texts = [
        "The capital of France is",
        "Write a short poem about the sea.",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        "Once upon a time in a land far away, there lived a",
        "Explain what a supply chain is in one sentence.",
        "Our discount policy for wholesale customers says that orders above ten thousand euros",
        "Translate to French: good morning",
        "List three colors:",
        "The warehouse in Rotterdam ships to",
        "Q: What is 12 times 12?\nA:",
        "A haiku about autumn leaves:",
        "Dear customer, thank you for your order. Unfortunately, the shipment",
        "import numpy as np\n\ndef normalize(x):",
        "The three most important rules of pricing are",
        "Hello",
    ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = [tok(t).input_ids for t in texts]
    max_tokens = [rng.choice([4, 8, 16, 24]) for _ in texts]
    check_identical(default_model_dir, prompts, max_tokens)


@pytest.mark.slow
def test_default_model_matches_hf_with_preemption(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    texts = [f"Item {i}: the shipment from warehouse {i} to the store" for i in range(8)]
    prompts = [tok(t).input_ids for t in texts]
    llm = check_identical(default_model_dir, prompts, [16] * 8, block_size=8, num_kv_blocks=12)
    assert llm.engine.scheduler.num_preemptions > 0
