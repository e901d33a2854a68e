"""Sampler: greedy, HF-identical repetition penalty, top_k/top_p, temperature, per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from lorax_lite.engine.request import Request, SamplingParams
from lorax_lite.engine.sampler import Sampler, SamplerOutput

VOCAB = 64


def make_request(
    seed: int | None = None, prompt: list[int] | None = None, output: list[int] | None = None, **params
) -> Request:
    req = Request(f"r{seed}", prompt or [1, 2, 3], SamplingParams(seed=seed, **params))
    req.output_token_ids = list(output or [])
    if seed is not None:
        req.generator = torch.Generator().manual_seed(seed)
    return req


def random_logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_raw_logprobs():
    logits = random_logits(5)
    out = Sampler()(logits, [make_request(temperature=0) for _ in range(5)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True))[:, 0]
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_accepts_half_precision():
    logits = random_logits(3).to(torch.bfloat16)
    out = Sampler()(logits, [make_request(temperature=0) for _ in range(3)])
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_repetition_penalty_matches_transformers():
    sampler = Sampler()
    rows = [([5, 6, 7], [8, 5]), ([1, 2, 3], [9, 9]), ([40, 63, 7], [0, 12])]
    requests = [make_request(prompt=p, output=o, temperature=0, repetition_penalty=1.7) for p, o in rows]
    logits = random_logits(3, seed=1)
    input_ids = torch.tensor([p + o for p, o in rows])
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.7)(input_ids, logits.clone())
    assert torch.equal(sampler._apply_repetition_penalty(logits, requests), expected)
    assert sampler(logits, requests).token_ids == expected.argmax(-1).tolist()


def test_repetition_penalty_changes_greedy_choice_and_leaves_other_rows():
    logits = torch.zeros(2, VOCAB)
    logits[:, 10] = 2.0
    logits[:, 11] = 1.5
    penalized = make_request(prompt=[10], temperature=0, repetition_penalty=2.0)
    plain = make_request(prompt=[10], temperature=0)
    assert Sampler()(logits, [penalized, plain]).token_ids == [11, 10]


def test_repetition_penalty_ignores_ids_outside_vocab():
    logits = random_logits(1)
    req = make_request(prompt=[3, VOCAB + 5], temperature=0, repetition_penalty=1.5)
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.5)(torch.tensor([[3, VOCAB + 5]]), logits.clone())
    assert torch.equal(Sampler()._apply_repetition_penalty(logits, [req]), expected)


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_narrow_filters_equal_greedy(params):
    logits = random_logits(8, seed=2)
    requests = [make_request(seed=s, temperature=1.3, **params) for s in range(8)]
    out = Sampler()(logits, requests)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == pytest.approx([0.0] * 8, abs=1e-6)


def draw_frequency(logits_row: list[float], num_draws: int, **params) -> list[float]:
    req = make_request(seed=123, **params)
    logits = torch.tensor([logits_row])
    sampler = Sampler()
    counts = [0] * len(logits_row)
    for _ in range(num_draws):
        counts[sampler(logits, [req]).token_ids[0]] += 1
    return [c / num_draws for c in counts]


def test_temperature_one_follows_softmax():
    freq = draw_frequency([0.0, math.log(3)], 4000, temperature=1.0)
    assert freq[1] == pytest.approx(0.75, abs=0.05)


def test_temperature_sharpens():
    # logits / 0.5 = [0, 2 log 3] -> p(token 1) = 9 / 10
    freq = draw_frequency([0.0, math.log(3)], 4000, temperature=0.5)
    assert freq[1] == pytest.approx(0.9, abs=0.03)


def test_top_k_and_top_p_restrict_support():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits_row = [math.log(p) for p in probs]
    freq_k = draw_frequency(logits_row, 2000, top_k=2)
    assert freq_k[2] == freq_k[3] == 0 and freq_k[0] == pytest.approx(0.5 / 0.8, abs=0.05)
    # smallest set with mass >= 0.7 is {0, 1}
    freq_p = draw_frequency(logits_row, 2000, top_p=0.7)
    assert freq_p[2] == freq_p[3] == 0 and freq_p[0] == pytest.approx(0.5 / 0.8, abs=0.05)


def test_sampled_logprob_is_from_processed_distribution():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    out = Sampler()(logits, [make_request(seed=0, top_k=2)])
    expected = {0: math.log(0.5 / 0.8), 1: math.log(0.3 / 0.8)}[out.token_ids[0]]
    assert out.logprobs[0] == pytest.approx(expected, abs=1e-5)


def neighbours(kind: str) -> list[Request]:
    if kind == "none":
        return []
    if kind == "greedy":
        return [make_request(temperature=0), make_request(temperature=0, repetition_penalty=1.2)]
    return [
        make_request(seed=99, temperature=0.7, top_k=5),
        make_request(seed=98, temperature=1.5, top_p=0.3, repetition_penalty=1.3, output=[4, 5]),
        make_request(temperature=0),
    ]


def seeded_draws(seed: int, kind: str, position: int, num_steps: int = 30) -> list[int]:
    """Draw num_steps tokens for one seeded request placed among the given neighbours."""
    req = make_request(seed=seed, temperature=0.9, top_k=40, top_p=0.95)
    others = neighbours(kind)
    batch = others[:position] + [req] + others[position:]
    row = batch.index(req)
    sampler = Sampler()
    tokens = []
    for step in range(num_steps):
        logits = random_logits(len(batch), seed=1000 + step)
        logits[row] = random_logits(1, seed=step)[0]  # the tracked row sees the same logits in every batch
        tokens.append(sampler(logits, batch).token_ids[row])
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    alone = seeded_draws(7, "none", 0)
    assert seeded_draws(7, "greedy", 1) == alone
    assert seeded_draws(7, "mixed", 0) == alone
    assert seeded_draws(7, "mixed", 3) == alone


def test_different_seeds_differ():
    assert seeded_draws(7, "none", 0) != seeded_draws(8, "none", 0)


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="N=2"):
        Sampler()(random_logits(3), [make_request(temperature=0)] * 2)


def test_greedy_with_penalty_matches_hf_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).eval()
    prompt = [3, 17, 17, 42, 5]
    req = make_request(prompt=prompt, temperature=0, repetition_penalty=1.8)
    sampler = Sampler()
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([req.all_token_ids])).logits[:, -1]
            req.output_token_ids.append(sampler(logits, [req]).token_ids[0])
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):]
    assert req.output_token_ids == expected.tolist()
