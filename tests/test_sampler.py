"""Sampler: greedy, HF-identical repetition penalty, top_k/top_p, temperature, per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


# --- fault isolation: no valid parameters break a row, a broken row breaks only itself ------------------


@pytest.mark.parametrize(
    "params", [{"temperature": 1e-300}, {"temperature": 1e-38}, {"temperature": 5e-324}, {"temperature": 9e-6}],
)
def test_a_temperature_below_1e_5_is_greedy(params):
    logits = random_logits(4, seed=3)
    requests = [make_request(seed=None if SamplingParams(**params).is_greedy else s, **params) for s in range(4)]
    out = Sampler()(logits, requests)
    assert not out.errors
    assert out.token_ids == logits.argmax(-1).tolist()


def test_the_smallest_temperature_that_samples_does_not_overflow():
    logits = random_logits(2, seed=4) * 1e34  # / 1e-5 overflows float32
    requests = [make_request(seed=s, temperature=1e-5) for s in range(2)]
    assert SamplingParams(temperature=1e-5).is_greedy is False
    out = Sampler()(logits, requests)
    assert not out.errors and out.token_ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp) for lp in out.logprobs)


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    logits = random_logits(3, seed=5)
    out = Sampler()(logits, [make_request(seed=s, top_p=top_p) for s in range(3)])
    assert not out.errors and out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == pytest.approx([0.0] * 3, abs=1e-6)


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_repetition_penalty_at_its_bounds_on_huge_logits(penalty):
    logits = torch.tensor([[3e38, -3e38, 1.0, -1.0, 2e37, -2e37]])
    seen = [0, 1, 2, 3, 4, 5]
    for temperature in (0.0, 0.7):
        req = make_request(seed=None if temperature == 0 else 1, output=seen, temperature=temperature,
                           repetition_penalty=penalty)
        out = Sampler()(logits, [req])
        assert not out.errors and 0 <= out.token_ids[0] < 6 and not math.isnan(out.logprobs[0])


def test_rows_with_non_finite_logits_fail_alone_and_seeded_rows_are_untouched():
    logits = random_logits(4, seed=6)
    requests = [make_request(seed=1), make_request(temperature=0), make_request(seed=2), make_request(seed=3)]
    clean = Sampler()(logits, [make_request(seed=1), make_request(temperature=0), make_request(seed=2),
                               make_request(seed=3)])
    logits[0, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    out = Sampler()(logits, requests)
    assert sorted(out.errors) == [0, 2, 3]
    assert all("not finite" in str(e) for e in out.errors.values())
    assert out.token_ids[1] == clean.token_ids[1] and out.logprobs[1] == clean.logprobs[1]
    # a failed row's generator is never drawn from: the request would continue as if nothing happened
    assert torch.equal(requests[0].generator.get_state(), torch.Generator().manual_seed(1).get_state())


def test_a_row_whose_draw_raises_fails_alone():
    logits = random_logits(3, seed=7)
    broken = make_request(seed=5)
    broken.generator = "not a generator"
    out = Sampler()(logits, [make_request(seed=1), broken, make_request(seed=2)])
    reference = Sampler()(logits[[0, 2]], [make_request(seed=1), make_request(seed=2)])
    assert list(out.errors) == [1]
    assert [out.token_ids[0], out.token_ids[2]] == reference.token_ids


_VOCAB_SMALL = 8
_finite = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)  # any finite float32
_logit = st.one_of(_finite, st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, float("-inf")]))
_temperature = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-38, 9.99e-6, 1e-5, 1.0, 1e38, 1e300, 1.7e308]),
    st.floats(min_value=0.0, max_value=1.7e308, allow_nan=False, allow_infinity=False, allow_subnormal=True),
)
_top_p = st.one_of(
    st.sampled_from([5e-324, 1e-300, 1e-45, 0.5, 1.0 - 1e-16, 1.0]),
    st.floats(min_value=5e-324, max_value=1.0, allow_subnormal=True),
)
_row = st.fixed_dictionaries({
    "logits": st.lists(_logit, min_size=_VOCAB_SMALL, max_size=_VOCAB_SMALL),
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": st.one_of(st.sampled_from([-1, 0, 1, _VOCAB_SMALL, 10**30]), st.integers(-1, 20)),
    "repetition_penalty": st.one_of(st.sampled_from([0.01, 1.0, 100.0]), st.floats(min_value=0.01, max_value=100.0)),
    "seen": st.lists(st.integers(0, _VOCAB_SMALL + 2), max_size=6),
    "corrupt": st.sampled_from([None, None, None, "nan", "inf"]),
})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rows=st.lists(_row, min_size=1, max_size=4))
def test_no_valid_parameters_and_logits_break_the_sampler(rows):
    logits = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)
    for i, r in enumerate(rows):
        if all(math.isinf(x) for x in r["logits"]):
            logits[i, 0] = 1.0  # a row of -inf only is a broken row: corrupt covers those
        if r["corrupt"] is not None:
            logits[i, 3] = float(r["corrupt"])
    requests = []
    for r in rows:
        params = dict(temperature=r["temperature"], top_p=r["top_p"], top_k=r["top_k"],
                      repetition_penalty=r["repetition_penalty"])
        seed = None if SamplingParams(**params).is_greedy else 1
        requests.append(make_request(seed=seed, output=r["seen"], **params))
    out = Sampler()(logits, requests)  # never raises
    for i, r in enumerate(rows):
        if r["corrupt"] is not None:
            assert i in out.errors
            continue
        assert i not in out.errors, out.errors.get(i)
        token = out.token_ids[i]
        assert 0 <= token < _VOCAB_SMALL and logits[i, token] != float("-inf")
        assert not math.isnan(out.logprobs[i]) and out.logprobs[i] <= 1e-5
