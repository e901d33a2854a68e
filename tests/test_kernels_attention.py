"""Triton paged attention (lorax_lite/kernels/paged_attention.py) against a torch reference.

The reference gathers each sequence's keys by its block table and runs SDPA in float64 with an explicit causal
(and sliding window) mask. Every cache row a sequence does not own holds random values and block-table padding
points at other sequences' blocks, so a kernel that reads past a sequence's keys gets a wrong answer.
Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): shapes are
kept small. fp32 tolerance: atol = rtol = 1e-5 against float64; bf16/fp16: 2e-2.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F

T = TypeVar("T")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
HALF_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def kernels():  # imported lazily: conftest sets TRITON_INTERPRET before triton is first imported
    from lorax_lite.kernels import paged_attention

    return paged_attention


@dataclass
class PagedBatch:
    """Sequences laid out in a random paged cache: shuffled blocks, table padding pointing at foreign blocks."""

    k_cache: torch.Tensor  # [num_blocks * block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, NB] int32
    seq_lens: torch.Tensor  # [B] int32
    block_size: int

    def rows(self, b: int) -> torch.Tensor:
        """[L] cache rows of sequence b's tokens, in order."""
        pos = torch.arange(int(self.seq_lens[b]), device=self.k_cache.device)
        return self.block_tables[b].long()[pos // self.block_size] * self.block_size + pos % self.block_size


def make_batch(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               gen: torch.Generator) -> PagedBatch:
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    max_blocks = max(needed + [1]) + 1  # one more column of padding than any sequence needs
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    start = 0
    for b, n in enumerate(needed):
        tables[b, :n] = order[start:start + n].to(torch.int32)
        start += n
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2))
    return PagedBatch(k_cache, v_cache, tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                      block_size)


def pick(options: list[T], gen: torch.Generator) -> T:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def reference(q: torch.Tensor, batch: PagedBatch, q_starts: list[int], scale: float,
              window: int | None) -> torch.Tensor:
    """float64 attention; sequence b's queries are rows q_starts[b]:q_starts[b + 1], the last seq_lens[b] positions."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // batch.k_cache.shape[1]
    for b in range(len(q_starts) - 1):
        seq_len, lo, hi = int(batch.seq_lens[b]), q_starts[b], q_starts[b + 1]
        if seq_len == 0 or hi == lo:
            continue
        rows = batch.rows(b)
        k = batch.k_cache[rows].double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = batch.v_cache[rows].double().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        dist = q_pos[:, None] - torch.arange(seq_len, device=q.device)[None, :]
        mask = (dist >= 0) & (dist < window if window is not None else True)
        o = F.scaled_dot_product_attention(q[lo:hi].double().transpose(0, 1), k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1)
    return out


# (block_size, Hq, Hkv, head_dim, seq_lens, sliding_window)
DECODE_CASES = [
    (16, 4, 4, 32, [1, 16, 17, 40], None),
    (8, 4, 2, 64, [8, 0, 23, 64, 3], None),  # 0: a CUDA-graph padding row
    (32, 9, 3, 48, [33, 5, 96], 7),
    (16, 8, 1, 32, [70, 16, 2], 20),
    (8, 4, 2, 48, [30, 9], 100),  # window longer than the sequence
    (32, 4, 4, 64, [150, 0, 1], 40),  # the window starts mid-way through the key tiles
]


@pytest.mark.parametrize("num_splits", [1, 3])  # 3: split-K over the keys, some splits empty for short sequences
@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim, seq_lens, window", DECODE_CASES)
def test_decode_matches_reference(kernels, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                  seq_lens: list[int], window: int | None, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(sum(seq_lens) + head_dim)
    batch = make_batch(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, gen)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(DEVICE)
    scale = head_dim ** -0.5
    out = kernels.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                         block_size, scale, sliding_window=window, num_splits=num_splits)
    expected = reference(q, batch, list(range(len(seq_lens) + 1)), scale, window)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    padding = [b for b, n in enumerate(seq_lens) if n == 0]
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))


def test_decode_writes_into_out_and_reads_strided_q(kernels) -> None:
    gen = torch.Generator().manual_seed(1)
    batch = make_batch([20, 5], 8, 2, 32, torch.float32, gen)
    q = torch.randn(4, 2, 32, generator=gen).to(DEVICE).transpose(0, 1)  # [B=2, Hq=4, D], not contiguous
    out = torch.full_like(q, float("nan"))
    result = kernels.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                            8, 0.3, out=out)
    assert result is out
    torch.testing.assert_close(out.double(), reference(q, batch, [0, 1, 2], 0.3, None), **FP32_TOL)


# (block_size, Hq, Hkv, head_dim, [(context, q_len) per sequence], sliding_window)
PREFILL_CASES = [
    (16, 4, 4, 32, [(0, 37), (0, 16)], None),
    (8, 4, 2, 64, [(0, 5), (12, 1), (9, 17), (0, 8)], None),  # chunked prefill after a context; a decode row
    (32, 9, 3, 48, [(40, 30), (0, 1), (3, 12)], None),
    (16, 8, 1, 32, [(0, 45), (20, 13)], 9),
    (8, 4, 2, 48, [(5, 19), (0, 24)], 64),  # window longer than the sequence
    (16, 4, 4, 64, [(50, 40), (7, 1)], 24),  # query tiles whose first key tiles fall outside the window
    (32, 8, 2, 80, [(30, 21), (0, 9)], None),  # head_dim 80: the smaller fp32 tiles of wide heads
]


@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim, chunks, window", PREFILL_CASES)
def test_prefill_matches_reference(kernels, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                   chunks: list[tuple[int, int]], window: int | None) -> None:
    gen = torch.Generator().manual_seed(sum(c + n for c, n in chunks) + head_dim)
    q_lens = [n for _, n in chunks]
    batch = make_batch([c + n for c, n in chunks], block_size, num_kv_heads, head_dim, torch.float32, gen)
    q_starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    q = torch.randn(q_starts[-1], num_heads, head_dim, generator=gen).to(DEVICE)
    scale = head_dim ** -0.5
    query_start_loc = torch.tensor(q_starts, dtype=torch.int32, device=DEVICE)
    out = kernels.paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, query_start_loc,
                                          batch.seq_lens, block_size, scale, max(q_lens), sliding_window=window)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, batch, q_starts, scale, window), **FP32_TOL)


@pytest.mark.parametrize("seed, heads", [(0, (4, 2)), (1, (8, 1)), (2, (9, 3))])
def test_prefill_random_batches(kernels, seed: int, heads: tuple[int, int]) -> None:
    """Many sequences of random context and query lengths (some queries empty): query tiles straddle sequences."""
    gen = torch.Generator().manual_seed(100 + seed)
    (num_heads, num_kv_heads), block_size = heads, pick([8, 16, 32], gen)
    head_dim, window = pick([32, 48, 64], gen), pick([None, 5, 30], gen)
    num_seqs = int(torch.randint(6, 12, (1,), generator=gen))
    contexts = torch.randint(0, 40, (num_seqs,), generator=gen).tolist()
    q_lens = torch.randint(0, 3 if seed == 0 else 40, (num_seqs,), generator=gen).tolist()  # seed 0: short tiles
    batch = make_batch([c + n for c, n in zip(contexts, q_lens, strict=True)], block_size, num_kv_heads, head_dim,
                       torch.float32, gen)
    q_starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    q = torch.randn(q_starts[-1], num_heads, head_dim, generator=gen).to(DEVICE)
    query_start_loc = torch.tensor(q_starts, dtype=torch.int32, device=DEVICE)
    out = kernels.paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, query_start_loc,
                                          batch.seq_lens, block_size, 0.2, max(q_lens), sliding_window=window)
    torch.testing.assert_close(out.double(), reference(q, batch, q_starts, 0.2, window), **FP32_TOL)


def test_prefill_of_single_queries_equals_decode(kernels) -> None:
    gen = torch.Generator().manual_seed(2)
    batch = make_batch([9, 33, 1], 16, 2, 32, torch.float32, gen)
    q = torch.randn(3, 4, 32, generator=gen).to(DEVICE)
    query_start_loc = torch.arange(4, dtype=torch.int32, device=DEVICE)
    args = (batch.k_cache, batch.v_cache, batch.block_tables)
    decode = kernels.paged_decode_attention(q, *args, batch.seq_lens, 16, 0.2, sliding_window=10)
    for max_query_len in (1, 0, 50):  # only a hint for the tile size
        prefill = kernels.paged_prefill_attention(q, *args, query_start_loc, batch.seq_lens, 16, 0.2, max_query_len,
                                                  sliding_window=10)
        torch.testing.assert_close(prefill, decode, **FP32_TOL)


def test_store_kv_writes_exactly_the_given_rows(kernels) -> None:
    gen = torch.Generator().manual_seed(3)
    num_rows, num_kv_heads, head_dim = 64, 3, 48
    k_cache = torch.full((num_rows, num_kv_heads, head_dim), -7.0, device=DEVICE)
    v_cache = torch.full_like(k_cache, -9.0)
    kv_rows = torch.tensor([5, 17, -1, 40, 0, -1, 63], dtype=torch.int64, device=DEVICE)  # -1: padding, not written
    key = torch.randn(num_kv_heads, len(kv_rows), head_dim, generator=gen).to(DEVICE).transpose(0, 1)  # strided
    value = torch.randn(len(kv_rows), num_kv_heads, head_dim, generator=gen).to(DEVICE)
    kernels.store_kv(key, value, k_cache, v_cache, kv_rows.to(torch.int32))
    expected_k = torch.full_like(k_cache, -7.0)
    expected_v = torch.full_like(v_cache, -9.0)
    written = kv_rows >= 0
    expected_k[kv_rows[written]] = key[written]
    expected_v[kv_rows[written]] = value[written]
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_shape_errors_are_clear(kernels) -> None:
    batch = make_batch([4], 8, 2, 32, torch.float32, torch.Generator().manual_seed(4))
    q = torch.randn(1, 3, 32, device=DEVICE)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="not a multiple"):
        kernels.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 8, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        kernels.paged_decode_attention(q[:, :2], batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                       12, 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32 or int64, contiguous"):
        kernels.paged_decode_attention(q[:, :2], batch.k_cache, batch.v_cache, batch.block_tables.repeat(1, 2)[:, ::2],
                                       batch.seq_lens, 8, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(kernels, dtype: torch.dtype) -> None:  # on CPU, the interpreter's (bf16: upcast) dots
    gen = torch.Generator().manual_seed(5)
    chunks = [(0, 70), (100, 1), (33, 64)]
    batch = make_batch([c + n for c, n in chunks], 16, 2, 80, dtype, gen)
    q_starts = [0, 70, 71, 135]
    q = torch.randn(135, 8, 80, generator=gen).to(DEVICE, dtype)
    query_start_loc = torch.tensor(q_starts, dtype=torch.int32, device=DEVICE)
    out = kernels.paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, query_start_loc,
                                          batch.seq_lens, 16, 80 ** -0.5, 70, sliding_window=50)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, batch, q_starts, 80 ** -0.5, 50), **HALF_TOL)
    last = q[[69, 70, 134]]
    decode = kernels.paged_decode_attention(last, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                            16, 80 ** -0.5, sliding_window=50)
    torch.testing.assert_close(decode, out[[69, 70, 134]], **HALF_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("table_blocks", [8, 256])  # 256 blocks of 16: a long table, split-K on a GPU
def test_decode_replays_in_a_cuda_graph(kernels, table_blocks: int) -> None:
    gen = torch.Generator().manual_seed(6)
    batch = make_batch([40, 60, 2000], 16, 2, 64, torch.bfloat16, gen)
    padding = torch.randint(0, batch.k_cache.shape[0] // 16, (3, table_blocks), generator=gen, dtype=torch.int32)
    batch.block_tables = torch.cat([batch.block_tables.cpu(), padding], 1)[:, :table_blocks].contiguous().to(DEVICE)
    q = torch.randn(3, 8, 64, generator=gen).to(DEVICE, torch.bfloat16)
    seq_lens = batch.seq_lens.clone()
    out = torch.empty_like(q)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, 16, 0.125)
    kernels.paged_decode_attention(q, *args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.paged_decode_attention(q, *args, out=out)
    for lens in ([40, 60, 100], [7, 0, 10], [1, 55, 128]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        batch.seq_lens = seq_lens
        torch.testing.assert_close(out.double(), reference(q, batch, [0, 1, 2, 3], 0.125, None), **HALF_TOL)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton has no CUDA backend to compile with")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter never runs Triton's GPU compiler: compile for an H100/H200 here, no GPU needed."""
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning about its default changing
    result = subprocess.run([sys.executable, str(repo / "tests" / "compile_sm90.py")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
