"""Paged attention in Triton: kernels that read the paged KV cache in place, no gather into a padded copy.

The per-layer cache is `k_cache`, `v_cache`: `[num_blocks * block_size, Hkv, D]`, one row per token; token `t` of a
sequence lives at row `block_table[t // block_size] * block_size + t % block_size` (see engine/kv_cache.py).

- `store_kv` writes the K/V of a step's tokens into their cache rows (a row < 0 is skipped: CUDA-graph padding).
- `paged_decode_attention`: one query per sequence; one program per (sequence, kv head) holds the head's whole GQA
  group of query heads (padded to >= 16 rows for tl.dot) and walks the block table a tile of keys at a time. With
  few such programs and a long block table (on a GPU) the keys are split over several programs whose partial
  softmaxes a second kernel merges (flash decoding). The grid depends only on shapes: CUDA graphs can capture it.
- `paged_prefill_attention`: a flat variable-length batch of queries, causal, with a context before the new
  tokens (chunked prefill). One program per (tile of queries, sequence, kv head); a tile's rows are (query, head
  of the group) pairs, so the K/V a tile loads serves the whole group. It stops at the tile's diagonal and starts
  at the first key tile inside the sliding window.

Both take the softmax in fp32 with an online max and sum (flash attention) and return q's dtype. Sliding window:
a query at position p attends key j iff 0 <= p - j < sliding_window. The kernels themselves are in
paged_attention_kernels.py.
"""

from __future__ import annotations

import torch
import triton

from lorax_lite.kernels import interpreting
from lorax_lite.kernels.paged_attention_kernels import (
    decode_kernel,
    merge_splits_kernel,
    prefill_kernel,
    store_kv_kernel,
)

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
    _check_index(kv_rows, "kv_rows", key.device)
    if num_tokens == 0:
        return
    store_kv_kernel[(num_tokens,)](
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
    _check_indexes(q.device, block_tables=block_tables, seq_lens=seq_lens)
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
    decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None,
        UPCAST_DOT=_upcast_dot(q),
        IS_SPLIT=num_splits > 1, BLOCK_M=block_m, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d,
        num_warps=_decode_warps(block_d, q.dtype),
    )
    if num_splits > 1:
        merge_splits_kernel[(num_seqs, num_kv_heads)](
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
    step plus the new ones, whose K/V are already stored); max_query_len: the largest q_len_b, a hint that sizes
    the query tiles (any value is correct). Nothing is read back to the host.
    k_cache, v_cache, block_tables as for `paged_decode_attention`. out: optional [T, Hq, D] of q's dtype.
    Returns [T, Hq, D] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    group = _group_size(q, k_cache, v_cache, block_size)
    num_seqs = seq_lens.shape[0]
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
           and query_start_loc.shape == (num_seqs + 1,), "need block_tables [B, NB], query_start_loc [B + 1], "
           f"seq_lens [B]; got {tuple(block_tables.shape)}, {tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}")
    _check_indexes(q.device, block_tables=block_tables, query_start_loc=query_start_loc, seq_lens=seq_lens)
    out = _output(q, out)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_d = _block_d(head_dim)
    block_m, block_n, num_warps = _prefill_tiles(block_d, q.dtype)
    # no more rows than the longest sequence's queries fill (a step of short chunks gets short tiles)
    block_m = min(block_m, triton.next_power_of_2(max(max_query_len, 1) * group))
    block_m = max(block_m, _MIN_DOT, triton.next_power_of_2(group))
    block_q = block_m // group  # queries per tile
    # Sequence b's tiles are programs qsl[b] // block_q + b onwards: enough for its q_len, and the kernel finds its
    # sequence by a binary search of query_start_loc. At most B programs idle; nothing read back to the host.
    grid = (num_tokens // block_q + num_seqs, k_cache.shape[1])
    prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, num_seqs,
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


def _check_indexes(device: torch.device, **indexes: torch.Tensor) -> None:
    for name, index in indexes.items():
        _check_index(index, name, device)


def _check_index(index: torch.Tensor, name: str, device: torch.device) -> None:
    """Index tensors are read as flat int32/int64 arrays (a block table row by row) on the queries' device."""
    _check(index.dtype in (torch.int32, torch.int64) and index.stride(-1) == 1
           and index.device == device, f"{name} must be int32 or int64, contiguous in its last dimension, on "
           f"{device}; got {index.dtype}, strides {index.stride()}, on {index.device}")


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


def _decode_warps(block_d: int, dtype: torch.dtype) -> int:
    """Warps per decode program: 8 for heads wider than 64 or fp32 (more registers, else they spill)."""
    return 4 if block_d <= 64 and dtype != torch.float32 else 8


def _prefill_tiles(block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of prefill for a head of BLOCK_D and a dtype."""
    return _PREFILL_TILES["fp32" if dtype == torch.float32 else "half"][min(max(block_d, 64), 256)]


def _block_d(head_dim: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(head_dim))


__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
