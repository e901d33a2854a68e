"""The Triton kernels of paged attention; lorax_lite/kernels/paged_attention.py launches them and says what they do.

Triton types a kernel's arguments at launch (pointers, ints, constexprs), hence no annotations here. Shapes in
comments: BLOCK_M rows of queries (decode: the query heads of one kv head; prefill: (query, head) pairs), BLOCK_N
keys, BLOCK_D head dims (head_dim padded to a power of two, masked).
"""

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(  # type: ignore[no-untyped-def]
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
def decode_kernel(  # type: ignore[no-untyped-def]
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
def merge_splits_kernel(  # type: ignore[no-untyped-def]
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
def _sequence_of(program, query_start_loc_ptr, num_seqs, BLOCK_Q: tl.constexpr):  # type: ignore[no-untyped-def]
    """The last sequence b whose first tile, program query_start_loc[b] // BLOCK_Q + b, is <= `program`."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= program:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr, num_seqs,
    scale_log2, window,
    stride_qt, stride_qh, stride_qd,
    stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd,
    stride_table, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _sequence_of(program, query_start_loc_ptr, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first = (program - q_start // BLOCK_Q - seq) * BLOCK_Q  # the tile's first query, counted in its sequence
    if first >= q_len:  # one of the spare programs
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
