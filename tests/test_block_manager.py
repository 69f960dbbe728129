"""BlockManager: allocation, prefix caching of released blocks, LRU eviction
(no Ray: the engine's bookkeeping of one NPU's KV blocks)."""

from __future__ import annotations

import pytest

from actors.engine.block_manager import BlockManager

pytestmark = pytest.mark.fast


def test_blocks_are_taken_lowest_first_and_a_table_grows_all_or_nothing():
    bm = BlockManager(4, block_size=16)
    table: list[int] = []
    assert bm.grow(table, 17) and table == [0, 1]
    assert bm.num_free == 2 and bm.num_used == 2
    assert not bm.grow(table, 16 * 5) and table == [0, 1]  # needs 3 more, 2 left: unchanged
    assert bm.grow(table, 16 * 4) and table == [0, 1, 2, 3] and bm.num_free == 0
    bm.release(table)
    assert table == [] and bm.num_free == 4


def test_a_released_registered_block_stays_cached_until_its_slot_is_needed():
    bm = BlockManager(3, block_size=16)
    first: list[int] = []
    bm.grow(first, 32)
    bm.register(first[0], 111)
    bm.register(first[1], 222)
    bm.release(first)
    assert bm.num_free == 3  # cached blocks count as free: they are evictable
    assert bm.match([111, 222, 333]) == [0, 1]
    assert bm.match([222]) == [1] and bm.match([999]) == []
    again = bm.match([111])
    bm.attach(again)  # a sequence with the same prefix takes block 0 back: not evictable now
    assert bm.num_free == 2
    other: list[int] = []
    assert bm.grow(other, 48) is False  # 3 blocks needed, 2 can be had (block 0 is owned)
    assert bm.grow(other, 32) and sorted(other) == [1, 2]  # the free block, then the cached one
    assert bm.match([222]) == []  # block 1 was evicted: its hash went with it
    assert bm.match([111]) == [0]


def test_eviction_takes_the_least_recently_released_block_first():
    bm = BlockManager(2, block_size=16)
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 16)
    bm.grow(b, 16)
    bm.register(a[0], 1)
    bm.register(b[0], 2)
    bm.release(b)  # released first: evicted first
    bm.release(a)
    taken: list[int] = []
    bm.grow(taken, 16)
    assert bm.match([2]) == [] and bm.match([1]) == [0]


def test_a_hash_already_cached_names_only_its_first_block():
    bm = BlockManager(2, block_size=16)
    table: list[int] = []
    bm.grow(table, 32)
    bm.register(table[0], 7)
    bm.register(table[1], 7)  # the same prefix hash twice: the first block keeps the name
    bm.release(table)
    assert bm.match([7]) == [0]
    assert bm.num_free == 2
