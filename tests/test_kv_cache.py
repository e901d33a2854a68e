"""The paged KV cache: its size and the longest sequence it serves (plan_kv_cache), and the BlockManager."""

import random

import pytest
import torch

from lorax_lite.config import EngineConfig
from lorax_lite.engine.kv_cache import BlockManager, KVCache, ModelShape, plan_kv_cache
from lorax_lite.invariants import InvariantError

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def plan(**config):
    return plan_kv_cache(EngineConfig(model="unused", **config), SHAPE, torch.float32)


def test_max_model_len_must_fit_in_the_cache():
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        plan(num_kv_blocks=4, block_size=4, max_model_len=17)
    assert plan(num_kv_blocks=4, block_size=4, max_model_len=16).max_seq_len == 16


def test_max_model_len_must_fit_in_the_model_context():
    with pytest.raises(ValueError, match="exceeds the model's context length 512"):
        plan(max_model_len=513)


def test_max_seq_len_defaults_to_the_model_context_capped_by_the_cache():
    assert plan(num_kv_blocks=8, block_size=4).max_seq_len == 32
    assert plan(num_kv_blocks=1000, block_size=4).max_seq_len == 512


def test_blocks_come_from_the_memory_budget_but_never_more_than_can_be_used():
    per_block = KVCache.bytes_per_block(SHAPE.num_layers, 16, SHAPE.num_kv_heads, SHAPE.head_dim, torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 8 * 4
    tiny_budget = plan(kv_cache_memory_gb=per_block * 10 / 2**30)
    assert tiny_budget.num_blocks == 10 and tiny_budget.max_seq_len == 160
    assert plan(kv_cache_memory_gb=1.0, max_num_seqs=2).num_blocks == 2 * 512 // 16  # two full-length sequences


def test_allocate_append_free_keep_invariants():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_allocate(9)
    bm.allocate("a", 9)  # 3 blocks
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 5
    assert bm.num_new_blocks("a", 12) == 0 and bm.num_new_blocks("a", 13) == 1
    bm.append("a", 13)
    assert len(bm.block_table("a")) == 4
    bm.allocate("b", 16)
    assert bm.num_free_blocks == 0 and not bm.can_allocate(1) and not bm.can_append("a", 17)
    bm.check_invariants()
    bm.free("a")
    assert bm.num_free_blocks == 4 and not bm.has("a")
    bm.free("a")  # freeing twice is harmless
    bm.check_invariants()


def test_check_invariants_raises_on_inconsistent_tables_and_on_blocks_held_when_idle():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)
    bm.check_invariants()
    with pytest.raises(InvariantError, match="still hold blocks"):
        bm.check_invariants(idle=True)
    bm._free.append(bm.block_table("a")[0])  # a block both free and used
    with pytest.raises(InvariantError, match="both free and used"):
        bm.check_invariants()


def test_refuses_what_does_not_fit():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate("a", 9)
    bm.free("a")
    bm.allocate("b", 4)
    with pytest.raises(RuntimeError, match="already has blocks"):
        bm.allocate("b", 4)
    bm.check_invariants()


def test_random_operations_never_break_invariants():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    lengths: dict[str, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.4:
            seq, n = f"s{step}", rng.randint(1, 20)
            if bm.can_allocate(n):
                bm.allocate(seq, n)
                lengths[seq] = n
        elif op < 0.8 and lengths:
            seq = rng.choice(list(lengths))
            n = lengths[seq] + rng.randint(1, 6)
            if bm.can_append(seq, n):
                bm.append(seq, n)
                lengths[seq] = n
        elif lengths:
            bm.free(lengths.popitem()[0])
        bm.check_invariants()
        for seq, n in lengths.items():
            assert len(bm.block_table(seq)) == bm.blocks_for(n)


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)
    bm._free.append(bm.block_table("a")[0])  # a block both free and used
    with pytest.raises(AssertionError):
        bm.check_invariants()
