"""Paged KV cache: how big it is (`plan_kv_cache`), a BlockManager that hands out fixed-size blocks, and
the per-layer tensors they index."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lorax_lite.config import EngineConfig
from lorax_lite.invariants import require


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache needs to know about the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelShape:
        cfg = model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        )


@dataclass(frozen=True)
class KVCachePlan:
    """The KV cache an engine gets, and the longest sequence (prompt + output) it can therefore serve."""

    num_blocks: int
    max_seq_len: int


def plan_kv_cache(config: EngineConfig, shape: ModelShape, dtype: torch.dtype) -> KVCachePlan:
    """Size the cache from `num_kv_blocks` or `kv_cache_memory_gb`, then resolve `max_model_len` against the
    model's context and the cache (one sequence of max_seq_len tokens must fit alone); ValueError says what to raise.
    """
    num_blocks = (
        config.num_kv_blocks if config.num_kv_blocks is not None else _num_blocks_in_memory(config, shape, dtype)
    )
    capacity = num_blocks * config.block_size
    model_len, wanted = shape.max_position_embeddings, config.max_model_len
    if wanted is None:
        return KVCachePlan(num_blocks, min(model_len or capacity, capacity))
    if model_len is not None and wanted > model_len:
        raise ValueError(f"max_model_len {wanted} exceeds the model's context length {model_len}")
    if wanted > capacity:
        raise ValueError(f"max_model_len {wanted} does not fit in the KV cache ({num_blocks} blocks of "
                         f"{config.block_size} tokens); raise num_kv_blocks or kv_cache_memory_gb")
    return KVCachePlan(num_blocks, wanted)


def _num_blocks_in_memory(config: EngineConfig, shape: ModelShape, dtype: torch.dtype) -> int:
    per_block = KVCache.bytes_per_block(shape.num_layers, config.block_size, shape.num_kv_heads, shape.head_dim, dtype)
    budget = int(config.kv_cache_memory_gb * 2**30) // per_block
    model_len = config.max_model_len or shape.max_position_embeddings or 4096
    useful = config.max_num_seqs * -(-model_len // config.block_size)  # more blocks than this can never be used
    return max(1, min(budget, useful))


class BlockManager:
    """Owns the block tables: which physical blocks hold each sequence's K/V, in order.

    Token `i` of a sequence lives in block `block_table[i // block_size]` at offset `i % block_size`.
    Allocators ask first, then act: `can_allocate` → `allocate`, `can_append` → `append`, `free`.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Give a new sequence enough blocks for its first `num_tokens` tokens."""
        if seq_id in self._tables:
            raise RuntimeError(f"sequence {seq_id!r} already has blocks")
        self._tables[seq_id] = []
        self.append(seq_id, num_tokens)

    def num_new_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks a sequence still needs to hold `num_tokens` tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(self.blocks_for(num_tokens) - have, 0)

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= len(self._free)

    def append(self, seq_id: str, num_tokens: int) -> None:
        """Grow a sequence's block table so it holds `num_tokens` tokens in total."""
        needed = self.num_new_blocks(seq_id, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: {seq_id!r} needs {needed}, {len(self._free)} free")
        table = self._tables[seq_id]
        for _ in range(needed):
            table.append(self._free.popleft())

    def free(self, seq_id: str) -> None:
        """Return a sequence's blocks to the free list (no-op for an unknown sequence)."""
        for block in self._tables.pop(seq_id, ()):
            self._free.append(block)

    def check_invariants(self, idle: bool = False) -> None:
        """Raise InvariantError if the block tables are inconsistent; `idle`: no sequence holds blocks either."""
        used = [b for table in self._tables.values() for b in table]
        require(len(used) == len(set(used)), "a block is owned by two sequences (or twice by one)")
        require(not set(used) & set(self._free), "a block is both free and used")
        require(len(used) + len(self._free) == self.num_blocks,
                f"free {len(self._free)} + used {len(used)} != total {self.num_blocks}")
        require(len(self._free) == len(set(self._free)), "a block is on the free list twice")
        require(not idle or not self._tables,
                f"sequences {sorted(self._tables)} still hold blocks with no request left")


class KVCache:
    """Per-layer K and V tensors, `[num_blocks * block_size, num_kv_heads, head_dim]` each.

    One row per token, so a token's K/V is addressed by one KV row:
    `kv_row = block_table[pos // block_size] * block_size + pos % block_size`.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize
