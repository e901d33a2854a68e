"""The output stage: incremental text and stop strings after the scheduler, and the three output kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorax_lite import LLM, OutputKind, SamplingParams
from lorax_lite.engine.engine import LLMEngine
from lorax_lite.engine.request import RequestOutput

ENGINE = dict(dtype="float32", device="cpu")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), **ENGINE)


def run(engine: LLMEngine, prompt: str, params: SamplingParams, kind: OutputKind) -> list[RequestOutput]:
    """Every output one request gets, stepping the engine alone."""
    request = engine.make_request(prompt, params, output_kind=kind)
    engine.add(request)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request.request_id]
    return outputs


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_delta_outputs_add_up_to_the_cumulative_ones(llm: LLM) -> None:
    cumulative = run(llm.engine, PROMPT, greedy(20), OutputKind.CUMULATIVE)
    delta = run(llm.engine, PROMPT, greedy(20), OutputKind.DELTA)
    assert len(delta) == len(cumulative) == 20 and [o.finished for o in delta] == [o.finished for o in cumulative]
    assert [t for o in delta for t in o.token_ids] == cumulative[-1].token_ids
    assert [lp for o in delta for lp in o.logprobs] == cumulative[-1].logprobs
    assert "".join(o.text for o in delta) == cumulative[-1].text
    assert [o.num_generated_tokens for o in delta] == [len(o.token_ids) for o in cumulative] == list(range(1, 21))
    assert all(len(o.token_ids) == 1 for o in delta)  # each carries only its own token


def test_final_only_is_one_output_with_everything(llm: LLM) -> None:
    cumulative = run(llm.engine, PROMPT, greedy(12), OutputKind.CUMULATIVE)
    final = run(llm.engine, PROMPT, greedy(12), OutputKind.FINAL_ONLY)
    assert len(final) == 1 and final[0].finished
    assert (final[0].token_ids, final[0].text, final[0].logprobs) == (
        cumulative[-1].token_ids, cumulative[-1].text, cumulative[-1].logprobs)


def test_a_stop_string_finishes_the_request_and_cuts_the_text(llm: LLM) -> None:
    full = run(llm.engine, PROMPT, greedy(30), OutputKind.FINAL_ONLY)[0]
    stop = full.text[len(full.text) // 2 :][:3]  # a stop string the greedy text is sure to contain
    assert stop.strip(), full.text
    outs = run(llm.engine, PROMPT, greedy(30, stop=stop), OutputKind.DELTA)
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop" and text == full.text[: full.text.index(stop)]
    assert outs[-1].num_generated_tokens < 30
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0


def test_a_stop_string_on_the_last_allowed_token_wins_over_length(llm: LLM) -> None:
    """The scheduler finishes the request for length; the output stage then sees the stop string."""
    full = run(llm.engine, PROMPT, greedy(30), OutputKind.CUMULATIVE)
    final_text = full[-1].text
    # a token whose new text first appears there: as a stop string, it completes exactly at that token
    at, stop = next((i, new) for i in range(1, len(full))
                    if (new := full[i].text[len(full[i - 1].text):]).strip()
                    and final_text.index(new) == len(full[i - 1].text))
    out = run(llm.engine, PROMPT, greedy(at + 1, stop=stop), OutputKind.FINAL_ONLY)[0]
    assert out.num_generated_tokens == at + 1 and out.finish_reason == "stop"
    assert out.text == final_text[: len(full[at - 1].text)]
