"""Compile the paged-attention kernels to sm_90 (H100/H200) machine code without a GPU; exit 0 when all compile.

The CPU interpreter skips Triton's GPU compiler, so errors only a GPU build sees (tl.dot shapes, layouts, types)
would pass the interpreted tests. Triton ships its CUDA backend and ptxas with the CPU wheel, so this compiles the
kernels as `paged_attention` launches them, for bf16 and fp32, a head_dim that is not a power of two and a GQA
group of 3. Run with TRITON_INTERPRET unset: `python tests/compile_sm90.py` (tests/test_kernels_attention.py does).
"""

from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorax_lite.kernels import paged_attention, paged_attention_kernels

INT_POINTERS = {"kv_rows_ptr", "block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"}


def signature(kernel: triton.JITFunction, dtype: str, constants: dict[str, object]) -> dict[str, str]:
    """Triton's type of each argument, from the names the kernels use."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INT_POINTERS:
            types[name] = "*i32"
        elif name.startswith("part_"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + dtype
        else:
            types[name] = "fp32" if name == "scale_log2" else "i32"
    return types


def variants(dtype: str, head_dim: int, group: int, block_size: int) -> list[tuple[triton.JITFunction, dict, int]]:
    """(kernel, constexprs, num_warps) as paged_attention launches them."""
    import torch

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    block_d = paged_attention._block_d(head_dim)
    block_m = max(16, triton.next_power_of_2(group))
    shared = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_WINDOW=True, UPCAST_DOT=False)
    prefill_m, prefill_n, prefill_warps = paged_attention._prefill_tiles(block_d, torch_dtype)
    prefill_m = max(prefill_m, triton.next_power_of_2(group))
    return [
        (paged_attention_kernels.store_kv_kernel, dict(NUM_HEADS=2, HEAD_DIM=head_dim, BLOCK_H=2, BLOCK_D=block_d), 4),
        (paged_attention_kernels.decode_kernel, dict(shared, IS_SPLIT=True, BLOCK_M=block_m,
                                                     BLOCK_N=paged_attention.DECODE_BLOCK_N, BLOCK_D=block_d),
         paged_attention._decode_warps(block_d, torch_dtype)),
        (paged_attention_kernels.merge_splits_kernel, dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m,
                                                           BLOCK_D=block_d), 4),
        (paged_attention_kernels.prefill_kernel, dict(shared, BLOCK_Q=prefill_m // group, BLOCK_M=prefill_m,
                                                      BLOCK_N=prefill_n, BLOCK_D=block_d), prefill_warps),
    ]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    for dtype in ("bf16", "fp32"):
        for kernel, constants, num_warps in variants(dtype, head_dim=80, group=3, block_size=16):
            source = ASTSource(kernel, signature(kernel, dtype, constants), constexprs=constants)
            compiled = triton.compile(source, target=target, options=dict(num_warps=num_warps))
            print(f"{kernel.__name__} {dtype}: {len(compiled.asm['cubin'])} bytes of sm_90 code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
