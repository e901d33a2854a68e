"""Triton multi-LoRA kernels (lorax_lite/kernels/lora.py) and TritonLoRABackend against torch references.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: fp32 atol = rtol = 1e-5 (the weights are scaled so deltas are O(1); only the summation order differs
from torch); fp16 atol = rtol = 1e-2, bf16 (CUDA only: the interpreter's tl.dot multiplies bf16's raw bits)
atol = rtol = 5e-2. Rows that get no delta must be bit-identical.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import AdapterSpec, make_peft_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.loader import AdapterReader
from lorax_lite.lora.ops import (
    LORA_BACKENDS,
    GroupedMatmulBackend,
    LoRAKernelMeta,
    LoRAMapping,
    SegmentBackend,
    TritonLoRABackend,
    lora_context,
    select_backend,
)

pytest.importorskip("triton")
kernels = pytest.importorskip("lorax_lite.kernels.lora")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]


def slot_buffers(ranks: list[int], max_rank: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 0):
    """lora_a [S, R, in] and lora_b [S, R, out] on DEVICE, rows past each slot's rank zero; deltas are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(len(ranks), max_rank, d_in)
    lora_b = torch.zeros(len(ranks), max_rank, d_out)
    for slot, r in enumerate(ranks):
        lora_a[slot, :r] = torch.randn(r, d_in, generator=gen) / d_in**0.5
        lora_b[slot, :r] = torch.randn(r, d_out, generator=gen) / max(r, 1) ** 0.5
    return lora_a.to(DEVICE, dtype), lora_b.to(DEVICE, dtype)


def rows(num: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(num, width, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def reference_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
    """[T, R] fp32: x[t] @ A[slot].T; NaN rows for tokens without a slot (the kernels must not write them)."""
    out = torch.full((x.shape[0], lora_a.shape[1]), float("nan"), device=x.device)
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            out[t] = x[t].double() @ lora_a[slot].double().T
    return out


def reference_y(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
    """y + shrunk[t] @ B[slot] per token with a slot, in fp64, cast back to y's dtype."""
    out = y.double().clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            out[t] += shrunk[t].to(lora_b.dtype).double() @ lora_b[slot].double()
    return out.to(y.dtype)


def assert_rows(actual: torch.Tensor, expected: torch.Tensor, token_slots: list[int], dtype: torch.dtype) -> None:
    """Rows with a slot match within the dtype's tolerance; rows without one are bit-identical (NaN included)."""
    with_slot = torch.tensor([s >= 0 for s in token_slots], device=actual.device)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual[with_slot].float(), expected[with_slot].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(actual[~with_slot], expected[~with_slot], atol=0, rtol=0, equal_nan=True)


def segments_of(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, start, end) of each run of consecutive tokens with one slot (-1 runs left out)."""
    segments, start = [], 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            if token_slots[start] >= 0:
                segments.append((token_slots[start], start, t))
            start = t
    return segments


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ---- the kernels --------------------------------------------------------------------------------

KERNEL_CASES = {  # (slot ranks, max_lora_rank, d_in, d_out, token slots); -1: base model
    "prefill_with_gap_and_base": ([4, 0, 16, 8], 16, 96, 200, [0] * 5 + [2] * 23 + [3] * 40 + [-1] * 3),
    "rank_zero_slot_with_tokens": ([8, 0, 4], 16, 48, 96, [0] * 3 + [1] * 7 + [2] * 2 + [-1]),
    "decode_unsorted": ([4, 16, 0, 8], 16, 64, 48, [3, 1, -1, 0, 1, 3, 3, -1, 0, 1, 1, 0, 3, 1, 0, 3, 1, 3, -1]),
    "two_rank_tiles": ([40, 8, 24], 40, 48, 96, [0] * 17 + [1] * 2 + [2] * 9),  # ranks past one 32-wide tile
}


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_matches_reference_and_touches_only_segment_rows(case, dtype):
    ranks, max_rank, d_in, d_out, token_slots = KERNEL_CASES[case]
    token_slots = sorted(token_slots, key=lambda s: (s < 0, s))  # SGMV: consecutive tokens of a slot
    lora_a, lora_b = slot_buffers(ranks, max_rank, d_in, d_out, dtype)
    x, y = rows(len(token_slots), d_in, dtype, seed=1), rows(len(token_slots), d_out, dtype, seed=2)
    segments = segments_of(token_slots)
    seg_slots, seg_starts, seg_ends = (int32(list(column)) for column in zip(*segments, strict=True))
    longest = max(end - start for _, start, end in segments)

    shrunk = torch.full((len(token_slots), max_rank), float("nan"), device=DEVICE)
    kernels.sgmv_shrink(x, lora_a, seg_slots, seg_starts, seg_ends, int32(ranks), shrunk, max_seg_len=longest)
    assert_rows(shrunk, reference_shrink(x, lora_a, token_slots), token_slots, dtype)
    expected = reference_y(y, shrunk, lora_b, token_slots)
    kernels.sgmv_expand(shrunk, lora_b, seg_slots, seg_starts, seg_ends, int32(ranks), y)  # grid sized by T
    assert y.dtype == dtype
    assert_rows(y, expected, token_slots, dtype)


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bgmv_matches_reference_and_leaves_base_rows(case, dtype):
    ranks, max_rank, d_in, d_out, token_slots = KERNEL_CASES[case]
    lora_a, lora_b = slot_buffers(ranks, max_rank, d_in, d_out, dtype)
    x, y = rows(len(token_slots), d_in, dtype, seed=3), rows(len(token_slots), d_out, dtype, seed=4)

    shrunk = torch.full((len(token_slots), max_rank), float("nan"), device=DEVICE)
    kernels.bgmv_shrink(x, lora_a, int32(token_slots), int32(ranks), shrunk)
    assert_rows(shrunk, reference_shrink(x, lora_a, token_slots), token_slots, dtype)
    expected = reference_y(y, shrunk, lora_b, token_slots)
    kernels.bgmv_expand(shrunk, lora_b, int32(token_slots), int32(ranks), y)
    assert y.dtype == dtype
    assert_rows(y, expected, token_slots, dtype)


def test_shrink_writes_zeros_past_each_slots_rank():
    ranks, token_slots = [40, 8, 24], [0, 0, 1, 1, 1, 2]
    lora_a, _ = slot_buffers(ranks, 40, 48, 16, torch.float32)
    lora_a[1, 8:] = 1.0  # garbage past slot 1's rank: the kernels must not read it
    x = rows(len(token_slots), 48, torch.float32, seed=5)
    shrunk = torch.full((len(token_slots), 40), float("nan"), device=DEVICE)
    kernels.bgmv_shrink(x, lora_a, int32(token_slots), int32(ranks), shrunk)
    assert not shrunk.isnan().any()
    assert (shrunk[2:5, 8:] == 0).all() and (shrunk[5, 24:] == 0).all()
    assert (shrunk[2:5, :8] != 0).all()


def test_kernels_refuse_mismatched_shapes():
    lora_a, lora_b = slot_buffers([4], 16, 32, 48, torch.float32)
    x, y = rows(3, 32, torch.float32, 0), rows(3, 48, torch.float32, 0)
    out = torch.zeros(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one slot per row"):
        kernels.bgmv_shrink(x, lora_a, int32([0, 0]), int32([4]), out)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.bgmv_expand(out, lora_a, int32([0, 0, 0]), int32([4]), y)  # lora_a's width is not y's
    with pytest.raises(ValueError, match="do not fit"):
        kernels.sgmv_shrink(x.half(), lora_a, int32([0]), int32([0]), int32([3]), int32([4]), out)


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorax_lite.kernels import lora

BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 16, "BLOCK_K": 64}
for dtype in ("fp32", "bf16"):
    pointers = {"x_ptr": dtype, "a_ptr": dtype, "b_ptr": dtype, "y_ptr": dtype, "s_ptr": "fp32", "out_ptr": "fp32"}
    for kernel in (lora._sgmv_shrink_kernel, lora._sgmv_expand_kernel, lora._bgmv_shrink_kernel,
                   lora._bgmv_expand_kernel):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in BLOCKS else "*" + pointers.get(n, "i32") if n.endswith("_ptr") else "i32"
                     for n in names}
        constexprs = {(names.index(n),): BLOCKS[n] for n in names if n in BLOCKS}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, kernel
print("compiled")
"""


def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile every kernel for sm_90 (fp32 and bf16), which
    needs no GPU, to catch what only the compiler refuses (types, control flow)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---- LoRAMapping's kernel metadata --------------------------------------------------------------


def test_mapping_builds_kernel_meta_only_when_asked():
    m = LoRAMapping.build([0, 2, None], [3, 1, 2], [4, 8, 16], DEVICE)
    assert m.kernel is None and not m.decode


def test_kernel_meta_of_a_mixed_batch_with_padding_rows():
    m = LoRAMapping.build([0, 0, 2, None], [3, 1, 2, 2], [4, 0, 16, 8], DEVICE, kernel_meta=True, num_tokens=10)
    k = m.kernel
    assert k.token_slots.tolist() == [0, 0, 0, 0, 2, 2, -1, -1, -1, -1]
    assert k.slot_ranks.tolist() == [4, 0, 16, 8]
    assert (k.seg_slots.tolist(), k.seg_starts.tolist(), k.seg_ends.tolist()) == ([0, 2], [0, 4], [4, 6])
    assert k.max_segment_len == 4 and not m.decode
    views = [k.token_slots, k.slot_ranks, k.seg_slots, k.seg_starts, k.seg_ends]
    assert all(v.dtype == torch.int32 and v.device.type == DEVICE.type for v in views)
    storage = k.token_slots.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == storage for v in views), "one copy to the device, then views"


def test_kernel_meta_of_a_decode_step():
    m = LoRAMapping.build([1, 3, 3, None], [1, 1, 1, 1], [4, 4, 4, 4], DEVICE, kernel_meta=True)
    assert m.decode and m.kernel.token_slots.tolist() == [1, 3, 3, -1]
    assert m.kernel.seg_slots.tolist() == [1, 3] and m.kernel.max_segment_len == 2
    padded = LoRAMapping.build([1, None], [1, 1], [4, 4], DEVICE, kernel_meta=True, num_tokens=4)
    assert padded.decode and padded.kernel.token_slots.tolist() == [1, -1, -1, -1]


def test_kernel_meta_of_rows_without_adapters():
    k = LoRAKernelMeta.build(torch.full((4,), -1, dtype=torch.int32), [4, 8], [], DEVICE)
    assert k.token_slots.tolist() == [-1] * 4 and k.slot_ranks.tolist() == [4, 8]
    assert k.seg_slots.numel() == k.seg_starts.numel() == k.seg_ends.numel() == k.max_segment_len == 0


def test_kernel_meta_refuses_fewer_rows_than_tokens():
    with pytest.raises(ValueError, match="num_tokens 2 is less than the sequences' 3 tokens"):
        LoRAMapping.build([0, 1], [2, 1], [4, 4], DEVICE, kernel_meta=True, num_tokens=2)


# ---- TritonLoRABackend against the torch backends -----------------------------------------------


def random_layout(rng: random.Random, num_slots: int, kind: str) -> tuple[list[int | None], list[int]]:
    """Sequences in the runner's order (by slot, then base ones), some slots skipped. kind: "prefill" (1-40 tokens
    each), "decode" (1 token each, up to 8 sequences per slot) or "mixed" (half of them 1 token)."""
    used = sorted(rng.sample(range(num_slots), rng.randint(1, num_slots - 1)))
    per_slot = 8 if kind == "decode" else 3
    seq_slots: list[int | None] = [s for s in used for _ in range(rng.randint(1, per_slot))]
    seq_slots += [None] * rng.randint(0, 3)
    one = {"prefill": 0.0, "decode": 1.0, "mixed": 0.5}[kind]
    return seq_slots, [1 if rng.random() < one else rng.randint(2, 40) for _ in seq_slots]


LAYOUTS = [(kind, seed) for seed in range(3) for kind in ("prefill", "decode", "mixed")]
SIZES = [(48, 96), (96, 200), (64, 48)]


def torch_backends(dtype: torch.dtype) -> list:
    backends = [SegmentBackend()]
    try:
        backends.append(select_backend(DEVICE, dtype, "grouped"))
    except ValueError:
        pass  # no grouped_mm for this device and dtype
    return backends


@pytest.mark.parametrize(("kind", "seed"), LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_matches_torch_backends(kind, seed, dtype):
    rng = random.Random(seed)
    ranks = [4, 0, 8, 16, 4, 0]  # max_lora_rank 16; slots 1 and 5 hold no adapter
    d_in, d_out = SIZES[seed]
    seq_slots, seq_tokens = random_layout(rng, len(ranks), kind)
    padding = rng.randint(1, 5) if kind == "decode" else 0  # rows past the batch, as in a CUDA graph's
    num_rows = sum(seq_tokens) + padding
    mapping = LoRAMapping.build(seq_slots, seq_tokens, ranks, DEVICE, kernel_meta=True, num_tokens=num_rows)
    assert mapping.decode == (kind == "decode" or set(seq_tokens) == {1})
    lora_a, lora_b = slot_buffers(ranks, 16, d_in, d_out, dtype, seed=seed)
    x, base = rows(num_rows, d_in, dtype, seed=10 + seed), rows(num_rows, d_out, dtype, seed=20 + seed)

    y = base.clone()
    TritonLoRABackend().add_delta(y, x, lora_a, lora_b, mapping)
    n = mapping.num_lora_tokens
    assert torch.equal(y[n:], base[n:]), "base-model and padding rows must get no delta"
    for backend in torch_backends(dtype):
        expected = base.clone()
        backend.add_delta(expected, x, lora_a, lora_b, mapping)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(y, expected, atol=tol, rtol=tol, msg=lambda m, b=backend: f"{type(b).__name__}: {m}")


@pytest.mark.parametrize("capture", [False, pytest.param(True, marks=pytest.mark.cuda)])
def test_decode_delta_with_static_mapping_tensors_as_a_cuda_graph_replays_it(capture):
    """The BGMV path reads only the kernel metadata's tensors: a graph captured with one decode mapping of B padded
    rows gives each later step's delta after its token slots are copied into the captured ones."""
    ranks, num_rows = [4, 0, 8, 16], 20
    lora_a, lora_b = slot_buffers(ranks, 16, 64, 96, torch.float32)
    static = LoRAMapping.build([0, 2, None], [1, 1, 1], ranks, DEVICE, kernel_meta=True, num_tokens=num_rows)
    x, y = rows(num_rows, 64, torch.float32, seed=0), torch.zeros(num_rows, 96, device=DEVICE)
    backend = TritonLoRABackend()

    def delta() -> None:
        y.zero_()
        backend.add_delta(y, x, lora_a, lora_b, static)

    delta()  # compiles the kernels (before any capture)
    replay = delta
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            delta()
        replay = graph.replay
    steps = [[0, 3, 3, None], [0, 1, 2, 3, 3, 3] + [None] * 9, [None] * 5]  # each step's sequences, 1 token each
    for seed, seq_slots in enumerate(steps):
        x.copy_(rows(num_rows, 64, torch.float32, seed=seed + 1))
        expected = torch.zeros_like(y)
        if any(s is not None for s in seq_slots):
            step = LoRAMapping.build(seq_slots, [1] * len(seq_slots), ranks, DEVICE, kernel_meta=True,
                                     num_tokens=num_rows)
            static.kernel.token_slots.copy_(step.kernel.token_slots)
            SegmentBackend().add_delta(expected, x, lora_a, lora_b, step)
        else:  # no adapter this step: the runner publishes no mapping, or every row's slot is -1
            static.kernel.token_slots.fill_(-1)
        replay()
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_triton_backend_needs_kernel_meta():
    lora_a, lora_b = slot_buffers([4], 16, 16, 16, torch.float32)
    mapping = LoRAMapping.build([0], [2], [4], DEVICE)
    assert TritonLoRABackend.needs_kernel_meta and not SegmentBackend.needs_kernel_meta
    assert not GroupedMatmulBackend.needs_kernel_meta
    with pytest.raises(RuntimeError, match="kernel_meta=True"):
        TritonLoRABackend().add_delta(rows(2, 16, torch.float32, 0), rows(2, 16, torch.float32, 0), lora_a, lora_b,
                                      mapping)


# ---- select_backend -----------------------------------------------------------------------------


def test_select_backend_by_name():
    assert LORA_BACKENDS == ("auto", "grouped", "segment", "triton")
    assert type(select_backend(DEVICE, torch.float32, "triton")) is TritonLoRABackend
    assert type(select_backend(DEVICE, torch.float32, "segment")) is SegmentBackend
    auto = select_backend(DEVICE, torch.float32)
    if DEVICE.type == "cuda":
        assert type(auto) is TritonLoRABackend
    else:  # the interpreter is for tests: auto keeps the torch backends on the CPU
        assert type(auto) in (GroupedMatmulBackend, SegmentBackend)
    with pytest.raises(ValueError, match="unknown LoRA backend 'cutlass'; choose one of auto, grouped, segment"):
        select_backend(DEVICE, torch.float32, "cutlass")


def test_select_backend_says_why_triton_cannot_run_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="lora_backend triton needs Triton: Triton kernels need a CUDA device"):
        select_backend(torch.device("cpu"), torch.float32, "triton")


def test_select_backend_says_why_grouped_cannot_run(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    with pytest.raises(ValueError, match="lora_backend grouped cannot run here: torch .* has no .*grouped_mm"):
        select_backend(torch.device("cpu"), torch.float32, "grouped")
    assert type(select_backend(torch.device("cpu"), torch.float32)) is SegmentBackend


# ---- PEFT identity through LoRALayers.inject(backend="triton") -----------------------------------

SPECS = {0: AdapterSpec(rank=4, alpha=8, seed=1), 2: AdapterSpec(rank=16, alpha=16, seed=2),
         3: AdapterSpec(rank=8, alpha=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=3)}
ROW_SLOTS = [0, 2, 2, 3, None]  # batch rows in the runner's order: by slot (slot 1 empty), base last


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[int, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("triton-adapters")
    return {slot: make_peft_adapter(model, out / f"slot{slot}", spec) for slot, spec in SPECS.items()}


def peft_logits(model_dir: Path, adapter_dir: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids).logits[0]


@pytest.mark.parametrize("seq_len", [1, 7])  # 1: a decode-shaped step (BGMV); 7: prefill (SGMV)
def test_injected_triton_backend_matches_peft(tiny_llama_dir, adapter_dirs, seq_len):
    input_ids = torch.randint(3, 320, (len(ROW_SLOTS), seq_len), generator=torch.Generator().manual_seed(seq_len))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(DEVICE).eval()
    layers = LoRALayers.inject(model, max_loras=4, max_lora_rank=16, backend="triton")
    assert type(layers.backend) is TritonLoRABackend
    reader = AdapterReader(layers.targets, max_lora_rank=16, dtype=torch.float32)
    for slot, path in adapter_dirs.items():
        layers.load(slot, reader.read_dir(path))
    mapping = LoRAMapping.build(ROW_SLOTS, [seq_len] * len(ROW_SLOTS), layers.slot_ranks, DEVICE, kernel_meta=True)
    assert mapping.decode == (seq_len == 1)
    with torch.no_grad(), lora_context(mapping):
        logits = model(input_ids.to(DEVICE)).logits.cpu()  # each row is its own sequence: [rows, seq_len, vocab]
    for row, slot in enumerate(ROW_SLOTS):
        base = peft_logits(tiny_llama_dir, None, input_ids[row : row + 1])
        expected = base if slot is None else peft_logits(tiny_llama_dir, adapter_dirs[slot], input_ids[row : row + 1])
        assert slot is None or (expected - base).abs().max() > 0.1, "guard: the adapter changes the logits"
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4, msg=lambda m, r=row: f"row {r}: {m}")
        assert torch.equal(logits[row].argmax(-1), expected.argmax(-1))
