"""Page accounting (pure Python): layouts, tables, the allocator, and a random walk that never
leaks or shares a page."""

from __future__ import annotations

import random

import pytest

from ruyiflow.engine.paging import BlockAllocator, BlockTable, OutOfBlocks, PageLayout

# a familial model with 6 layers: trunk slots 0..4, exits 2 and 5 (its last layer)
FAMILY = PageLayout(block_size=4, num_trunk=5, exits=(2, 5), boundary_block_size=3)


def test_slots_of_an_exit() -> None:
    # exit 2: trunk 0, 1; branch of 2; boundary of 2
    assert FAMILY.slots_for(2) == (0, 1, 5, 7)
    # exit 5: trunk 0..4; branch of 5; boundaries of 2 and 5
    assert FAMILY.slots_for(5) == (0, 1, 2, 3, 4, 6, 7, 8)
    assert FAMILY.num_slots == 9
    moe = PageLayout(block_size=16, num_trunk=3)
    assert moe.slots_for(2) == (0, 1, 2) and moe.blocks_for(2, 17) == 6


def test_blocks_for_counts_each_slot_by_its_page_size() -> None:
    # 10 positions: 3 K/V pages per K/V slot, 4 boundary pages per boundary slot
    assert FAMILY.blocks_for(2, 10) == 3 * 3 + 4
    assert FAMILY.blocks_for(5, 10) == 6 * 3 + 2 * 4
    assert FAMILY.blocks_for(5, 0) == 0


def test_ensure_grows_and_out_of_blocks_takes_nothing() -> None:
    allocator = BlockAllocator(FAMILY, num_blocks=20)  # page 0 reserved: 19 to hand out
    assert allocator.num_blocks == allocator.num_free == 19
    table = BlockTable(allocator)
    table.ensure(2, 4)  # one page per slot
    assert table.num_blocks() == 4 + 1  # boundary: 4 positions need 2 pages of 3
    table.ensure(2, 4)
    assert table.num_blocks() == 5 and allocator.num_free == 14
    with pytest.raises(OutOfBlocks):
        table.ensure(5, 12)  # would need 6*3 + 2*4 = 26 pages
    assert allocator.num_free == 14 and table.num_blocks() == 5
    assert all(0 not in pages for pages in table.blocks.values())


def test_keep_only_frees_slots_of_other_exits() -> None:
    allocator = BlockAllocator(FAMILY, num_blocks=64)
    table = BlockTable(allocator)
    table.ensure(5, 5)
    assert table.num_blocks() == FAMILY.blocks_for(5, 5)
    table.keep_only(2)
    assert set(table.blocks) == set(FAMILY.slots_for(5)) & set(FAMILY.slots_for(2))
    table.ensure(2, 5)  # adds the branch slot of exit 2
    assert table.num_blocks() == FAMILY.blocks_for(2, 5)
    table.release()
    assert table.num_blocks() == 0 and allocator.num_free == allocator.num_blocks


def test_rows_are_reused() -> None:
    allocator = BlockAllocator(FAMILY, num_blocks=8)
    first, second = BlockTable(allocator), BlockTable(allocator)
    first.row, second.row = allocator.take_row(), allocator.take_row()
    assert (first.row, second.row) == (0, 1)
    first.release()
    assert first.row is None and allocator.take_row() == 0


def test_random_walk_never_leaks_or_shares_a_page() -> None:
    rng = random.Random(0)
    allocator = BlockAllocator(FAMILY, num_blocks=60)
    tables = [BlockTable(allocator) for _ in range(6)]
    for _ in range(2000):
        table = rng.choice(tables)
        action = rng.random()
        try:
            if action < 0.6:
                table.ensure(rng.choice(FAMILY.exits), rng.randrange(1, 30))
            elif action < 0.8:
                table.keep_only(rng.choice(FAMILY.exits))
            else:
                table.release()
        except OutOfBlocks:
            pass
        held = [b for t in tables for pages in t.blocks.values() for b in pages]
        assert len(held) == len(set(held)), "a page held twice"
        assert len(held) + allocator.num_free == allocator.num_blocks
        assert 0 not in held
    for table in tables:
        table.release()
    assert allocator.num_free == allocator.num_blocks
