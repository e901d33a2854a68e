"""RequestOutput carries the log-probability of each generated token (what the server reports per token)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams


def test_greedy_logprobs_match_the_models_own_distribution(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    prompts = [[5, 17, 42, 99], [100, 7]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for prompt, out in zip(prompts, outs):
        assert len(out.logprobs) == len(out.token_ids) == 6
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


def test_sampled_outputs_report_logprobs_and_the_seed_used(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    out = llm.generate([[5, 17, 42]], SamplingParams(max_tokens=5, temperature=0.8, ignore_eos=True))[0]
    assert len(out.logprobs) == 5 and all(lp <= 0 for lp in out.logprobs)
    assert isinstance(out.seed, int)  # drawn by the engine, reported so the request can be replayed
    again = llm.generate([[5, 17, 42]], SamplingParams(max_tokens=5, temperature=0.8, ignore_eos=True, seed=out.seed))[0]
    assert again.token_ids == out.token_ids
