"""LoRA serving behaviour: bad adapters fail only their own requests, ids and removal, the async API,
no head-of-line blocking, fairness under a hot adapter, and LoRA settings (slot thrashing: test_lora_correctness).

Token-level correctness of many adapters in one batch against PEFT lives elsewhere; here the good
adapter's and the base model's outputs are checked against PEFT / transformers as bystanders.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter, rewrite_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.engine.engine import LLMEngine
from lorax_lite.engine.request import RequestOutput
from lorax_lite.lora.loader import AdapterSource
from lorax_lite.lora.naming import InvalidAdapterIdError
from lorax_lite.lora.weights import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    CorruptWeightsError,
    PickledWeightsError,
    TargetModuleError,
    UnsupportedAdapterError,
)

PROMPTS = ["The quick brown fox", "What is the capital of France?"]
GREEDY = SamplingParams(max_tokens=8, temperature=0)
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=128)
GOOD_SPECS = {  # adapter id -> how it is built; "good" is the one with PEFT references
    "good": AdapterSpec(rank=8, alpha=16, seed=1),
    "a2": AdapterSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=2),
    "a3": AdapterSpec(rank=16, alpha=16, use_rslora=True, seed=3),
    "a4": AdapterSpec(rank=2, alpha=4, target_modules=("o_proj", "up_proj"), seed=4),
    "a5": AdapterSpec(rank=8, alpha=32, target_modules=("k_proj", "gate_proj"), seed=5),
    "a6": AdapterSpec(rank=12, alpha=12, seed=6),
}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def hf_greedy(model: PreTrainedModel, llm: LLM, prompt: str, max_tokens: int) -> list[int]:
    """transformers / PEFT greedy generation of one prompt, tokenized by the engine's tokenizer."""
    ids = llm.tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.input_ids.shape[1] :].tolist()


def drive(engine: LLMEngine, is_done: Callable[[], bool], max_steps: int, on_step: Callable[[], None] = lambda: None) -> None:
    """Step the engine (calling `on_step` after each step) until `is_done()`; fail after `max_steps`."""
    for _ in range(max_steps):
        engine.step()
        on_step()
        if is_done():
            return
    pytest.fail(f"not done after {max_steps} engine steps")


def hold_loads(engine: LLMEngine, adapter_key: str, release: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk loads of `adapter_key` wait on the loader thread until `release` is set (a timeout fails the load)."""
    real_read = engine.adapter_manager._read_fn

    def read(source: AdapterSource):  # runs on the loader thread
        if source.adapter_key == adapter_key and not release.wait(timeout=30):
            raise TimeoutError(f"the test never released {adapter_key}")
        return real_read(source)

    monkeypatch.setattr(engine.adapter_manager, "_read_fn", read)


def check_idle(engine: LLMEngine) -> None:
    engine.adapter_manager.check_invariants()
    engine.block_manager.check_invariants()
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    assert all(engine.adapter_manager.refcount(a) == 0 for a in engine.adapter_manager.host_keys)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-engine-adapters")


@pytest.fixture(scope="module")
def builder_model(tiny_llama_dir: Path) -> PreTrainedModel:
    """A base model that PEFT wraps and unwraps to save adapters (never used for references)."""
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def good_adapters(builder_model: PreTrainedModel, adapter_root: Path) -> dict[str, Path]:
    return {name: make_peft_adapter(builder_model, adapter_root / name, spec) for name, spec in GOOD_SPECS.items()}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, good_adapters: dict[str, Path]) -> LLM:
    """The offline engine with max_loras=8 and every good adapter added eagerly."""
    engine = LLM(str(tiny_llama_dir), max_loras=8, max_lora_rank=16, **ENGINE)
    for name, path in good_adapters.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, good_adapters: dict[str, Path], llm: LLM) -> dict[tuple[str | None, str], list[int]]:
    """(adapter id or None, prompt) -> greedy tokens (GREEDY) from PEFT ("good") and transformers (None)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), good_adapters["good"])
    return {(adapter, p): hf_greedy(model, llm, p, GREEDY.max_tokens) for adapter, model in (("good", peft), (None, base)) for p in PROMPTS}


# --- 1. bad adapters fail only their own requests ------------------------------------------------------


@dataclass
class BadAdapterFactory:
    """Writes one bad adapter to `out`: an edited copy of the good one, or a real PEFT save."""

    good: Path
    out: Path
    model: PreTrainedModel  # for PEFT saves
    model_dir: Path  # the base model's directory

    def copy(self) -> Path:
        return Path(shutil.copytree(self.good, self.out))

    def peft(self, spec: AdapterSpec, model: PreTrainedModel | None = None) -> Path:
        return make_peft_adapter(model or self.model, self.out, spec)

    def edited_config(self, text: str | None) -> Path:
        """A copy whose adapter_config.json is replaced by `text` (None: deleted)."""
        file = self.copy() / ADAPTER_CONFIG_NAME
        file.unlink() if text is None else file.write_text(text)
        return self.out

    def not_lora(self) -> Path:
        rewrite_config(self.copy(), peft_type="IA3")
        return self.out

    def pickled_only(self) -> Path:
        self.copy()
        torch.save(load_file(self.out / ADAPTER_WEIGHTS_NAME), self.out / "adapter_model.bin")
        (self.out / ADAPTER_WEIGHTS_NAME).unlink()
        return self.out

    def truncated(self) -> Path:
        file = self.copy() / ADAPTER_WEIGHTS_NAME
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return self.out

    def bias_all(self) -> Path:  # make_peft_adapter fixes bias="none"
        peft_model = get_peft_model(self.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"))
        peft_model.save_pretrained(self.out)
        peft_model.unload()
        return self.out

    def for_narrower_model(self) -> Path:
        config = LlamaConfig.from_pretrained(self.model_dir)
        config.hidden_size, config.intermediate_size = 32, 64
        return self.peft(AdapterSpec(target_modules=("q_proj", "v_proj")), AutoModelForCausalLM.from_config(config))


# kind -> (how to build it, the error its requests finish with, a pattern of the error's message)
REFUSALS: dict[str, tuple[Callable[[BadAdapterFactory], Path], type[Exception], str]] = {
    "missing-directory": (lambda f: f.out, AdapterNotFoundError, "no such directory"),
    "missing-config": (lambda f: f.edited_config(None), AdapterConfigError, "adapter_config.json is missing"),
    "malformed-json": (lambda f: f.edited_config("{not json"), AdapterConfigError, "not readable JSON"),
    "peft-type-not-lora": (BadAdapterFactory.not_lora, AdapterConfigError, "peft_type 'IA3'; lorax-lite serves only 'LORA'"),
    "dora": (lambda f: f.peft(AdapterSpec(extra={"use_dora": True})), UnsupportedAdapterError, r"uses DoRA \(use_dora=true\)"),
    "bias-all": (BadAdapterFactory.bias_all, UnsupportedAdapterError, r"trained biases \(bias='all'\)"),
    "modules-to-save": (lambda f: f.peft(AdapterSpec(extra={"modules_to_save": ["lm_head"]})),
                        UnsupportedAdapterError, "fully trained extra modules"),
    "targets-lm-head": (lambda f: f.peft(AdapterSpec(target_modules=("q_proj", "lm_head"))),
                        TargetModuleError, "targets 'lm_head', which lorax-lite does not support"),
    "targets-embed-tokens": (lambda f: f.peft(AdapterSpec(target_modules=("q_proj", "embed_tokens"))),
                             TargetModuleError, "targets 'embed_tokens', which lorax-lite does not support"),
    "rank-above-max": (lambda f: f.peft(AdapterSpec(rank=32, alpha=32)), AdapterRankError, "rank 32 is above max_lora_rank 16"),
    "pickled-bin-only": (BadAdapterFactory.pickled_only, PickledWeightsError, r"pickled weights \(adapter_model.bin\)"),
    "truncated-safetensors": (BadAdapterFactory.truncated, CorruptWeightsError, "adapter_model.safetensors is corrupt"),
    "shape-mismatch": (BadAdapterFactory.for_narrower_model, AdapterShapeError, "was it trained for a different model"),
}


@pytest.fixture(scope="module")
def bad_adapter(good_adapters: dict[str, Path], builder_model: PreTrainedModel, tiny_llama_dir: Path,
                adapter_root: Path) -> Callable[[str], Path]:
    """kind -> directory of that bad adapter (each built once per module)."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            factory = BadAdapterFactory(good_adapters["good"], adapter_root / f"bad-{kind}", builder_model, tiny_llama_dir)
            built[kind] = REFUSALS[kind][0](factory)
        return built[kind]

    return get


def assert_refused(out: RequestOutput, error_type: type[Exception], message: str) -> None:
    assert out.finished and out.finish_reason == "error" and out.token_ids == []
    assert type(out.exception) is error_type, f"{type(out.exception).__name__}: {out.exception}"
    assert re.search(message, str(out.exception)) and out.error == str(out.exception)


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_lazy_bad_adapter_fails_only_its_own_requests(kind: str, llm: LLM, bad_adapter, reference) -> None:
    _, error_type, message = REFUSALS[kind]
    bad = f"bad-{kind}"
    llm.engine.add_adapter(bad, bad_adapter(kind))  # lazily: read on first use, by the loader thread
    try:
        adapters = [bad, "good", None] * len(PROMPTS)
        prompts = [p for p in PROMPTS for _ in range(3)]
        outs = llm.generate(prompts, GREEDY, adapter_ids=adapters)
    finally:
        llm.remove_adapter(bad)
    for prompt, adapter, out in zip(prompts, adapters, outs):
        if adapter == bad:
            assert_refused(out, error_type, message)
        else:
            assert out.finish_reason in ("length", "eos") and out.exception is None
            assert out.token_ids == reference[(adapter, prompt)], f"adapter {adapter}, prompt {prompt!r}"
    check_idle(llm.engine)


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_eager_add_of_bad_adapter_raises_and_leaves_engine_usable(kind: str, llm: LLM, bad_adapter, reference) -> None:
    _, error_type, message = REFUSALS[kind]
    with pytest.raises(error_type, match=message) as info:
        llm.add_adapter(f"eager-{kind}", bad_adapter(kind))
    assert type(info.value) is error_type
    assert f"eager-{kind}" not in llm.engine.added_adapter_ids
    out = llm.generate(PROMPTS[0], GREEDY, adapter_ids="good")[0]
    assert out.token_ids == reference[("good", PROMPTS[0])]
    check_idle(llm.engine)


# --- 2. adapter ids, removal, LoRA off ---------------------------------------------------------------------


def test_unknown_adapter_in_generate_raises_before_anything_runs(llm: LLM) -> None:
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'") as info:
        llm.generate(PROMPTS, GREEDY, adapter_ids=[None, "nope"])
    assert isinstance(info.value, ValueError)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", ""])
def test_invalid_adapter_id_is_refused_without_touching_the_filesystem(llm: LLM, bad_id: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm.engine, "read_adapter", lambda *a: pytest.fail("the adapter path was read"))
    missing = tmp_path / "does-not-exist"  # reading it would raise AdapterNotFoundError instead
    with pytest.raises(InvalidAdapterIdError, match="invalid adapter id"):
        llm.add_adapter(bad_id, missing)
    with pytest.raises(InvalidAdapterIdError):
        llm.engine.add_adapter(bad_id, missing)
    with pytest.raises(InvalidAdapterIdError):
        llm.generate(PROMPTS[0], GREEDY, adapter_ids=bad_id)
    assert bad_id not in llm.engine.added_adapter_ids


def test_remove_unknown_adapter_raises_not_found(llm: LLM) -> None:
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'never-added'"):
        llm.remove_adapter("never-added")


def test_adding_the_same_id_twice_is_refused_and_keeps_the_first(llm: LLM, good_adapters: dict[str, Path], reference) -> None:
    with pytest.raises(ValueError, match="'good' is already added; remove it first"):
        llm.add_adapter("good", good_adapters["a2"])
    with pytest.raises(ValueError, match="already added"):
        llm.engine.add_adapter("good", good_adapters["a2"])
    assert llm.generate(PROMPTS[1], GREEDY, adapter_ids="good")[0].token_ids == reference[("good", PROMPTS[1])]


def test_removed_adapter_refuses_new_requests(llm: LLM, good_adapters: dict[str, Path], reference) -> None:
    llm.add_adapter("short-lived", good_adapters["good"])
    assert llm.generate(PROMPTS[0], GREEDY, adapter_ids="short-lived")[0].token_ids == reference[("good", PROMPTS[0])]
    llm.remove_adapter("short-lived")
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'short-lived'"):
        llm.generate(PROMPTS[0], GREEDY, adapter_ids="short-lived")
    assert "short-lived" not in llm.engine.adapter_manager.host_keys
    assert llm.engine.adapter_manager.slot_of("short-lived") is None
    check_idle(llm.engine)


def test_adapters_are_refused_when_lora_is_off(tiny_llama_dir: Path, good_adapters: dict[str, Path]) -> None:
    llm0 = LLM(str(tiny_llama_dir), max_loras=0, **ENGINE)
    for add in (llm0.add_adapter, llm0.engine.add_adapter):
        with pytest.raises(ValueError, match=r"LoRA is turned off \(max_loras=0\)"):
            add("good", good_adapters["good"])
    with pytest.raises(ValueError, match="LoRA is turned off"):
        llm0.generate(PROMPTS[0], GREEDY, adapter_ids="good")
    assert llm0.generate(PROMPTS[0], GREEDY)[0].finished


def test_removal_while_its_load_is_in_flight_fails_the_waiting_request(llm: LLM, good_adapters: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    engine, release = llm.engine, threading.Event()
    hold_loads(engine, "gone", release, monkeypatch)
    engine.add_adapter("gone", good_adapters["good"])
    try:
        req = engine.add_request(PROMPTS[0], GREEDY, adapter_id="gone")
        engine.step()
        assert engine.adapter_manager.is_loading("gone")
        engine.remove_adapter("gone")
    finally:
        release.set()
    drive(engine, lambda: req.is_finished, max_steps=200)
    assert req.finish_reason.value == "error" and type(req.exception) is AdapterNotFoundError
    assert "gone" not in engine.adapter_manager.host_keys
    check_idle(engine)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
def test_id_readded_while_old_request_runs_serves_the_new_weights(llm: LLM, good_adapters: dict[str, Path], eager: bool) -> None:
    """add_adapter says "remove it first to replace it": the replacement must be what new requests get."""
    engine = llm.engine
    expected_old = llm.generate(PROMPTS[0], greedy(20), adapter_ids="good")[0].token_ids
    expected_new = llm.generate(PROMPTS[1], GREEDY, adapter_ids="a2")[0].token_ids
    engine.add_adapter("swap", good_adapters["good"], engine.read_adapter(good_adapters["good"]))
    old = engine.add_request(PROMPTS[0], greedy(20), adapter_id="swap")
    for _ in range(3):
        engine.step()
    engine.remove_adapter("swap")  # `old` keeps running with the old weights
    new_weights = engine.read_adapter(good_adapters["a2"]) if eager else None
    engine.add_adapter("swap", good_adapters["a2"], new_weights)
    new = engine.add_request(PROMPTS[1], GREEDY, adapter_id="swap")
    try:
        drive(engine, lambda: old.is_finished and new.is_finished, max_steps=200)
    finally:
        engine.remove_adapter("swap")
    check_idle(engine)
    assert old.output_token_ids == expected_old
    assert new.output_token_ids == expected_new


def test_a_request_resolved_before_its_adapter_was_removed_is_refused_and_the_readded_id_serves_new_weights(
        llm: LLM, good_adapters: dict[str, Path]) -> None:
    """AsyncLLM resolves in a worker thread, so a request can reach the engine after its adapter was removed."""
    engine = llm.engine
    expected_new = llm.generate(PROMPTS[0], GREEDY, adapter_ids="a2")[0].token_ids
    engine.add_adapter("flip", good_adapters["good"])
    late = engine.make_request(PROMPTS[0], GREEDY, adapter=engine.resolve_adapter("flip"))  # resolved, not admitted
    engine.remove_adapter("flip")
    with pytest.raises(AdapterNotFoundError, match="'flip' was removed"):
        engine.add(late)
    engine.add_adapter("flip", good_adapters["a2"])
    assert engine.resolve_adapter("flip").adapter_key == "flip#2"  # new weights under the same id: a new key
    with pytest.raises(AdapterNotFoundError, match="was removed"):
        engine.add(late)  # nor is it served the re-added adapter it never asked for
    try:
        assert llm.generate(PROMPTS[0], GREEDY, adapter_ids="flip")[0].token_ids == expected_new
    finally:
        engine.remove_adapter("flip")
    check_idle(engine)


def test_an_id_readded_while_its_old_load_is_in_flight_serves_the_new_weights(
        llm: LLM, good_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, release = llm.engine, threading.Event()
    expected_new = llm.generate(PROMPTS[0], GREEDY, adapter_ids="a2")[0].token_ids
    hold_loads(engine, "inflight", release, monkeypatch)
    engine.add_adapter("inflight", good_adapters["good"])  # lazily: its load waits for `release`
    try:
        old = engine.add_request(PROMPTS[0], GREEDY, adapter_id="inflight")
        engine.step()
        assert engine.adapter_manager.is_loading("inflight")
        engine.remove_adapter("inflight")
        engine.add_adapter("inflight", good_adapters["a2"])  # lazily too, while the old load is in flight
        new = engine.add_request(PROMPTS[0], GREEDY, adapter_id="inflight")
    finally:
        release.set()
    try:
        drive(engine, lambda: old.is_finished and new.is_finished, max_steps=200)
    finally:
        engine.remove_adapter("inflight")
    assert old.finish_reason.value == "error" and type(old.exception) is AdapterNotFoundError
    assert new.error is None and new.output_token_ids == expected_new
    check_idle(engine)


# --- 3, 4. AsyncLLM ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def allm(tiny_llama_dir: Path, good_adapters: dict[str, Path]):
    engine = AsyncLLM(str(tiny_llama_dir), max_loras=4, **ENGINE)
    for name in ("good", "a2", "a3"):
        engine.add_adapter(name, good_adapters[name])
    yield engine
    engine.shutdown()


async def collect(allm: AsyncLLM, prompt: str, params: SamplingParams, **kw: object) -> list[RequestOutput]:
    return [out async for out in allm.generate(prompt, params, **kw)]


def test_async_removal_mid_stream_lets_the_running_request_finish(allm: AsyncLLM, llm: LLM, good_adapters: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    params = greedy(40)
    expected = llm.generate(PROMPTS[0], params, adapter_ids="good")[0].token_ids
    allm.add_adapter("longrun", good_adapters["good"])
    removed, calls, real_step = threading.Event(), itertools.count(1), allm.engine.step

    def step_pausing_at_the_third():  # the request has 2 tokens; hold the engine until the adapter is removed
        if next(calls) == 3:
            removed.wait(timeout=30)  # no assert: an error here would kill the shared engine thread
        return real_step()

    monkeypatch.setattr(allm.engine, "step", step_pausing_at_the_third)

    async def main() -> list[RequestOutput]:
        outs = []
        try:
            async for out in allm.generate(PROMPTS[0], params, adapter_id="longrun"):
                outs.append(out)
                if len(outs) == 2:
                    allm.remove_adapter("longrun")
                    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'longrun'"):
                        await collect(allm, PROMPTS[1], params, adapter_id="longrun")
                    removed.set()
        finally:
            removed.set()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and outs[-1].token_ids == expected
    assert "longrun" not in allm.engine.added_adapter_ids
    assert allm.engine.adapter_manager.slot_of("longrun") is None and "longrun" not in allm.engine.adapter_manager.host_keys


def test_async_add_adapter_then_generate_at_once(allm: AsyncLLM, good_adapters: dict[str, Path], reference) -> None:
    allm.add_adapter("fresh", good_adapters["good"])
    try:
        outs = asyncio.run(collect(allm, PROMPTS[1], GREEDY, adapter_id="fresh"))
    finally:
        allm.remove_adapter("fresh")
    assert outs[-1].finished and outs[-1].token_ids == reference[("good", PROMPTS[1])]


def test_async_concurrent_adapter_streams_match_offline(allm: AsyncLLM, llm: LLM) -> None:
    jobs = [(p, a) for a in ("good", "a2", "a3", None) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(allm, p, params, adapter_id=a) for p, a in jobs))

    streams = asyncio.run(main())
    offline = llm.generate([p for p, _ in jobs], params, adapter_ids=[a for _, a in jobs])
    assert [s[-1].token_ids for s in streams] == [o.token_ids for o in offline]
    assert [s[-1].adapter_id for s in streams] == [a for _, a in jobs]


# --- 5. no head-of-line blocking ----------------------------------------------------------------------------


def test_slow_loading_adapter_does_not_block_requests_behind_it(llm: LLM, good_adapters: dict[str, Path], reference,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine, release = llm.engine, threading.Event()
    hold_loads(engine, "slow", release, monkeypatch)
    engine.add_adapter("slow", good_adapters["good"])  # lazily: its load waits for `release`
    try:
        slow = engine.add_request(PROMPTS[0], GREEDY, adapter_id="slow")
        base = engine.add_request(PROMPTS[0], GREEDY)
        fast = engine.add_request(PROMPTS[1], GREEDY, adapter_id="good")
        drive(engine, lambda: base.is_finished and fast.is_finished, max_steps=40)
        assert not slow.is_finished and slow.num_generated_tokens == 0 and engine.adapter_manager.is_loading("slow")
        release.set()
        drive(engine, lambda: slow.is_finished, max_steps=200)
    finally:
        release.set()
        engine.remove_adapter("slow")
    assert base.output_token_ids == reference[(None, PROMPTS[0])]
    assert fast.output_token_ids == reference[("good", PROMPTS[1])]
    assert slow.error is None and slow.output_token_ids == reference[("good", PROMPTS[0])]
    check_idle(engine)


# --- 6. fairness --------------------------------------------------------------------------------------------


def test_cold_adapter_is_served_despite_a_steady_hot_stream(tiny_llama_dir: Path, good_adapters: dict[str, Path], reference) -> None:
    llm1 = LLM(str(tiny_llama_dir), max_loras=1, max_cpu_loras=3, **ENGINE)
    llm1.add_adapter("hot", good_adapters["a2"])
    llm1.add_adapter("cold", good_adapters["good"])
    engine, hot = llm1.engine, []
    hot.append(engine.add_request(PROMPTS[1], greedy(6), adapter_id="hot"))
    engine.step()
    cold = engine.add_request(PROMPTS[0], GREEDY, adapter_id="cold")
    cold_done_at = None
    for step in range(1, 81):  # a new hot request every step: the hot slot is never idle on its own
        hot.append(engine.add_request(PROMPTS[1], greedy(6), adapter_id="hot"))
        engine.step()
        engine.adapter_manager.check_invariants()
        if cold.is_finished and cold_done_at is None:
            cold_done_at = step
    assert cold_done_at is not None and cold_done_at <= 30, f"cold request finished at step {cold_done_at}"
    assert sum(r.is_finished for r in hot) > 20  # the hot stream kept flowing
    drive(engine, lambda: not engine.has_unfinished_requests(), max_steps=2000)
    assert cold.output_token_ids == reference[("good", PROMPTS[0])]
    assert all(r.finish_reason.value == "length" and r.output_token_ids == hot[0].output_token_ids for r in hot)
    check_idle(engine)


# --- 7. LoRA settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_loras": -1}, "max_loras must be an integer >= 0"),
    ({"max_lora_rank": 0}, "max_lora_rank must be a positive integer"),
    ({"max_loras": 4, "max_cpu_loras": 2}, r"max_cpu_loras \(2\) must be >= max_loras \(4\)"),
])
def test_bad_lora_settings_name_the_setting(tiny_llama_dir: Path, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_llama_dir), **settings, **ENGINE)

