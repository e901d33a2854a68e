import random

import pytest

from lorax_lite.engine.kv_cache import BlockManager


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
