"""The Triton attention backend: kernels that read the paged KV cache in place (lorax_lite/kernels/paged_attention.py).

No KV block is gathered into a padded copy: the kernels walk each sequence's block table. A decode-only step runs
the decode kernel (one query per sequence); any other step runs the variable-length prefill kernel over every
sequence (chunked prefills and the decode rows beside them). The decode path reads only tensors (block tables,
sequence lengths, KV rows; a row of -1 is not written and a length of 0 attends nothing), so a CUDA graph
captured with static copies of them replays any decode step of up to its batch size (engine/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorax_lite.engine.attention import AttentionBackend, HostTensors, StepLayout


@dataclass
class TritonMetadata:
    """Device tensors (int32) of one step, and whether it is decode-only."""

    kv_rows: torch.Tensor  # [T] cache row of each new token (-1: padding, not written)
    block_tables: torch.Tensor  # [S, NB]
    seq_lens: torch.Tensor  # [S] keys of each sequence once this step's tokens are stored (0: padding)
    query_start_loc: torch.Tensor | None  # [S + 1] first query of each sequence; None for a decode-only step
    block_size: int
    max_query_len: int  # 1 for a decode-only step


class TritonBackend(AttentionBackend):
    """Paged decode and prefill kernels over the cache in place; decode steps can be captured in CUDA graphs."""

    name = "triton"
    graph_capturable = True

    def __init__(self) -> None:
        import lorax_lite.kernels.paged_attention as kernels  # imports triton: only once this backend is chosen

        self.kernels = kernels

    def host_tensors(self, layout: StepLayout) -> HostTensors:
        tensors = {
            "kv_rows": layout.kv_rows,
            "block_tables": layout.block_tables,
            "seq_lens": layout.context_lens + layout.num_new,
        }
        if not layout.is_decode:
            tensors["query_start_loc"] = torch.cat([layout.starts, (layout.starts[-1:] + layout.num_new[-1:])])
        return tensors

    def metadata(self, layout: StepLayout, tensors: HostTensors) -> TritonMetadata:
        query_start_loc = tensors.get("query_start_loc")
        return TritonMetadata(
            kv_rows=tensors["kv_rows"].to(torch.int32),
            block_tables=tensors["block_tables"].to(torch.int32),
            seq_lens=tensors["seq_lens"].to(torch.int32),
            query_start_loc=None if query_start_loc is None else query_start_loc.to(torch.int32),
            block_size=layout.block_size,
            max_query_len=int(layout.num_new.max()),
        )

    def forward(
        self,
        meta: TritonMetadata,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        kernels = self.kernels
        kernels.store_kv(key, value, k_cache, v_cache, meta.kv_rows)
        if meta.query_start_loc is None:
            return kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.block_size, scaling, sliding_window
            )
        return kernels.paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_size,
            scaling,
            meta.max_query_len,
            sliding_window,
        )
