"""Continuous batching, sampling seeds, stops and bad input, on the offline engine."""

from __future__ import annotations

import pytest

from lorax_lite import LLM, SamplingParams
from lorax_lite.invariants import InvariantError


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=64)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def run_to_completion(engine):
    """Step the engine; returns request ids in the order they finished and the step of each first token."""
    finished, first_token_step, step = [], {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
            if out.finished:
                finished.append(out.request_id)
    return finished, first_token_step


def test_short_requests_finish_before_a_long_one(llm):
    """The seed experiment: max_tokens 100, 10, 10 submitted together."""
    engine = llm.engine
    for rid, m in (("long", 100), ("short-1", 10), ("short-2", 10)):
        engine.add_request("If you could have dinner with anyone, who?", greedy(m), request_id=rid)
    finished, _ = run_to_completion(engine)
    assert finished[-1] == "long" and set(finished[:2]) == {"short-1", "short-2"}


def test_request_joining_mid_flight_gets_its_first_token_before_others_finish(llm):
    engine = llm.engine
    for i in range(3):
        engine.add_request("The quick brown fox", greedy(60), request_id=f"running-{i}")
    for _ in range(5):
        engine.step()
    engine.add_request("Hello, world!", greedy(5), request_id="late")
    finished, first_token_step = run_to_completion(engine)
    assert first_token_step["late"] == 1  # first token in the very next step
    assert finished.index("late") < finished.index("running-0")


def test_same_seed_same_text_whatever_is_batched(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate("Pricing: the price of", params)[0]
    others = [SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=True) for m, t, s in ((5, 0.7, 1), (30, 1.3, 2), (12, 0, None))]
    crowded = llm.generate(
        ["The quick brown fox", "Pricing: the price of", "Hello", "What is the capital"],
        [others[0], params, others[1], others[2]],
    )[1]
    assert crowded.token_ids == alone.token_ids and crowded.text == alone.text
    different = llm.generate("Pricing: the price of", SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert different.token_ids != alone.token_ids


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate("The quick brown fox", greedy(20))[0]
    stop_token = base.token_ids[5]
    out = llm.generate("The quick brown fox", greedy(20, stop_token_ids=[stop_token]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(stop_token) + 1]
    stop_text = base.text[len(base.text) // 2 :][:3]
    out = llm.generate("The quick brown fox", greedy(20, stop=[stop_text]))[0]
    assert out.finish_reason == "stop" and out.text == base.text[: base.text.index(stop_text)]
    assert stop_text not in out.text


def test_finish_reason_length(llm):
    out = llm.generate("Hello", greedy(7))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7


@pytest.mark.slow
def test_eos_ends_generation_unless_ignored(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(question, SamplingParams(max_tokens=40, temperature=0))[0]
    assert out.finish_reason == "eos" and out.token_ids[-1] == llm.tokenizer.eos_token_id
    assert "Paris" in out.text and "<|im_end|>" not in out.text
    ignored = llm.chat(question, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 40


def test_generate_accepts_text_token_ids_and_one_params(llm):
    ids = llm.tokenizer("Hello there").input_ids
    outs = llm.generate([ids, "Hello there"], greedy(4))
    assert outs[0].token_ids == outs[1].token_ids and outs[1].prompt == "Hello there"
    assert outs[0].prompt is None and outs[0].prompt_token_ids == outs[1].prompt_token_ids == ids
    ids_given = [o.request_id for o in outs]
    assert all(isinstance(i, str) and i for i in ids_given) and len(set(ids_given)) == 2  # engine-assigned, distinct
    single = llm.generate(ids, greedy(4))
    assert len(single) == 1 and single[0].token_ids == outs[0].token_ids


def test_chat_uses_the_chat_template(llm):
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(conversation, greedy(5))[0]
    expected = llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected and len(out.token_ids) == 5
    assert len(llm.chat([conversation, conversation], greedy(3))) == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ({"repetition_penalty": 0.0099}, "repetition_penalty"),
        ({"repetition_penalty": 100.5}, "repetition_penalty"),
        ({"seed": "abc"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature, greedy", [(0, True), (1e-300, True), (5e-324, True), (9.9e-6, True),
                                                 (1e-5, False), (0.7, False), (1e300, False)])
def test_a_temperature_below_1e_5_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_bad_prompts_raise_and_engine_keeps_serving(llm):
    engine = llm.engine
    engine.add_request("The quick brown fox", greedy(8), request_id="bystander")
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", greedy(4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(4))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * engine.max_seq_len], greedy(4))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("price " * engine.max_seq_len, greedy(4))
    with pytest.raises(ValueError, match="string or a list"):
        llm.engine.add_request(42, greedy(4))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 10**9]], greedy(4))
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [greedy(4)])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", greedy(2), request_id="bystander")
    # a batch with one bad prompt queues nothing
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], greedy(4))
    assert [r.request_id for r in engine.scheduler.waiting] == ["bystander"]
    finished, _ = run_to_completion(engine)
    assert finished == ["bystander"]
    assert llm.generate("Hello", greedy(3))[0].finished


def test_bad_engine_config_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(tiny_llama_dir), max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown engine setting"):
        LLM(str(tiny_llama_dir), max_loras_typo=3)
    with pytest.raises(ValueError, match="context length"):
        LLM(str(tiny_llama_dir), device="cpu", max_model_len=10**6)
    with pytest.raises(ValueError, match="KV cache"):
        LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=2, block_size=4, max_model_len=64)


def test_max_model_len_defaults_and_caps(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=8, block_size=4)
    assert llm.engine.max_seq_len == 32  # capped by the cache (the model allows 512)
    out = llm.generate([[5] * 30], greedy(10))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2


def test_with_debug_invariants_a_leak_is_caught_when_the_engine_goes_idle(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("LORAX_DEBUG_INVARIANTS", "1")
    llm = LLM(str(tiny_llama_dir), device="cpu")
    assert llm.generate("Hello", greedy(2))[0].finished  # a clean engine passes its idle check
    llm.engine.block_manager.allocate("leaked", 4)  # blocks no request owns
    with pytest.raises(InvariantError, match="still hold blocks"):
        llm.generate("Hello", greedy(2))
    monkeypatch.setenv("LORAX_DEBUG_INVARIANTS", "0")
    unchecked = LLM(str(tiny_llama_dir), device="cpu")
    unchecked.engine.block_manager.allocate("leaked", 4)
    assert unchecked.generate("Hello", greedy(2))[0].finished  # off by default: no cost in production
