# mypy: disable-error-code="no-untyped-def"
# (the @triton.jit functions take untyped pointers, ints and tl.constexpr tile sizes)
"""Multi-LoRA shrink/expand kernels: `out = x @ A[slot].T` then `y += out @ B[slot]`, each token with its own slot.

Two ways to find a program's tokens and slot:

- SGMV (prefill and mixed steps): the step's tokens come in segments of consecutive tokens that share a slot.
  The grid is (segment, token tile, output tile); a program whose tile starts past its segment's end returns.
  Its grid depends on the number of segments, a host value that changes every step.
- BGMV (decode steps): every row of x has a slot in `token_slots` (-1: base model, no delta). The grid is
  (token tile, output tile); a program goes over the slots in its tile, from the lowest to the highest, and
  computes each one's rows (the others masked). The runner orders tokens by slot, so a tile holds few slots.
  The grid and the arguments depend only on tensor shapes, and the kernels read only device tensors, so a CUDA
  graph can capture them.

Each slot's rank (`slot_ranks[slot]`) bounds the work: the buffers are zero past the rank, so a rank tile past it
only stores zeros (shrink), and the expand loop over the rank stops there. Tiles are at least 16 wide in every
dimension of `tl.dot`; the products accumulate in fp32 ("ieee": no TF32 for fp32 inputs, so fp32 results match
torch). `shrunk` is fp32; expand rounds it to B's dtype for the dot, as torch's matmul chain does, and adds to
y in fp32 before storing in y's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_tile(x_ptr, a_ptr, out_ptr, rows, row_mask, slot, rank, r0, K, R,
                 stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[rows, r0:r0+BLOCK_R] = x[rows] @ A[slot, r0:r0+BLOCK_R].T; zeros past the rank without reading anything
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < rank
    rows64 = rows.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    a_ptrs = a_ptr + tl.cast(slot, tl.int64) * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    # a_ptrs: [BLOCK_K, BLOCK_R], a tile of A[slot].T
    k_end = tl.where(r0 < rank, K, 0)  # a tile past the rank: no loop, zeros stored
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    out_ptrs = out_ptr + rows64[:, None] * stride_ot + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _expand_tile(s_ptr, b_ptr, y_ptr, rows, row_mask, slot, rank, n0, N,
                 stride_st, stride_sr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # y[rows, n0:n0+BLOCK_N] += shrunk[rows, :rank] @ B[slot, :rank, n0:n0+BLOCK_N]
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows64 = rows.to(tl.int64)
    s_ptrs = s_ptr + rows64[:, None] * stride_st + offs_r[None, :] * stride_sr  # [BLOCK_M, BLOCK_R]
    b_ptrs = b_ptr + tl.cast(slot, tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = offs_r < rank - r0
        s = tl.load(s_ptrs, mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(s.to(b.dtype), b, acc, input_precision="ieee")
        s_ptrs += BLOCK_R * stride_sr
        b_ptrs += BLOCK_R * stride_br
    y_ptrs = y_ptr + rows64[:, None] * stride_yt + offs_n[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, out_ptr, seg_slots_ptr, seg_starts_ptr, seg_ends_ptr, slot_ranks_ptr, K, R,
                        stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    end = tl.load(seg_ends_ptr + seg)
    row0 = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    if row0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.minimum(tl.load(slot_ranks_ptr + slot), R)
    rows = row0 + tl.arange(0, BLOCK_M)
    _shrink_tile(x_ptr, a_ptr, out_ptr, rows, rows < end, slot, rank, tl.program_id(2) * BLOCK_R, K, R,
                 stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
                 BLOCK_M, BLOCK_R, BLOCK_K)


@triton.jit
def _sgmv_expand_kernel(s_ptr, b_ptr, y_ptr, seg_slots_ptr, seg_starts_ptr, seg_ends_ptr, slot_ranks_ptr, N, R,
                        stride_st, stride_sr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    end = tl.load(seg_ends_ptr + seg)
    row0 = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    if row0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.minimum(tl.load(slot_ranks_ptr + slot), R)
    rows = row0 + tl.arange(0, BLOCK_M)
    _expand_tile(s_ptr, b_ptr, y_ptr, rows, rows < end, slot, rank, tl.program_id(2) * BLOCK_N, N,
                 stride_st, stride_sr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
                 BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _tile_slot_range(token_slots_ptr, rows, T, S):
    # the tile's token slots, and the range [first, last] of the valid ones (empty when the tile has none)
    slots = tl.load(token_slots_ptr + rows, mask=rows < T, other=-1)
    valid = (slots >= 0) & (slots < S)
    first = tl.min(tl.where(valid, slots, S), axis=0)
    last = tl.max(tl.where(valid, slots, -1), axis=0)
    return slots, first, last


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, out_ptr, token_slots_ptr, slot_ranks_ptr, T, K, S, R,
                        stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots, first, last = _tile_slot_range(token_slots_ptr, rows, T, S)
    for slot in range(first, last + 1):  # sorted tokens: the few slots of this tile
        row_mask = slots == slot
        if tl.max(row_mask.to(tl.int32), axis=0) > 0:
            rank = tl.minimum(tl.load(slot_ranks_ptr + slot), R)
            _shrink_tile(x_ptr, a_ptr, out_ptr, rows, row_mask, slot, rank, tl.program_id(1) * BLOCK_R, K, R,
                         stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
                         BLOCK_M, BLOCK_R, BLOCK_K)


@triton.jit
def _bgmv_expand_kernel(s_ptr, b_ptr, y_ptr, token_slots_ptr, slot_ranks_ptr, T, N, S, R,
                        stride_st, stride_sr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots, first, last = _tile_slot_range(token_slots_ptr, rows, T, S)
    for slot in range(first, last + 1):
        row_mask = slots == slot
        if tl.max(row_mask.to(tl.int32), axis=0) > 0:
            rank = tl.minimum(tl.load(slot_ranks_ptr + slot), R)
            _expand_tile(s_ptr, b_ptr, y_ptr, rows, row_mask, slot, rank, tl.program_id(1) * BLOCK_N, N,
                         stride_st, stride_sr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
                         BLOCK_M, BLOCK_N, BLOCK_R)


def _block(n: int, low: int, high: int) -> int:
    """The power of two tile for a dimension of n: at least `low` (tl.dot needs 16), at most `high`."""
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


_BGMV_BLOCK_M = 16  # decode: a tile runs one masked dot per slot in it; a narrow tile holds few slots
_BLOCK_R = 16  # expand's step over the rank: ranks are multiples of it or masked
_BLOCK_N = 64


def _check_shapes(rows: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, what: str) -> None:
    # rows: [T, d] (x or shrunk), weights: [S, R, in] or [S, R, out], out: [T, R] or [T, out]
    if rows.dim() != 2 or weights.dim() != 3 or out.dim() != 2 or rows.shape[0] != out.shape[0]:
        raise ValueError(f"{what}: expected [T, d] rows, [S, R, d] weights and [T, d'] output; got "
                         f"{tuple(rows.shape)}, {tuple(weights.shape)}, {tuple(out.shape)}")


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, what: str) -> None:
    _check_shapes(x, lora_a, out, what)
    if x.shape[1] != lora_a.shape[2] or out.shape[1] != lora_a.shape[1] or x.dtype != lora_a.dtype:
        raise ValueError(f"{what}: x {tuple(x.shape)} {x.dtype}, lora_a {tuple(lora_a.shape)} {lora_a.dtype} and "
                         f"out {tuple(out.shape)} do not fit (x [T, in], lora_a [S, R, in] of x's dtype, out [T, R])")


def _check_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, what: str) -> None:
    _check_shapes(shrunk, lora_b, y, what)
    if shrunk.shape[1] != lora_b.shape[1] or y.shape[1] != lora_b.shape[2]:
        raise ValueError(f"{what}: shrunk {tuple(shrunk.shape)}, lora_b {tuple(lora_b.shape)} and y "
                         f"{tuple(y.shape)} do not fit (shrunk [T, R], lora_b [S, R, out], y [T, out])")


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                seg_ends: torch.Tensor, slot_ranks: torch.Tensor, out: torch.Tensor,
                max_seg_len: int | None = None) -> None:
    """out[start:end] = x[start:end] @ lora_a[slot].T for each segment (slot, start, end).

    x: [T, in], lora_a: [S, R, in], seg_*: [G] int32, slot_ranks: [S] int32, out: [T, R] fp32. Columns past a
    segment's rank get zeros; rows outside every segment are left as they are. `max_seg_len` (a host value: the
    longest segment) sizes the grid; None: T, every segment may span the whole batch.
    """
    _check_shrink(x, lora_a, out, "sgmv_shrink")
    num_segs, (T, K), R = seg_slots.shape[0], x.shape, lora_a.shape[1]
    longest = T if max_seg_len is None else max_seg_len
    if num_segs == 0 or longest == 0 or R == 0:
        return
    block_m, block_r = _block(longest, 16, 64), _block(R, 16, 32)
    grid = (num_segs, triton.cdiv(longest, block_m), triton.cdiv(R, block_r))
    _sgmv_shrink_kernel[grid](x, lora_a, out, seg_slots, seg_starts, seg_ends, slot_ranks, K, R,
                              *x.stride(), *lora_a.stride(), *out.stride(),
                              BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=_block(K, 16, 64))


def sgmv_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                seg_ends: torch.Tensor, slot_ranks: torch.Tensor, y: torch.Tensor,
                max_seg_len: int | None = None) -> None:
    """y[start:end] += shrunk[start:end, :rank] @ lora_b[slot, :rank] for each segment, in place.

    shrunk: [T, R] (fp32 from sgmv_shrink), lora_b: [S, R, out] (B transposed, scaling folded in), y: [T, out]
    of lora_b's dtype or another; seg_*, slot_ranks and max_seg_len as in sgmv_shrink.
    """
    _check_expand(shrunk, lora_b, y, "sgmv_expand")
    num_segs, (T, N), R = seg_slots.shape[0], y.shape, lora_b.shape[1]
    longest = T if max_seg_len is None else max_seg_len
    if num_segs == 0 or longest == 0 or R == 0 or N == 0:
        return
    block_m = _block(longest, 16, 64)
    grid = (num_segs, triton.cdiv(longest, block_m), triton.cdiv(N, _BLOCK_N))
    _sgmv_expand_kernel[grid](shrunk, lora_b, y, seg_slots, seg_starts, seg_ends, slot_ranks, N, R,
                              *shrunk.stride(), *lora_b.stride(), *y.stride(),
                              BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_R=_BLOCK_R)


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor,
                out: torch.Tensor) -> None:
    """out[t] = x[t] @ lora_a[token_slots[t]].T for every row t with a slot (-1: none; its row is left as is).

    x: [T, in], lora_a: [S, R, in], token_slots: [T] int32, slot_ranks: [S] int32, out: [T, R] fp32; columns past
    a row's rank get zeros; a slot outside [0, S) counts as -1. Capturable in a CUDA graph: the launch depends
    only on the shapes. Any order of rows works; rows sorted by slot cost least.
    """
    _check_shrink(x, lora_a, out, "bgmv_shrink")
    (T, K), (S, R) = x.shape, lora_a.shape[:2]
    if token_slots.shape != (T,):
        raise ValueError(f"bgmv_shrink: token_slots {tuple(token_slots.shape)} must have one slot per row of x ({T})")
    if T == 0 or S == 0 or R == 0:
        return
    block_r = _block(R, 16, 32)
    grid = (triton.cdiv(T, _BGMV_BLOCK_M), triton.cdiv(R, block_r))
    _bgmv_shrink_kernel[grid](x, lora_a, out, token_slots, slot_ranks, T, K, S, R,
                              *x.stride(), *lora_a.stride(), *out.stride(),
                              BLOCK_M=_BGMV_BLOCK_M, BLOCK_R=block_r, BLOCK_K=_block(K, 16, 64))


def bgmv_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor,
                y: torch.Tensor) -> None:
    """y[t] += shrunk[t, :rank] @ lora_b[token_slots[t], :rank] for every row t with a slot, in place.

    shrunk: [T, R] fp32, lora_b: [S, R, out], token_slots: [T] int32 (-1: no delta), slot_ranks: [S] int32,
    y: [T, out]. Capturable in a CUDA graph, like bgmv_shrink.
    """
    _check_expand(shrunk, lora_b, y, "bgmv_expand")
    (T, N), (S, R) = y.shape, lora_b.shape[:2]
    if token_slots.shape != (T,):
        raise ValueError(f"bgmv_expand: token_slots {tuple(token_slots.shape)} must have one slot per row of y ({T})")
    if T == 0 or S == 0 or R == 0 or N == 0:
        return
    grid = (triton.cdiv(T, _BGMV_BLOCK_M), triton.cdiv(N, _BLOCK_N))
    _bgmv_expand_kernel[grid](shrunk, lora_b, y, token_slots, slot_ranks, T, N, S, R,
                              *shrunk.stride(), *lora_b.stride(), *y.stride(),
                              BLOCK_M=_BGMV_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=_BLOCK_R)


__all__ = ["bgmv_expand", "bgmv_shrink", "sgmv_expand", "sgmv_shrink"]
