"""Linear layers prepacked for oneDNN (lorax_lite/packed.py): the same results as F.linear up to fp32 rounding,
independent of the batch around a row, every decoder linear and the LM head packed, and the engine's choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorax_lite import LLM, SamplingParams
from lorax_lite.lora.layers import LoRALinear, find_decoder_layers
from lorax_lite.packed import PackedLinear, onednn_available, pack_linears, resolve_linear_backend

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN (mkldnn)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_a_packed_linear_computes_f_linear(bias: bool, rows: int):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    packed = PackedLinear(linear)
    assert torch.allclose(packed(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed(x.view(1, rows, 96)), expected.view(1, rows, 160), rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(576, 1536))
    batch = torch.randn(32, 576)
    alone = torch.cat([packed(batch[i:i + 1]) for i in range(32)])
    assert torch.equal(packed(batch), alone)


def test_backend_choice_and_refusals():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_linear_backend("auto", cpu, torch.float32, "none") == "onednn"
    assert resolve_linear_backend("auto", cpu, torch.bfloat16, "none") == "torch"
    assert resolve_linear_backend("auto", cpu, torch.float32, "int8") == "torch"
    assert resolve_linear_backend("auto", cuda, torch.float32, "none") == "torch"
    assert resolve_linear_backend("torch", cpu, torch.float32, "none") == "torch"
    for device, dtype, quantize in ((cuda, torch.float32, "none"), (cpu, torch.bfloat16, "none"),
                                    (cpu, torch.float32, "int8")):
        with pytest.raises(ValueError, match="linear_backend onednn needs"):
            resolve_linear_backend("onednn", device, dtype, quantize)
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        resolve_linear_backend("mkl", cpu, torch.float32, "none")


def test_the_engine_packs_every_decoder_linear_and_the_head_and_keeps_its_outputs(tiny_llama_dir: Path):
    prompts = ["The quick brown fox", "Hello there, how are", "1 2 3 4 5 6"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "onednn"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", linear_backend=backend, max_loras=2)
        model = llm.engine.runner.model
        kinds = {type(m.base_layer) for m in find_decoder_layers(model).modules() if isinstance(m, LoRALinear)}
        assert kinds == ({PackedLinear} if backend == "onednn" else {nn.Linear})
        assert (type(model.get_output_embeddings()) is PackedLinear) == (backend == "onednn")
        assert type(model.get_input_embeddings()) is nn.Embedding  # the tied embedding stays a plain lookup
        outputs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outputs["onednn"] == outputs["torch"]


def test_pack_linears_without_the_head(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    count = sum(1 for m in find_decoder_layers(model).modules() if type(m) is nn.Linear)
    assert pack_linears(model, head=False) == count
    assert type(model.get_output_embeddings()) is nn.Linear
    assert not any(type(m) is nn.Linear for m in find_decoder_layers(model).modules())


def test_row_counts_are_padded_to_a_few_buckets():
    from lorax_lite.packed import padded_rows

    assert [padded_rows(n) for n in (1, 7, 8, 9, 16, 17, 64, 65, 512, 513, 700)] == \
        [1, 7, 8, 16, 16, 32, 64, 128, 512, 768, 768]
    assert len({padded_rows(n) for n in range(1, 4097)}) <= 40  # oneDNN compiles one kernel per shape: bounded
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    packed = PackedLinear(linear)
    for rows in (3, 9, 70):
        x = torch.randn(1, rows, 64)
        assert packed(x).shape == (1, rows, 48)
        assert torch.allclose(packed(x), nn.functional.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
