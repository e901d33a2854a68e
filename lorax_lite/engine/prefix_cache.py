"""Prefix caching: full KV blocks found again by the hash of everything before and in them, under a salt.

Block `i` of a sequence is named by `hash(i) = sha256(hash(i - 1) || salt || its tokens)`: a chain, so
a hash names the whole prefix up to the end of its block, not just the block's own tokens (block 0's
parent is 32 zero bytes). The salt
is the request's adapter key (`id@version`, `id#n`; none for the base model) and its `cache_salt`
(a tenant, say): K/V computed under one adapter version, or for one tenant, is never found by a
request under another. The encoding is injective (a 32-byte parent, a JSON salt, which ends where its
closing bracket does, then 8 bytes per token), so a collision (two different prefixes, one hash, and a
request silently attending another's K/V) takes a sha256 collision.

`PrefixCache` maps hashes to the blocks that hold them and keeps the cached blocks that no sequence
uses in LRU order, for the BlockManager to evict when it runs out of free blocks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass

from lorax_lite.invariants import require

BlockHash = bytes
_NO_PARENT = bytes(32)  # the parent of block 0: every hashed message starts with 32 bytes


def prefix_salt(adapter_key: str | None, cache_salt: str | None) -> bytes:
    """The salt of a request's block hashes: its adapter key and cache salt, unambiguously encoded."""
    return json.dumps([adapter_key, cache_salt]).encode()


def hash_blocks(parent: BlockHash | None, token_ids: list[int], block_size: int, salt: bytes) -> list[BlockHash]:
    """The chained hashes of the full blocks of `token_ids`, which follow the block hashed `parent`
    (None: they start the sequence). A partial last block gets no hash."""
    num_blocks = len(token_ids) // block_size
    data = struct.pack(f"<{num_blocks * block_size}q", *token_ids[: num_blocks * block_size])
    width = 8 * block_size
    hashes = []
    for i in range(num_blocks):
        parent = hashlib.sha256((parent or _NO_PARENT) + salt + data[i * width : (i + 1) * width]).digest()
        hashes.append(parent)
    return hashes


@dataclass
class PrefixCacheStats:
    """Counters since start-up: tokens looked up when requests were admitted, and how many were found cached."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    def observe(self, num_queried: int, num_hit: int) -> None:
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit


class PrefixCache:
    """Hash -> block for the blocks whose K/V a finished step vouched for, and an LRU of those no sequence uses.

    The BlockManager owns reference counts; it tells the cache when a cached block is `take`n (referenced
    again) or `release`d (no longer referenced), and `evict`s the least recently released one for a new owner.
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def longest_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding `hashes[0]`, `hashes[1]`, ... up to the first one not cached."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def insert(self, block_hash: BlockHash, block: int) -> bool:
        """Cache a referenced block under `block_hash`; False (and nothing changes) if that hash is cached
        already, in another block: the first copy stays the one found."""
        if block_hash in self._block_of:
            return False
        require(block not in self._hash_of, f"block {block} is cached twice")
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def take(self, block: int) -> None:
        """A sequence references the cached `block`: it cannot be evicted until released."""
        self._evictable.pop(block, None)

    def release(self, block: int) -> None:
        """No sequence references the cached `block` any more: evictable, after every block released before it."""
        self._evictable[block] = None

    def evict(self) -> int:
        """Forget the least recently released unreferenced block and return it (its K/V stays finite)."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def check_invariants(self, refcounts: list[int]) -> None:
        """The two maps are each other's inverse; the evictable blocks are exactly the cached ones with no reference."""
        require(len(self._block_of) == len(self._hash_of), "the prefix cache's hash and block maps differ in size")
        require(all(self._hash_of.get(b) == h for h, b in self._block_of.items()),
                "the prefix cache's hash and block maps disagree")
        unreferenced = {b for b in self._hash_of if refcounts[b] == 0}
        require(set(self._evictable) == unreferenced,
                "the evictable blocks are not exactly the cached blocks no sequence references")


__all__ = ["BlockHash", "PrefixCache", "PrefixCacheStats", "hash_blocks", "prefix_salt"]
