import pytest

from pdserve.engine.block_manager import BlockManager


def test_allocate_gives_distinct_blocks_with_ref_count_one():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = bm.allocate(3), bm.allocate(2)
    assert len(set(a + b)) == 5
    assert all(bm.ref_counts[i] == 1 for i in a + b)
    assert bm.num_free == 3
    assert bm.allocate(0) == []


def test_allocation_that_cannot_be_satisfied_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    held = bm.allocate(3)
    before = (list(bm.ref_counts), list(bm.free_ids))
    assert not bm.can_allocate(2)
    with pytest.raises(MemoryError):
        bm.allocate(2)
    assert (list(bm.ref_counts), list(bm.free_ids)) == before
    bm.free(held)
    assert bm.num_free == 4


def test_shared_block_returns_to_pool_only_after_last_reference():
    bm = BlockManager(num_blocks=2, block_size=4)
    [blk] = bm.allocate(1)
    bm.share([blk])
    assert bm.ref_counts[blk] == 2
    bm.free([blk])
    assert bm.ref_counts[blk] == 1 and blk not in bm.free_ids
    bm.free([blk])
    assert bm.ref_counts[blk] == 0 and bm.num_free == 2


def test_double_free_and_sharing_a_free_block_raise():
    bm = BlockManager(num_blocks=2, block_size=4)
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(ValueError):
        bm.free(ids)
    with pytest.raises(ValueError):
        bm.share(ids)
    assert bm.num_free == 2 and bm.ref_counts == [0, 0]


def test_ensure_grows_a_table_only_as_needed():
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    assert bm.ensure(table, 4) and len(table) == 1
    first = list(table)
    assert bm.ensure(table, 3) and table == first       # already big enough
    assert bm.ensure(table, 5) and len(table) == 2 and table[:1] == first
    assert bm.ensure(table, 8) and len(table) == 2
    assert bm.num_free == 6


def test_ensure_leaves_the_table_unchanged_when_blocks_are_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    table = bm.allocate(1)
    other = bm.allocate(1)
    assert not bm.ensure(table, 12)                     # needs 2 more, only 1 free
    assert len(table) == 1 and bm.num_free == 1
    bm.free(table + other)
    assert bm.num_free == 3


@pytest.mark.parametrize("tokens,blocks", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_for_rounds_up_to_whole_blocks(tokens, blocks):
    assert BlockManager(num_blocks=1, block_size=4).blocks_for(tokens) == blocks
