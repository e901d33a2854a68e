"""LoRA ops and layers: the step's token->slot mapping, both delta backends against a naive reference, LoRALinear, injection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from lorax_lite.lora.layers import LoRALinear, LoRALayers, find_decoder_layers
from lorax_lite.lora.ops import GroupedMatmulBackend, LoRAMapping, SegmentBackend, lora_context, select_backend
from lorax_lite.lora.weights import LoRAWeights

CPU = torch.device("cpu")
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
BACKENDS = [GroupedMatmulBackend, SegmentBackend]


def random_slot_buffers(ranks: list[int], max_rank: int, d_in: int, d_out: int, seed: int = 0):
    """lora_a [S, R, in] and lora_b [S, R, out] (B transposed), each slot's rows past its rank zero."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(len(ranks), max_rank, d_in)
    lora_b = torch.zeros(len(ranks), max_rank, d_out)
    for slot, r in enumerate(ranks):
        lora_a[slot, :r] = torch.randn(r, d_in, generator=gen)
        lora_b[slot, :r] = torch.randn(r, d_out, generator=gen)
    return lora_a, lora_b


def reference_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: list[int | None]) -> torch.Tensor:
    """Per-token `x[t] @ A[slot].T @ B_T[slot]` in fp32; zero for base-model tokens."""
    delta = torch.zeros(x.shape[0], lora_b.shape[-1])
    for t, slot in enumerate(token_slots):
        if slot is not None:
            delta[t] = x[t].float() @ lora_a[slot].float().T @ lora_b[slot].float()
    return delta


def token_slots_of(seq_slots: list[int | None], seq_tokens: list[int]) -> list[int | None]:
    return [slot for slot, n in zip(seq_slots, seq_tokens) for _ in range(n)]


# ---- LoRAMapping.build ----------------------------------------------------------------------------


def test_mapping_refuses_an_all_base_batch():
    with pytest.raises(ValueError, match="at least one sequence needs an adapter"):  # the runner publishes None
        LoRAMapping.build([None, None], [3, 2], [4, 4, 4], CPU)


def test_mapping_of_one_slot_covers_all_its_tokens():
    m = LoRAMapping.build([1, 1], [2, 3], [4, 8, 2], CPU)
    assert m.num_lora_tokens == 5 and m.segments == [(1, 0, 5)] and m.max_rank == 8
    assert (m.first_slot, m.num_slots) == (1, 1)
    assert m.group_ends.tolist() == [5] and m.group_ends.dtype == torch.int32


def test_mapping_of_a_mixed_batch_skips_empty_slots_and_ignores_their_ranks():
    m = LoRAMapping.build([0, 2, 2, None], [1, 2, 3, 4], [2, 8, 4, 16], CPU)
    assert m.num_lora_tokens == 6
    assert m.segments == [(0, 0, 1), (2, 1, 6)]
    assert (m.first_slot, m.num_slots) == (0, 3)
    assert m.group_ends.tolist() == [1, 1, 6]  # slot 1 in between has no tokens
    assert m.max_rank == 4  # slots 1 and 3 (ranks 8, 16) have no tokens this step


def test_mapping_pads_even_groups_into_a_grid_and_leaves_uneven_ones_grouped():
    decode = LoRAMapping.build([1, 3, 3, None], [1, 1, 1, 1], [4, 4, 4, 4], CPU)  # one token per request
    assert (decode.first_slot, decode.num_slots, decode.pad_len) == (1, 3, 2)
    assert decode.pad_dest.tolist() == [0, 4, 5]  # slot 1 row 0; slot 3 rows 0 and 1 of a [3, 2] grid
    exact = LoRAMapping.build([0, 1], [2, 2], [4, 4], CPU)
    assert exact.pad_len == 2 and exact.pad_dest is None  # the grid is the batch itself
    prefill = LoRAMapping.build([0, 1, 2], [9, 1, 1], [4, 4, 4], CPU)  # a [3, 9] grid: over twice the 11 rows
    assert prefill.pad_len is None and prefill.pad_dest is None


@pytest.mark.parametrize("seq_slots", [[1, 0], [0, None, 1], [None, 0], [2, 2, 1]])
def test_mapping_refuses_sequences_out_of_slot_order(seq_slots):
    with pytest.raises(ValueError, match="slot order"):
        LoRAMapping.build(seq_slots, [1] * len(seq_slots), [4, 4, 4], CPU)


# ---- backends ------------------------------------------------------------------------------------

RANKS = [3, 0, 8, 5]  # slot 1 holds no adapter; ranks below the buffers' 8 are zero padded
LAYOUTS = {  # (seq_slots, seq_tokens)
    "uneven_with_base": ([0, 0, 2, 3, None, None], [6, 1, 1, 2, 2, 1]),
    "decode_with_gap": ([0, 2, 3, None], [1, 1, 1, 2]),
    "even_no_gap": ([2, 2, 3, None], [1, 1, 2, 1]),
    "one_slot_no_base": ([3], [5]),
}


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["as_built", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_per_token_reference(backend_cls, layout, path, dtype):
    seq_slots, seq_tokens = LAYOUTS[layout]
    lora_a, lora_b = random_slot_buffers(RANKS, 8, 16, 24)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(seq_tokens), 16, generator=gen).to(dtype)
    base = torch.randn(sum(seq_tokens), 24, generator=gen).to(dtype)
    mapping = LoRAMapping.build(seq_slots, seq_tokens, RANKS, CPU)
    if path == "grouped":
        mapping.pad_len = mapping.pad_dest = None  # as select_backend does: the non-padded path on every layout

    y = base.clone()
    backend_cls().add_delta(y, x, lora_a.to(dtype), lora_b.to(dtype), mapping)

    expected = base.float() + reference_delta(x, lora_a.to(dtype), lora_b.to(dtype), token_slots_of(seq_slots, seq_tokens))
    n = mapping.num_lora_tokens
    assert torch.equal(y[n:], base[n:]), "base-model tokens must get no delta"
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=0.25)


def test_select_backend_prefers_grouped_mm_on_cpu_fp32():
    expected = GroupedMatmulBackend if hasattr(F, "grouped_mm") else SegmentBackend
    assert type(select_backend(CPU, torch.float32)) is expected


# ---- LoRALinear ----------------------------------------------------------------------------------


def make_lora_linear(max_loras: int = 3, max_rank: int = 4, d_in: int = 16, d_out: int = 12) -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(d_in, d_out), max_loras, max_rank, SegmentBackend())


def random_pair(rank: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a [r, in], lora_b [out, r]) as an adapter stores them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)


def test_lora_linear_equals_base_layer_without_a_mapping():
    layer = make_lora_linear()
    layer.set_slot(0, random_pair(4, 16, 12, seed=0))
    x = torch.randn(1, 5, 16)
    expected = layer.base_layer(x)
    assert torch.equal(layer(x), expected)  # outside any lora_context
    with lora_context(None):
        assert torch.equal(layer(x), expected)


def test_lora_linear_adds_each_tokens_delta_inside_lora_context_only():
    layer = make_lora_linear()
    pairs = {0: random_pair(4, 16, 12, seed=1), 2: random_pair(2, 16, 12, seed=2)}
    for slot, pair in pairs.items():
        layer.set_slot(slot, pair)
    seq_slots, seq_tokens = [0, 2, None], [2, 1, 2]
    x = torch.randn(1, 5, 16)
    base = layer.base_layer(x)[0]
    with lora_context(LoRAMapping.build(seq_slots, seq_tokens, [4, 0, 2], CPU)):
        y = layer(x)[0]
    expected = base + reference_delta(x[0], layer.lora_a, layer.lora_b, token_slots_of(seq_slots, seq_tokens))
    torch.testing.assert_close(y, expected)
    assert torch.equal(layer(x), layer.base_layer(x)), "the mapping must not outlive its context"


def test_set_slot_zero_pads_the_rank_and_none_clears():
    layer = make_lora_linear(max_rank=4)
    a, b = random_pair(2, 16, 12, seed=5)
    layer.set_slot(1, (a, b))
    assert torch.equal(layer.lora_a[1, :2], a) and torch.equal(layer.lora_b[1, :2], b.T)
    assert not layer.lora_a[1, 2:].any() and not layer.lora_b[1, 2:].any()
    assert not layer.lora_a[[0, 2]].any() and not layer.lora_b[[0, 2]].any(), "other slots untouched"
    layer.set_slot(1, random_pair(4, 16, 12, seed=6))
    layer.set_slot(1, (a, b))  # a smaller rank after a larger one leaves no stale rows
    assert not layer.lora_a[1, 2:].any() and not layer.lora_b[1, 2:].any()
    layer.set_slot(1, None)
    assert not layer.lora_a.any() and not layer.lora_b.any()


# ---- LoRALayers.inject on real (tiny) models ------------------------------------------------------

MODEL_DIRS = ["tiny_llama_dir", "tiny_qwen2_dir"]


@pytest.fixture(params=MODEL_DIRS)
def model_dir(request) -> Path:
    return request.getfixturevalue(request.param)


def test_inject_wraps_exactly_the_seven_projections_of_each_decoder_layer(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    num_layers = model.config.num_hidden_layers
    slots = LoRALayers.inject(model, max_loras=2, max_lora_rank=4)
    expected = {f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}"
                for i in range(num_layers) for p in PROJECTIONS}
    assert set(slots.layers) == expected
    assert slots.supported_modules == PROJECTIONS
    modules = dict(model.named_modules())
    for name, layer in slots.layers.items():
        assert modules[name] is layer and isinstance(layer, LoRALinear)
        assert slots.targets[name] == (layer.base_layer.in_features, layer.base_layer.out_features)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert find_decoder_layers(model) is model.model.layers


def test_loading_and_clearing_slots_never_changes_the_module_tree(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    slots = LoRALayers.inject(model, max_loras=2, max_lora_rank=4)
    names = [name for name, _ in model.named_modules()]
    modules = {name: random_pair(3, d_in, d_out, seed=i) for i, (name, (d_in, d_out)) in enumerate(slots.targets.items())}
    slots.load(1, LoRAWeights(rank=3, alpha=3.0, use_rslora=False, target_modules=PROJECTIONS, modules=modules))
    assert slots.slot_ranks == [0, 3]
    assert [name for name, _ in model.named_modules()] == names
    slots.clear(1)
    assert slots.slot_ranks == [0, 0]
    assert [name for name, _ in model.named_modules()] == names
    assert all(not layer.lora_a.any() and not layer.lora_b.any() for layer in slots.layers.values())


def test_injection_leaves_the_models_output_unchanged_without_a_mapping(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        before = model(input_ids).logits
        slots = LoRALayers.inject(model, max_loras=2, max_lora_rank=4)
        slots.load(0, LoRAWeights(4, 4.0, False, PROJECTIONS, {
            name: random_pair(4, d_in, d_out, seed=i) for i, (name, (d_in, d_out)) in enumerate(slots.targets.items())
        }))
        after = model(input_ids).logits
    assert torch.equal(before, after)
