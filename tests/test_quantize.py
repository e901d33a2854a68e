"""The quantized base model (lorax_lite/quantize.py) on the tiny model: each layer kind against fp32, LoRA on a
quantized base (the delta exact on top of the quantized output), the engine with a quantized base and a mixed
batch of adapters against a reference computed separately, and refusals of unsupported combinations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import LLM, SamplingParams
from lorax_lite.config import EngineConfig
from lorax_lite.lora.layers import LoRALinear
from lorax_lite.lora.ops import LoRAMapping, current_mapping, lora_context, select_backend
from lorax_lite.quantize import (
    Fp8Linear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantizedLinear,
    check_supported,
    linear_weight_bytes,
    quantize_decoder,
)

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=256, max_model_len=128)
LAYER_KINDS = [Int8DynamicLinear, Int8WeightOnlyLinear, Fp8Linear]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_each_quantized_layer_is_close_to_fp32_and_about_a_quarter_of_its_bytes(kind, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(2, 7, 96)
    quantized = kind(linear)
    got, want = quantized(x), linear(x)
    assert got.shape == want.shape == (2, 7, 160)
    assert relative_error(got, want) < (0.08 if kind is Fp8Linear else 0.02)
    fp32_bytes = linear.weight.numel() * 4 + (160 * 4 if bias else 0)
    assert quantized.weight_bytes <= 0.30 * fp32_bytes


def test_int8_activations_are_quantized_per_token_so_a_row_does_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    layer = Int8DynamicLinear(nn.Linear(64, 32, bias=False))
    small = torch.randn(3, 64) * 0.01
    alone = layer(small)
    beside_a_huge_row = layer(torch.cat([small, torch.randn(1, 64) * 1000]))[:3]
    torch.testing.assert_close(beside_a_huge_row, alone, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lora_on_a_quantized_base_adds_the_exact_delta_of_the_unquantized_input(rank):
    torch.manual_seed(rank)
    base = nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, max_loras=2, max_lora_rank=8, backend=select_backend(torch.device("cpu"), torch.float32))
    a, b = torch.randn(rank, 64) * 0.1, torch.randn(48, rank) * 0.1
    layer.set_slot(1, (a, b))
    layer.base_layer = quantized = Int8DynamicLinear(base)
    x = torch.randn(1, 6, 64)
    mapping = LoRAMapping.build([1, None], [4, 2], [0, rank], torch.device("cpu"))  # 4 tokens on slot 1, 2 without
    with lora_context(mapping):
        got = layer(x)
    want = quantized(x).clone()
    want[0, :4] += x[0, :4] @ a.T @ b.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_decoder_replaces_every_decoder_linear_and_the_head(tiny_llama_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    embeddings, before = model.get_input_embeddings().weight.clone(), linear_weight_bytes(model)
    report = quantize_decoder(model, "int8")
    assert report is not None and report.num_layers == 2 * 7 and report.bytes_before == before
    assert linear_weight_bytes(model) == report.bytes_after <= 0.30 * before
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert isinstance(model.lm_head, Int8DynamicLinear) and report.head_quantized
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # the lookup stays fp32
    assert quantize_decoder(model, "none") is None
    kept = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert not quantize_decoder(kept, "int8", head=False).head_quantized and type(kept.lm_head) is nn.Linear


@pytest.mark.parametrize("mode, device, dtype, message", [
    ("int4", "cpu", torch.float32, "quantize must be one of"),
    ("fp8", "cpu", torch.float32, "compute capability 8.9"),
    ("int8", "cpu", torch.bfloat16, "computes in float32"),
])
def test_unsupported_combinations_are_refused_with_what_to_change(mode, device, dtype, message):
    with pytest.raises(ValueError, match=message):
        check_supported(mode, torch.device(device), dtype)


def test_the_engine_config_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="quantize must be one of none, int8, fp8"):
        EngineConfig(model="m", quantize="int4")


# ---- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("quant-adapters")
    return {f"unit{i}": make_peft_adapter(model, root / f"unit{i}", AdapterSpec(rank=2 + i % 3 * 3, alpha=8, seed=i))
            for i in range(8)}


def reference_model(tiny_llama_dir: Path) -> nn.Module:
    """The tiny model quantized as the engine quantizes it (its decoder linears and LM head)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    quantize_decoder(model, "int8")
    return model


def with_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """A copy of the quantized `model` whose quantized layers add the adapter's delta, computed here from the
    PEFT files: x @ A.T @ B.T * alpha / r (the reference, independent of lorax-lite's LoRA code)."""
    copied = copy.deepcopy(model)
    for name, module in copied.named_modules():
        delta = peft_delta(adapter_dir, name) if isinstance(module, QuantizedLinear) else None
        if delta is not None:
            a, b, scaling = delta
            module.register_forward_hook(lambda _m, args, out, a=a, b=b, s=scaling: out + args[0] @ a.T @ b.T * s)
    return copied


def greedy_reference(model: nn.Module, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt_ids):], logprobs


def peft_delta(adapter_dir: Path, module_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scaling) of one module of a PEFT adapter, read from its files; None when it does not target it."""
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = f"base_model.model.{module_name}.lora_A.weight"
    if key not in tensors:
        return None
    return tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float(), config["lora_alpha"] / config["r"]


def test_in_a_mixed_batch_of_eight_adapters_each_layer_adds_the_exact_delta_to_the_int8_base(tiny_llama_dir,
                                                                                              adapters):
    """Every LoRALinear's output in one prefill step of nine sequences (eight adapters and the base model) equals
    its int8 base layer's output on the same input plus each sequence's adapter delta computed from the PEFT
    files, within fp32 tolerance."""
    llm = LLM(str(tiny_llama_dir), quantize="int8", max_loras=8, max_lora_rank=8, **ENGINE)
    for adapter_id, path in adapters.items():
        llm.add_adapter(adapter_id, path)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, object]] = {}

    def capture(name):
        def hook(module, args, out):
            if name not in seen:  # the first step: the whole batch's prefill
                seen[name] = (args[0].detach().clone(), out.detach().clone(), current_mapping())
        return hook

    model = llm.engine.runner.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    handles = [m.register_forward_hook(capture(name)) for name, m in layers.items()]
    prompts = [f"The price of product {i} is" for i in range(9)]
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0), adapter_ids=[*adapters, None])
    for handle in handles:
        handle.remove()
    slot_ids = [key.split("#")[0] if key else None for key in llm.engine.adapter_manager.slot_keys]
    assert sorted(i for i in slot_ids if i) == sorted(adapters)
    for name, layer in layers.items():
        x, y, mapping = seen[name]
        rows = x.reshape(-1, layer.in_features)
        want = layer.base_layer(x).reshape(-1, layer.out_features).clone()
        assert mapping is not None and len(mapping.segments) == 8
        for slot, start, end in mapping.segments:
            delta = peft_delta(adapters[slot_ids[slot]], name)
            if delta is not None:
                a, b, scaling = delta
                want[start:end] += rows[start:end] @ a.T @ b.T * scaling
        torch.testing.assert_close(y.reshape(-1, layer.out_features), want, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_of_eight_adapters_on_the_int8_base_gives_the_reference_tokens(tiny_llama_dir, adapters):
    """End to end: the greedy tokens of each sequence equal a separate reference (the HF model quantized alike,
    with hooks adding each adapter's delta from the PEFT files, run one sequence at a time)."""
    llm = LLM(str(tiny_llama_dir), quantize="int8", max_loras=8, max_lora_rank=8, **ENGINE)
    for adapter_id, path in adapters.items():
        llm.add_adapter(adapter_id, path)
    tokenizer = llm.engine.tokenizer
    prompts = [f"The price of product {i} is" for i in range(9)]
    names = [*adapters, None]  # eight adapters and the base model, in one batch
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapter_ids=names)
    base = reference_model(tiny_llama_dir)
    for prompt, name, out in zip(prompts, names, outputs, strict=True):
        model = base if name is None else with_adapter(base, adapters[name])
        tokens, logprobs = greedy_reference(model, tokenizer(prompt).input_ids, 6)
        assert out.token_ids == tokens, name
        # The paged attention and the reference's differ in the last bits; an activation that close to an int8
        # rounding step may round the other way, which moves a logprob by up to ~1e-3 (the layer test above is exact)
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs), rtol=1e-2, atol=1e-2)


def test_the_engine_reports_its_quantization(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), quantize="int8", max_loras=0, **ENGINE)
    report = llm.engine.quantization
    assert report is not None and report.mode == "int8" and report.ratio <= 0.30
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4


# ---- the server --------------------------------------------------------------------------------------


def test_info_reports_the_quantization(tiny_llama_dir):
    from lorax_lite import AsyncLLM
    from lorax_lite.server import create_app
    from server_helpers import call

    llm = AsyncLLM(str(tiny_llama_dir), quantize="int8", **ENGINE)
    try:
        app = create_app(llm, "tiny")
        info = call(app, "GET", "/info").json()
        assert info["engine_config"]["quantize"] == "int8"
        quantization = info["quantization"]
        assert quantization["mode"] == "int8" and quantization["num_layers"] == 14 and quantization["lm_head"] == "int8"
        assert quantization["linear_weight_bytes"] <= 0.30 * quantization["linear_weight_bytes_unquantized"]
        response = call(app, "POST", "/generate", json={"inputs": "The price is", "parameters": {"max_new_tokens": 3}})
        assert response.status_code == 200
    finally:
        llm.shutdown()


def test_serve_takes_quantize_and_refuses_an_unknown_mode_before_loading_anything(tmp_path):
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "lorax_lite.cli", "serve", "--help"], capture_output=True,
                               text=True, env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    assert "--quantize" in help_text
    refused = subprocess.run([sys.executable, "-m", "lorax_lite.cli", "serve", "--quantize", "int4", "--model",
                              str(tmp_path / "missing")], capture_output=True, text=True)
    assert refused.returncode == 2 and "--quantize must be one of none, int8, fp8" in refused.stderr


# ---- the default model -----------------------------------------------------------------------------


def prefix_agreement(got: list[int], want: list[int]) -> float:
    """The share of `want`'s tokens that `got` repeats before the first divergence."""
    same = 0
    for x, y in zip(got, want, strict=False):
        if x != y:
            break
        same += 1
    return same / len(want)


@pytest.mark.slow
def test_default_model_int8_agrees_with_fp32_and_survives_preemption_and_chunked_prefill(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
               for question in ("What is the capital of France?", "Name three primary colours.",
                                "How many days are in a week?", "What does a supply chain do?",
                                "Give me a synonym for quick.", "What is 12 times 12?",
                                "Who wrote Romeo and Juliet?", "What is the boiling point of water?")]
    greedy = SamplingParams(max_tokens=32, temperature=0)
    fp32 = LLM(str(default_model_dir), dtype="float32", device="cpu", max_loras=0)
    want = [o.token_ids for o in fp32.generate(prompts, greedy)]
    del fp32
    int8 = LLM(str(default_model_dir), dtype="float32", device="cpu", quantize="int8", max_loras=0)
    got = [o.token_ids for o in int8.generate(prompts, greedy)]
    agreement = sum(prefix_agreement(g, w) for g, w in zip(got, want, strict=True)) / len(prompts)
    # Measured: 0.45 on these prompts (int8 activations are the main error of a 135M model; weight-only int8 gets
    # 0.73): the answers diverge after a few words but stay answers (docs/quantization.md has the 32-prompt figures)
    assert agreement >= 0.3, f"int8 agrees with fp32 on {agreement:.0%} of tokens (up to the first divergence)"
    del int8
    # A KV cache so small the engine preempts and recomputes, and prefills chunked: every request still finishes,
    # as close to fp32 as before. (Not token for token the unconstrained int8 run: a recomputed or chunked prefill
    # changes activations by fp32 rounding noise, and one that crosses an int8 rounding boundary changes a token.)
    tight = LLM(str(default_model_dir), dtype="float32", device="cpu", quantize="int8", max_loras=0, block_size=8,
                num_kv_blocks=24, max_num_batched_tokens=32)
    outputs = tight.generate(prompts, greedy)
    assert tight.engine.scheduler.num_preemptions > 0
    assert all(o.finish_reason in ("eos", "length") for o in outputs)
    squeezed = [o.token_ids for o in outputs]
    assert sum(prefix_agreement(s, w) for s, w in zip(squeezed, want, strict=True)) / len(prompts) >= 0.3
