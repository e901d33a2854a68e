"""Paged attention in Triton: kernels that read the paged KV cache in place, no gather into a padded copy.

The per-layer cache is `k_cache`, `v_cache`: `[num_blocks * block_size, Hkv, D]`, one row per token; token `t` of a
sequence lives at row `block_table[t // block_size] * block_size + t % block_size` (see engine/kv_cache.py).

- `store_kv` writes the K/V of a step's tokens into their cache rows (a row < 0 is skipped: CUDA-graph padding).
- `paged_decode_attention`: one query per sequence; one program per (sequence, kv head) holds the head's whole GQA
  group of query heads (padded to >= 16 rows for tl.dot) and walks the block table a tile of keys at a time. Its
  grid depends only on shapes, so it can be captured in a CUDA graph.
- `paged_prefill_attention`: a flat variable-length batch of queries, causal, with a context before the new
  tokens (chunked prefill). One program per (tile of queries, sequence, kv head); a tile's rows are (query, head
  of the group) pairs, so the K/V a tile loads serves the whole group. It stops at the tile's diagonal and starts
  at the first key tile inside the sliding window.

Both take the softmax in fp32 with an online max and sum (flash attention) and return q's dtype. Sliding window:
a query at position p attends key j iff 0 <= p - j < sliding_window.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorax_lite.kernels import interpreting

_MIN_DOT = 16  # tl.dot needs every dimension >= 16 on a GPU
DECODE_BLOCK_N = 32  # keys per tile in decode
# Prefill tiles by BLOCK_D (head_dim rounded up to a power of two; the 64 row serves smaller heads, the 256 row
# larger ones): ((query, head) rows, keys, warps), chosen so that the sm_90 code of each compiles without register
# spills (checked with the ptxas bundled with Triton). fp32 tl.dot is IEEE, on FMA units rather than tensor cores,
# hence smaller fp32 tiles.
_PREFILL_TILES = {"half": {64: (64, 32, 4), 128: (64, 32, 8), 256: (64, 16, 8)},
                  "fp32": {64: (64, 32, 8), 128: (32, 16, 4), 256: (16, 16, 4)}}
SPLIT_MIN_KEYS = 512  # split-K decode: the fewest keys (of the block table's capacity) worth a split
MAX_SPLITS = 16
_LOG2E = 1.4426950408889634


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             kv_rows: torch.Tensor) -> None:
    """Write each token's K/V into its cache row.

    key, value: [T, Hkv, D] (any strides); k_cache, v_cache: [num_rows, Hkv, D];
    kv_rows: [T] int32 or int64, the cache row of each token; a row < 0 is skipped (padding of a CUDA graph).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _check(value.shape == key.shape and kv_rows.shape == (num_tokens,), "key, value and kv_rows disagree in shape")
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim, key.dtype)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, kv_rows,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence to its cached keys, read in place.

    q: [B, Hq, D], the query of sequence b at position seq_lens[b] - 1 (its own K/V already stored);
    k_cache, v_cache: [num_blocks * block_size, Hkv, D] with Hq = Hkv * G (query head h uses kv head h // G);
    block_tables: [B, NB] int32 (entries past a sequence's blocks are never read);
    seq_lens: [B] int32, keys of each sequence; 0 gives a row of zeros (padding of a CUDA graph).
    out: optional [B, Hq, D] of q's dtype, written in place. Returns [B, Hq, D] in q's dtype.
    num_splits: split each sequence's keys over this many programs (flash decoding), their partial softmaxes then
    merged; None picks it from the shapes: > 1 only on a GPU with few (sequence, kv head) pairs and a long table.
    The launch depends only on shapes, never on tensor values: the call can be captured in a CUDA graph.
    """
    num_seqs, num_heads, head_dim = q.shape
    group = _group_size(q, k_cache, v_cache, block_size)
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and seq_lens.shape == (num_seqs,),
           f"block_tables [B, NB] and seq_lens [B] must match q's B={num_seqs}")
    out = _output(q, out)
    if num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[1]
    if num_splits is None:
        num_splits = _num_splits(num_seqs * num_kv_heads, block_tables.shape[1] * block_size, q.device)
    _check(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    block_m, block_d = max(_MIN_DOT, triton.next_power_of_2(group)), _block_d(head_dim)
    # split partials, one row per (sequence, kv head, split, group row): acc [.., BLOCK_D] and the max and sum
    part_acc = out if num_splits == 1 else q.new_empty((num_seqs * num_kv_heads * num_splits * block_m, block_d),
                                                         dtype=torch.float32)
    part_ml = out if num_splits == 1 else q.new_empty((num_seqs * num_kv_heads * num_splits * block_m, 2),
                                                        dtype=torch.float32)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None,
        UPCAST_DOT=_upcast_dot(q),
        IS_SPLIT=num_splits > 1, BLOCK_M=block_m, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 and q.dtype != torch.float32 else 8,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_kv_heads)](
            part_acc, part_ml, out, num_splits, *out.stride(),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flat variable-length batch of queries to their sequences' cached keys, read in place.

    q: [T, Hq, D]; sequence b's queries are rows query_start_loc[b]:query_start_loc[b + 1] ([B + 1] int32), and
    query i of it sits at position seq_lens[b] - q_len_b + i (seq_lens: [B] int32, the keys cached before this
    step plus the new ones, whose K/V are already stored); max_query_len >= every q_len_b (it sizes the grid).
    k_cache, v_cache, block_tables as for `paged_decode_attention`. out: optional [T, Hq, D] of q's dtype.
    Returns [T, Hq, D] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    group = _group_size(q, k_cache, v_cache, block_size)
    num_seqs = seq_lens.shape[0]
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
           and query_start_loc.shape == (num_seqs + 1,), "need block_tables [B, NB], query_start_loc [B + 1], "
           f"seq_lens [B]; got {tuple(block_tables.shape)}, {tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}")
    out = _output(q, out)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    block_d = _block_d(head_dim)
    block_m, block_n, num_warps = _prefill_tiles(block_d, q.dtype)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group  # queries per tile
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, k_cache.shape[1])
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None,
        UPCAST_DOT=_upcast_dot(q),
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _num_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """Splits per sequence for decode: enough programs to fill the GPU once, each with >= SPLIT_MIN_KEYS keys of
    the table's capacity. From shapes only (the true lengths live on the device), so CUDA graphs can capture it."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if num_programs * 2 > num_sms or max_keys < 2 * SPLIT_MIN_KEYS:
        return 1
    return min(triton.cdiv(num_sms, num_programs), max_keys // SPLIT_MIN_KEYS, MAX_SPLITS)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
    _check(k_cache.dim() == 3 and k_cache.shape == v_cache.shape, "k_cache, v_cache must be [rows, Hkv, D] alike")
    _check(tuple(k_cache.shape[1:]) == (num_kv_heads, head_dim),
           f"the cache holds [Hkv, D] = {list(k_cache.shape[1:])}, the input {[num_kv_heads, head_dim]}")
    _check(k_cache.dtype == v_cache.dtype == dtype, f"cache dtype {k_cache.dtype} != input dtype {dtype}")


def _group_size(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int) -> int:
    """Query heads per kv head (G), after checking q against the cache."""
    _check(q.dim() == 3, f"q must be 3-D [rows, Hq, D], got {tuple(q.shape)}")
    _check_cache(k_cache, v_cache, k_cache.shape[1], q.shape[2], q.dtype)
    _check(q.shape[1] % k_cache.shape[1] == 0, f"Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[1]}")
    _check(block_size > 0 and block_size & (block_size - 1) == 0 and k_cache.shape[0] % block_size == 0,
           f"block_size must be a power of two dividing the cache rows, got {block_size}")
    return q.shape[1] // k_cache.shape[1]


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device,
           f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _upcast_dot(q: torch.Tensor) -> bool:
    """Whether tl.dot gets fp32 copies of bf16 tiles: Triton's CPU interpreter (3.9) multiplies bf16 bit patterns."""
    return q.dtype == torch.bfloat16 and q.device.type != "cuda" and interpreting()


def _prefill_tiles(block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of prefill for a head of BLOCK_D and a dtype."""
    return _PREFILL_TILES["fp32" if dtype == torch.float32 else "half"][min(max(block_d, 64), 256)]


def _block_d(head_dim: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(head_dim))


# The kernels: Triton types their arguments at launch (pointers, ints, constexprs), hence no annotations.


@triton.jit
def _store_kv_kernel(  # type: ignore[no-untyped-def]
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, kv_rows_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcr, stride_kch, stride_kcd, stride_vcr, stride_vch, stride_vcd,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    row = tl.load(kv_rows_ptr + token).to(tl.int64)
    if row < 0:  # padding
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    tl.store(k_cache_ptr + row * stride_kcr + heads * stride_kch + dims * stride_kcd, k, mask=mask)
    tl.store(v_cache_ptr + row * stride_vcr + heads * stride_vch + dims * stride_vcd, v, mask=mask)


@triton.jit
def _attend_keys(  # type: ignore[no-untyped-def]
    q, q_pos, lo, hi, kv_head, table_ptr, k_cache_ptr, v_cache_ptr,
    stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd,
    scale_log2, window,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax of q ([BLOCK_M, BLOCK_D], rows at positions q_pos) over keys lo..hi of one sequence.

    Returns (acc [BLOCK_M, BLOCK_D] fp32, m, l [BLOCK_M]): the output is acc / l (l == 0: the row had no key),
    m is the running max of the scores (log2 units), l the sum of exp2(score - m).
    """
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with no key yet gets exp2(-inf - m_i) = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        blocks = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0)
        rows = blocks.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE  # [BLOCK_N] cache rows
        k_t = tl.load(k_cache_ptr + rows[None, :] * stride_kr + kv_head * stride_kh + dims[:, None] * stride_kd,
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST_DOT:
            k_t = k_t.to(tl.float32)
        s = tl.dot(q, k_t, input_precision="ieee") * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        allowed = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (q_pos[:, None] - keys[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + rows[:, None] * stride_vr + kv_head * stride_vh + dims[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _window_start(first_pos, window, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """The first key a query at `first_pos` (or later) may attend, rounded down to a whole key tile."""
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    return lo


@triton.jit
def _decode_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2, window,
    stride_qb, stride_qh, stride_qd,
    stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd,
    stride_table, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    group_rows = tl.arange(0, BLOCK_M)  # the query heads of this kv head, padded to BLOCK_M rows
    heads = kv_head * GROUP + group_rows
    dims = tl.arange(0, BLOCK_D)
    mask = (group_rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd, mask=mask, other=0.0)
    q_pos = tl.full([BLOCK_M], 0, tl.int32) + seq_len - 1
    lo = _window_start(seq_len - 1, window, HAS_WINDOW, BLOCK_N)
    hi = seq_len
    if IS_SPLIT:  # this split's share of the key tiles
        per_split = tl.cdiv(tl.cdiv(seq_len - lo, BLOCK_N), num_splits) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(lo + per_split, seq_len)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    acc, m_i, l_i = _attend_keys(q, q_pos, lo, hi, kv_head, table_ptr, k_cache_ptr, v_cache_ptr,
                                 stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd, scale_log2, window,
                                 HEAD_DIM, BLOCK_SIZE, HAS_WINDOW, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
    if not IS_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0: no key, a row of zeros
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = ((seq.to(tl.int64) * tl.num_programs(1) + kv_head) * num_splits + split) * BLOCK_M + group_rows
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc)
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]
    part_acc_ptr, part_ml_ptr, out_ptr, num_splits, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the partial softmaxes of a (sequence, kv head)'s splits, rescaled to their common max."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    group_rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    first = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * num_splits * BLOCK_M + group_rows
    m_max = tl.full([BLOCK_M], -1.0e30, tl.float32)
    for split in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (first + split * BLOCK_M) * 2))
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    for split in range(num_splits):
        part = first + split * BLOCK_M
        weight = tl.exp2(tl.load(part_ml_ptr + part * 2) - m_max)  # 0 for a split that saw no key
        l_sum += weight * tl.load(part_ml_ptr + part * 2 + 1)
        acc += weight[:, None] * tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :])
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    heads = kv_head * GROUP + group_rows
    mask = (group_rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_qd,
    stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd,
    stride_table, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first = tile * BLOCK_Q  # the tile's first query, counted from the sequence's first new one
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)  # row r: query first + r // GROUP, head r % GROUP of the group
    queries = first + rows // GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (queries < q_len)
    heads = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tokens = (q_start + queries).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=mask, other=0.0)
    q_pos = tl.where(row_ok, context + queries, -1)  # a padding row attends nothing
    last = tl.minimum(first + BLOCK_Q, q_len) - 1
    lo = _window_start(context + first, window, HAS_WINDOW, BLOCK_N)
    hi = context + last + 1  # causal: no key past the tile's last query
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    acc, m_i, l_i = _attend_keys(q, q_pos, lo, hi, kv_head, table_ptr, k_cache_ptr, v_cache_ptr,
                                 stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd, scale_log2, window,
                                 HEAD_DIM, BLOCK_SIZE, HAS_WINDOW, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=mask)


__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
