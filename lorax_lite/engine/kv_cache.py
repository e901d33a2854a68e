"""Paged KV cache: how big it is (`plan_kv_cache`), a BlockManager that hands out fixed-size blocks (and shares
the cached ones of a common prefix, see engine/prefix_cache.py), and the per-layer tensors they index."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedModel

from lorax_lite.config import EngineConfig
from lorax_lite.engine.prefix_cache import BlockHash, PrefixCache
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

    With prefix caching (`enable_caching`), full blocks the scheduler vouches for are offered to a
    PrefixCache (`cache_blocks`) and stay there after their sequence frees them; a new sequence starts
    with the cached blocks of its longest cached prefix (`find_cached`, then `allocate(..., cached)`),
    shared and reference-counted. A block is then in one of three states: free (on the free list),
    used (referenced by one or more sequences; only a cached block is ever shared), or cached and
    evictable (no reference). New blocks come from the free list first, then by evicting the least
    recently released evictable block.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._num_offered: dict[str, int] = {}  # seq -> leading blocks of its table already offered to the cache
        self.prefix_cache = PrefixCache() if enable_caching else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and unreferenced cached ones."""
        return len(self._free) + self._num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, referenced or not."""
        return 0 if self.prefix_cache is None else self.prefix_cache.num_cached_blocks

    @property
    def _num_evictable(self) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.num_evictable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def find_cached(self, hashes: list[BlockHash]) -> list[int]:
        """The cached blocks of the longest cached prefix of the blocks hashed `hashes` (none without caching)."""
        return [] if self.prefix_cache is None else self.prefix_cache.longest_prefix(hashes)

    def can_allocate(self, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether a new sequence of `num_tokens` tokens fits, starting with the `cached` blocks (`find_cached`)."""
        return self._num_missing(num_tokens, cached) <= self.num_free_blocks - self._num_unreferenced(cached)

    def allocate(self, seq_id: str, num_tokens: int, cached: Sequence[int] = ()) -> None:
        """Give a new sequence enough blocks for its first `num_tokens` tokens: first the `cached` blocks
        (shared, their K/V already computed), then new ones."""
        if seq_id in self._tables:
            raise RuntimeError(f"sequence {seq_id!r} already has blocks")
        if not self.can_allocate(num_tokens, cached):
            raise RuntimeError(f"out of KV blocks: {seq_id!r} needs {self._num_missing(num_tokens, cached)} more, "
                               f"{self.num_free_blocks - self._num_unreferenced(cached)} free")
        require(self.prefix_cache is not None or not cached, "cached blocks given with prefix caching off")
        for block in cached:
            self._reference(block)
        self._tables[seq_id] = list(cached)
        self._num_offered[seq_id] = len(cached)
        self.append(seq_id, num_tokens)

    def num_new_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks a sequence still needs to hold `num_tokens` tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(self.blocks_for(num_tokens) - have, 0)

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= self.num_free_blocks

    def append(self, seq_id: str, num_tokens: int) -> None:
        """Grow a sequence's block table so it holds `num_tokens` tokens in total."""
        needed = self.num_new_blocks(seq_id, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: {seq_id!r} needs {needed}, {self.num_free_blocks} free")
        table = self._tables[seq_id]
        for _ in range(needed):
            block = self._free.popleft() if self._free else cast(PrefixCache, self.prefix_cache).evict()
            self._refcounts[block] = 1
            table.append(block)

    def cache_blocks(self, seq_id: str, hashes: list[BlockHash], num_blocks: int) -> None:
        """Offer the first `num_blocks` blocks of a sequence, hashed `hashes[:num_blocks]`, to the prefix cache;
        the caller vouches that their K/V are fully written and finite. A hash cached already keeps its first block."""
        table, start = self._tables[seq_id], self._num_offered[seq_id]
        if self.prefix_cache is None or num_blocks <= start:
            return
        require(num_blocks <= min(len(table), len(hashes)),
                f"{seq_id!r} offers {num_blocks} blocks but holds {len(table)} with {len(hashes)} hashes")
        for i in range(start, num_blocks):
            self.prefix_cache.insert(hashes[i], table[i])
        self._num_offered[seq_id] = num_blocks

    def uncached_blocks(self, seq_id: str) -> list[int]:
        """The blocks of a sequence that are not in the prefix cache: it alone holds them (only cached blocks
        are shared), so clearing them touches nobody else's K/V."""
        cache = self.prefix_cache
        return [b for b in self._tables.get(seq_id, ()) if cache is None or not cache.is_cached(b)]

    def free(self, seq_id: str) -> None:
        """Drop a sequence's references (no-op for an unknown sequence). An unreferenced cached block stays
        cached and becomes evictable, its last blocks first; any other goes back to the free list."""
        self._num_offered.pop(seq_id, None)
        for block in reversed(self._tables.pop(seq_id, ())):
            self._refcounts[block] -= 1
            if self._refcounts[block] > 0:
                continue
            if self.prefix_cache is not None and self.prefix_cache.is_cached(block):
                self.prefix_cache.release(block)
            else:
                self._free.append(block)

    def _reference(self, block: int) -> None:
        if self._refcounts[block] == 0:
            cast(PrefixCache, self.prefix_cache).take(block)
        self._refcounts[block] += 1

    def _num_missing(self, num_tokens: int, cached: Sequence[int]) -> int:
        return max(self.blocks_for(num_tokens) - len(cached), 0)

    def _num_unreferenced(self, cached: Sequence[int]) -> int:
        """How many of the `cached` blocks are evictable now, so no longer free once a sequence takes them."""
        return sum(self._refcounts[b] == 0 for b in cached)

    def check_invariants(self, idle: bool = False) -> None:
        """Raise InvariantError if the block tables, reference counts, free list and prefix cache disagree;
        `idle`: no sequence holds blocks either."""
        used = Counter(b for table in self._tables.values() for b in table)
        free = set(self._free)
        require(len(free) == len(self._free), "a block is on the free list twice")
        require(not set(used) & free, "a block is both free and used")
        require(all(len(set(t)) == len(t) for t in self._tables.values()), "a sequence holds a block twice")
        require(all(self._refcounts[b] == n for b, n in used.items()) and sum(self._refcounts) == used.total(),
                "reference counts do not match the block tables")
        cache = self.prefix_cache
        require(all(n == 1 or (cache is not None and cache.is_cached(b)) for b, n in used.items()),
                "a block is owned by two sequences but not cached")
        if cache is not None:
            cache.check_invariants(self._refcounts)
            require(not any(cache.is_cached(b) for b in free), "a block is both free and cached")
        require(len(used) + len(self._free) + self._num_evictable == self.num_blocks,
                f"free {len(self._free)} + used {len(used)} + evictable {self._num_evictable} != total "
                f"{self.num_blocks}")
        require(self._num_offered.keys() == self._tables.keys()
                and all(n <= len(self._tables[s]) for s, n in self._num_offered.items()),
                "the blocks offered to the prefix cache do not match the block tables")
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
