"""BlockPool: allocation policy, ref counts, cached/evictable blocks, metrics, elasticity.

Every test checks the pool's invariants after each step and asserts exact ids.
Free-list policy (pool.py): a LIFO stack, lowest id on top initially; blocks
released by one free() call are pushed in list order (the last id of the list
is handed out next).
"""
from __future__ import annotations

import pytest

from kvforge.errors import InvalidBlockError, KVForgeError, OutOfBlocksError
from kvforge.core.pool import AllocationStats, BlockPool, PhysicalBlockPool


def ok(pool: BlockPool) -> BlockPool:
    pool.check_invariants()
    return pool


def snapshot(pool: BlockPool):
    s = pool.stats.to_dict()
    s.pop("failed_allocations")
    return (s, pool.free_blocks(), pool.evictable_blocks(),
            [pool.ref_count(b) for b in range(pool.num_blocks)],
            [pool.is_cached(b) for b in range(pool.num_blocks)])


# ---------------------------------------------------- ROCmForge's behaviours
def test_alias():
    assert PhysicalBlockPool is BlockPool


def test_allocate():
    pool = ok(BlockPool(10))
    assert pool.free_blocks() == list(range(10))
    assert pool.allocate(3) == [0, 1, 2]
    ok(pool)
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert (pool.num_free_blocks, pool.num_allocated_blocks, pool.num_available_blocks) == (7, 3, 7)
    assert pool.allocate(1) == [3]
    assert pool.allocate(0) == []
    assert pool.can_allocate(6) and not pool.can_allocate(7)
    with pytest.raises(InvalidBlockError, match="count n must be >= 0, got -1"):
        pool.can_allocate(-1)                   # a negative count is a caller bug, not a "no"
    ok(pool)


@pytest.mark.parametrize("bad", [-1, -2, 2.5, "2", None])
def test_allocate_rejects_bad_counts(bad):
    pool = BlockPool(4)
    before = snapshot(pool)
    with pytest.raises(InvalidBlockError):
        pool.allocate(bad)
    assert snapshot(ok(pool)) == before


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_pool_size_must_be_positive_int(bad):
    with pytest.raises(InvalidBlockError):
        BlockPool(bad)


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    before = snapshot(pool)
    with pytest.raises(OutOfBlocksError) as exc:
        pool.allocate(2)
    assert (exc.value.requested, exc.value.available) == (2, 1)
    assert "2 blocks" in str(exc.value) and "1 free" in str(exc.value)
    assert isinstance(exc.value, KVForgeError) and isinstance(exc.value, MemoryError)
    assert snapshot(ok(pool)) == before
    assert pool.stats.failed_allocations == 1
    assert pool.allocate(1) == [3]
    with pytest.raises(OutOfBlocksError) as exc:
        pool.allocate(1)
    assert (exc.value.requested, exc.value.available) == (1, 0)
    assert pool.stats.failed_allocations == 2
    ok(pool)


def test_id_recycling_is_lifo():
    pool = BlockPool(6)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.free([1]) == 1
    assert pool.free_blocks() == [1, 3, 4, 5]
    assert pool.allocate(1) == [1]              # the block freed a moment ago comes back first
    pool.free([0, 2])                           # pushed in list order: 2 is on top
    assert pool.free_blocks() == [2, 0, 3, 4, 5]
    assert pool.allocate(2) == [2, 0]
    assert pool.allocate(2) == [3, 4]
    ok(pool)


def test_free_order_is_the_same_on_the_slow_path():
    # a shared block in the list sends free() down its careful path; the order must not change
    fast, slow = BlockPool(6), BlockPool(6)
    for pool in (fast, slow):
        assert pool.allocate(4) == [0, 1, 2, 3]
    slow.incref([3])
    assert fast.free([0, 2, 1]) == 3
    assert slow.free([0, 2, 1, 3]) == 3
    assert fast.free_blocks()[:3] == slow.free_blocks()[:3] == [1, 2, 0]
    assert slow.ref_count(3) == 1
    ok(fast), ok(slow)


def test_consecutive_allocation_lowest_run_or_none():
    pool = BlockPool(10)
    assert pool.allocate(10) == list(range(10))
    pool.free([8, 1, 4, 6, 3, 7])               # free: 1, 3-4, 6-8
    assert pool.allocate_consecutive(3) == [6, 7, 8]
    ok(pool)
    assert pool.free_blocks() == [3, 4, 1]      # the others keep their stack order
    assert pool.allocate_consecutive(2) == [3, 4]
    assert pool.allocate_consecutive(2) is None  # only block 1 is left
    assert pool.allocate_consecutive(1) == [1]
    assert pool.allocate_consecutive(1) is None
    assert pool.stats.current_allocations == 10
    ok(pool)
    fresh = BlockPool(5)
    assert fresh.allocate_consecutive(5) == [0, 1, 2, 3, 4]
    assert fresh.allocate_consecutive(1) is None
    with pytest.raises(InvalidBlockError):
        fresh.allocate_consecutive(0)


def test_consecutive_allocation_ignores_evictable_blocks():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.mark_cached(0), pool.mark_cached(1)
    pool.free([0, 1])
    assert pool.evictable_blocks() == [0, 1]
    assert pool.allocate_consecutive(3) is None  # only 2 truly free
    assert pool.allocate_consecutive(2) == [2, 3]
    assert pool.evictable_blocks() == [0, 1]
    ok(pool)


def test_ref_counting():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.incref([a, a, b])
    assert (pool.ref_count(a), pool.ref_count(b)) == (3, 2)
    assert pool.stats.current_allocations == 2
    assert pool.free([a, b]) == 0
    assert (pool.ref_count(a), pool.ref_count(b)) == (2, 1)
    assert pool.free([a, b]) == 1               # b reached zero
    assert pool.free_blocks() == [b, 2, 3]
    assert pool.free([a]) == 1
    assert pool.stats.current_allocations == 0
    ok(pool)


def test_block_sharing_and_unreference():
    pool = BlockPool(8)
    seq1 = pool.allocate(3)                     # [0, 1, 2]
    pool.incref(seq1[:2])                       # seq2 shares the first two blocks
    seq2 = seq1[:2] + pool.allocate(1)          # [0, 1, 3]
    assert seq2 == [0, 1, 3]
    assert [pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert pool.free(seq1) == 1                 # only block 2 is exclusively seq1's
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert pool.free_blocks()[0] == 2
    assert pool.free(seq2) == 3
    assert pool.num_free_blocks == 8
    ok(pool)


def test_paged_stats_fields():
    pool = BlockPool(8)
    s = pool.stats
    assert isinstance(s, AllocationStats)
    assert s == AllocationStats(num_blocks=8, capacity_blocks=8, total_allocations=0, total_deallocations=0,
                                current_allocations=0, peak_allocations=0, free_blocks=8, evictable_blocks=0,
                                cached_blocks=0, num_evictions=0, failed_allocations=0, high_water_mark=0,
                                compaction_count=0, last_compaction_ms=0.0, last_compaction_duration_ms=0.0,
                                total_blocks_moved=0, total_bytes_returned=0)
    a = pool.allocate(5)
    pool.free(a[:2])
    b = pool.allocate(1)
    pool.incref(b)
    pool.mark_cached(a[4])
    pool.free([a[4]])
    with pytest.raises(OutOfBlocksError):
        pool.allocate(9)
    pool.record_compaction(123.0, 4.5, 3, 1024)
    pool.record_bytes_returned(512)
    s = pool.stats
    assert (s.total_allocations, s.total_deallocations, s.current_allocations, s.peak_allocations) == (6, 3, 3, 5)
    assert (s.free_blocks, s.evictable_blocks, s.cached_blocks, s.num_evictions) == (4, 1, 1, 0)
    assert (s.failed_allocations, s.high_water_mark) == (1, 5)
    assert (s.compaction_count, s.last_compaction_ms, s.last_compaction_duration_ms) == (1, 123.0, 4.5)
    assert (s.total_blocks_moved, s.total_bytes_returned) == (3, 1536)
    assert s.to_dict()["peak_allocations"] == 5
    ok(pool)


# ----------------------------------------------------------- caller mistakes
@pytest.mark.parametrize("ids", [[5], [-1], [8], [100], [0, 0], [0, 5], [0, -1], [0, 99], ["a"], [1.0], [None]],
                         ids=repr)
def test_free_invalid_raises_and_changes_nothing(ids):
    pool = BlockPool(8)
    pool.allocate(2)                            # 0 and 1 held once; 2..7 free
    before = snapshot(pool)
    with pytest.raises(InvalidBlockError):
        pool.free(ids)
    assert snapshot(ok(pool)) == before


@pytest.mark.parametrize("ids", [[5], [-1], [8], [0, 5], [0, -2], [1, 100], [True], ["x"]], ids=repr)
def test_incref_invalid_raises_and_changes_nothing(ids):
    pool = BlockPool(8)
    pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(InvalidBlockError):
        pool.incref(ids)
    assert snapshot(ok(pool)) == before


def test_error_messages_name_the_block():
    pool = BlockPool(4)
    with pytest.raises(InvalidBlockError, match="block 2 1 time.*free"):
        pool.free([2])
    with pytest.raises(InvalidBlockError, match="block id 7 .*ids 0..3"):
        pool.free([7])
    with pytest.raises(InvalidBlockError, match="incref of block 3"):
        pool.incref([3])
    with pytest.raises(InvalidBlockError, match="cannot cache block 1"):
        pool.mark_cached(1)
    pool.allocate(4)
    with pytest.raises(InvalidBlockError):
        pool.mark_cached(-1)                    # must not wrap around to block 3
    with pytest.raises(InvalidBlockError):
        pool.mark_cached(4)
    assert not pool.is_cached(3)


def test_free_empty_list():
    pool = BlockPool(2)
    assert pool.free([]) == 0
    ok(pool)


# ------------------------------------------------------------------- metrics
def test_fragmentation_ratio():
    pool = BlockPool(8)
    assert pool.fragmentation_ratio() == 0.0    # empty
    ids = pool.allocate(6)
    assert pool.fragmentation_ratio() == 0.0    # packed: 0..5 held, 6..7 free above
    pool.free([ids[1], ids[3]])                 # held {0, 2, 4, 5}: holes 1 and 3 below block 5
    assert pool.fragmentation_ratio() == 2 / 4
    pool.free([ids[0]])                         # held {2, 4, 5}: 3 of 5 free blocks trapped
    assert pool.fragmentation_ratio() == 3 / 5
    pool.free([ids[5]])                         # held {2, 4}: top drops to 5 -> 3 trapped of 6
    assert pool.fragmentation_ratio() == 3 / 6
    assert pool.high_water_mark() == 5
    pool.free([ids[2], ids[4]])
    assert pool.fragmentation_ratio() == 0.0
    assert pool.high_water_mark() == 0
    full = BlockPool(3)
    full.allocate(3)
    assert full.fragmentation_ratio() == 0.0    # no free block at all
    ok(pool)


def test_fragmentation_counts_evictable_blocks_as_free():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    pool.mark_cached(ids[2])
    pool.free(ids[:2])
    pool.free([ids[2]])                         # cached: stays at id 2, evictable
    assert pool.high_water_mark() == 3          # it still holds data
    assert pool.fragmentation_ratio() == 0.0    # but nothing live traps free blocks
    ids = [b for b in pool.allocate(3)]         # takes the 3 free blocks first: 0, 1, 3
    assert sorted(ids) == [0, 1, 3] and pool.num_evictable_blocks == 1
    pool.free([ids[0], ids[1]])                 # live block 3 above: 0, 1 free and 2 evictable trapped
    assert pool.fragmentation_ratio() == 3 / 3
    pool.check_invariants()


def test_memory_efficiency_and_ratios():
    pool = BlockPool(8)
    assert pool.memory_efficiency() == 0.0
    ids = pool.allocate(6)
    assert pool.memory_efficiency() == 6 / 8
    pool.free(ids[:2])
    assert pool.memory_efficiency() == 4 / 8
    assert pool.num_available_blocks / pool.capacity == 4 / 8
    assert pool.stats.peak_allocations / pool.num_blocks == 6 / 8
    pool.mark_cached(ids[2])
    pool.free([ids[2]])                         # evictable: available, not held
    assert pool.memory_efficiency() == 3 / 8
    assert pool.num_available_blocks / pool.capacity == 5 / 8
    elastic = BlockPool(8, capacity=4)
    elastic.allocate(1)
    assert elastic.memory_efficiency() == 1 / 4
    assert elastic.stats.peak_allocations / elastic.num_blocks == 1 / 8
    assert BlockPool(8, capacity=0).memory_efficiency() == 0.0


# ----------------------------------------------------- cached and evictable
def test_cached_blocks_become_evictable_in_lru_order():
    pool = BlockPool(6)
    evicted: list[int] = []
    pool.on_evict = evicted.append
    assert pool.allocate(4) == [0, 1, 2, 3]
    for b in (0, 1, 2):
        pool.mark_cached(b)
    assert pool.free([2, 1, 3]) == 3            # one call: queued in list order; 3 is uncached
    assert pool.evictable_blocks() == [2, 1]
    assert pool.free_blocks() == [3, 4, 5]
    assert pool.free([0]) == 1                  # a later release goes behind
    assert pool.evictable_blocks() == [2, 1, 0]
    assert (pool.num_free_blocks, pool.num_evictable_blocks, pool.num_available_blocks) == (3, 3, 6)
    ok(pool)
    assert pool.allocate(3) == [3, 4, 5]        # truly free blocks first, no eviction
    assert evicted == []
    assert pool.allocate(1) == [2]              # then the least recently released
    assert evicted == [2] and not pool.is_cached(2)
    assert pool.evictable_blocks() == [1, 0]
    ok(pool)
    pool.incref([1])                            # revive: held again, leaves the queue
    assert pool.ref_count(1) == 1 and pool.is_cached(1)
    assert pool.evictable_blocks() == [0]
    assert pool.stats.current_allocations == 5
    pool.free([1])                              # back to the end of the queue
    assert pool.evictable_blocks() == [0, 1]
    # evicted blocks go through the free stack in eviction order, so the last one evicted
    # is handed out first
    assert pool.allocate(2) == [1, 0]
    assert evicted == [2, 0, 1]
    assert pool.stats.num_evictions == 3
    ok(pool)


def test_partial_eviction_takes_free_then_oldest():
    pool = BlockPool(4)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.mark_cached(0), pool.mark_cached(1), pool.mark_cached(2)
    pool.free([0])
    pool.free([1])
    pool.free([3, 2])                           # 3 uncached -> free; 2 -> evictable
    assert pool.free_blocks() == [3] and pool.evictable_blocks() == [0, 1, 2]
    ids = pool.allocate(2)                      # 3 and the oldest evictable (0)
    assert sorted(ids) == [0, 3]
    assert pool.evictable_blocks() == [1, 2]
    assert pool.stats.num_evictions == 1
    ok(pool)


def test_exhaustion_counts_evictable_and_evicts_nothing_on_failure():
    pool = BlockPool(3)
    ids = pool.allocate(3)
    pool.mark_cached(ids[0])
    pool.free([ids[0]])
    before = snapshot(pool)
    with pytest.raises(OutOfBlocksError) as exc:
        pool.allocate(2)
    assert (exc.value.requested, exc.value.available) == (2, 1)
    assert snapshot(ok(pool)) == before
    assert pool.evictable_blocks() == [ids[0]]


def test_reclaim_unused_blocks_and_unmark():
    pool = BlockPool(5)
    evicted = []
    pool.on_evict = evicted.append
    ids = pool.allocate(4)
    for b in ids:
        pool.mark_cached(b)
    pool.free([ids[3], ids[2], ids[1]])
    pool.unmark_cached(ids[2])                  # evictable + unmarked -> plain free, no callback
    assert pool.evictable_blocks() == [3, 1]
    assert pool.free_blocks() == [2, 4]
    pool.unmark_cached(ids[0])                  # held: just forgets the flag
    assert not pool.is_cached(0) and pool.ref_count(0) == 1
    pool.unmark_cached(4)                       # not cached: no-op
    assert pool.reclaim_unused_blocks() == 2
    assert evicted == [3, 1]
    assert pool.free_blocks() == [1, 3, 2, 4]
    assert pool.stats.cached_blocks == 0
    assert pool.reclaim_unused_blocks() == 0
    assert pool.free([0]) == 1 and pool.evictable_blocks() == []
    ok(pool)


def test_sort_free_list():
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([1, 5, 3])
    assert pool.free_blocks() == [3, 5, 1]
    pool.sort_free_list()
    assert pool.free_blocks() == [1, 3, 5]
    assert pool.allocate(2) == [1, 3]
    ok(pool)


# ---------------------------------------------------------------- elasticity
def test_grow_and_shrink():
    pool = BlockPool(8, capacity=4)
    assert (pool.capacity, pool.free_blocks()) == (4, [0, 1, 2, 3])
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([1])
    pool.grow(6)                                # new ids go below the older free ones
    assert (pool.capacity, pool.free_blocks()) == (6, [1, 3, 4, 5])
    ok(pool)
    with pytest.raises(InvalidBlockError):
        pool.grow(9)
    with pytest.raises(InvalidBlockError):
        pool.grow(5)
    before = snapshot(pool)
    with pytest.raises(InvalidBlockError, match="block 2"):
        pool.shrink(2)                          # block 2 is held
    assert snapshot(ok(pool)) == before
    pool.shrink(3)
    assert (pool.capacity, pool.free_blocks()) == (3, [1])
    assert pool.stats.capacity_blocks == 3
    ok(pool)
    with pytest.raises(OutOfBlocksError) as exc:
        pool.allocate(2)
    assert exc.value.available == 1
    with pytest.raises(InvalidBlockError):
        pool.incref([4])                        # beyond capacity: free
    pool.grow(8)
    assert pool.free_blocks() == [1, 3, 4, 5, 6, 7]
    ok(pool)


def test_shrink_refuses_cached_blocks_above_the_line():
    pool = BlockPool(4)
    ids = pool.allocate(4)
    pool.mark_cached(3)
    pool.free(ids)
    with pytest.raises(InvalidBlockError, match="block 3"):
        pool.shrink(2)
    pool.reclaim_unused_blocks()
    pool.shrink(2)
    assert pool.free_blocks() == [1, 0]
    ok(pool)


def test_relocate_moves_ownership():
    pool = BlockPool(8)
    assert pool.allocate(5) == [0, 1, 2, 3, 4]
    pool.incref([4])
    pool.mark_cached(3)
    pool.free([1, 2])
    pool.free([3])                              # 3 evictable
    assert pool.evictable_blocks() == [3]
    pool.relocate([(4, 1), (3, 2)])
    assert [pool.ref_count(b) for b in range(5)] == [1, 2, 0, 0, 0]
    assert pool.is_cached(2) and not pool.is_cached(3)
    assert pool.evictable_blocks() == [2]
    assert pool.free_blocks() == [3, 4, 5, 6, 7]  # sources go on top of the stack
    assert pool.high_water_mark() == 3
    assert pool.fragmentation_ratio() == 0.0
    ok(pool)


def test_relocate_upwards_raises_the_high_water_mark():
    pool = BlockPool(8)
    pool.allocate(1)
    pool.relocate([(0, 5)])
    assert pool.high_water_mark() == 6
    assert pool.fragmentation_ratio() == 5 / 7
    ok(pool)


@pytest.mark.parametrize("moves", [
    [(0, 1)],            # destination held
    [(3, 0)],            # source free (dst held, too)
    [(3, 4)],            # source free
    [(0, 3), (1, 3)],    # the same destination twice
    [(0, 3), (0, 4)],    # the same source twice
    [(0, 6)],            # destination beyond capacity
    [(0, 9)],            # destination unknown
], ids=repr)
def test_relocate_rejects_bad_moves_and_changes_nothing(moves):
    pool = BlockPool(8, capacity=6)
    pool.allocate(3)
    before = snapshot(pool)
    with pytest.raises(InvalidBlockError):
        pool.relocate(moves)
    assert snapshot(ok(pool)) == before


def test_repr_mentions_counts():
    pool = BlockPool(4)
    pool.allocate(1)
    assert repr(pool) == "BlockPool(num_blocks=4, capacity=4, allocated=1, free=3, evictable=0)"


def test_ids_from_numpy_tensors_and_tuples_are_plain_ints():
    import json

    import numpy as np
    import torch

    pool = BlockPool(6)
    a = pool.allocate(np.int64(2))
    assert a == [0, 1] and all(type(b) is int for b in a)
    pool.incref(np.array([0]))
    pool.free(np.array([0]))
    pool.free(torch.tensor([0, 1]))
    pool.free((pool.allocate(1)[0],))
    assert pool.num_free_blocks == 6 and all(type(b) is int for b in pool.free_blocks())
    json.dumps(pool.stats.to_dict())
    for bad in (0, "0", [0.5], np.zeros((1, 1), dtype=np.int64)):
        with pytest.raises(InvalidBlockError):
            pool.free(bad)
    with pytest.raises(InvalidBlockError):
        pool.can_allocate("x")
    pool.check_invariants()


def test_held_and_live_blocks():
    pool = BlockPool(8, capacity=6)
    assert pool.held_blocks() == [] and pool.live_blocks() == []
    ids = pool.allocate(4)                      # [0, 1, 2, 3]
    pool.mark_cached(ids[1])
    pool.free([ids[1], ids[2]])                 # 1 evictable (cached), 2 free
    assert pool.held_blocks() == [0, 1, 3]      # referenced or cached, ascending
    assert pool.live_blocks() == [0, 3]         # referenced only
    pool.reclaim_unused_blocks()
    assert pool.held_blocks() == pool.live_blocks() == [0, 3]
    pool.check_invariants()


def test_mark_cached_many_is_all_or_nothing():
    pool = BlockPool(8)
    ids = pool.allocate(3)
    with pytest.raises(InvalidBlockError, match="cannot cache block 5: it is not held"):
        pool.mark_cached_many([ids[0], 5])
    assert not any(pool.is_cached(b) for b in range(8)) and pool.stats.cached_blocks == 0
    with pytest.raises(InvalidBlockError):
        pool.mark_cached_many([ids[0], 99])
    pool.mark_cached_many([ids[0], ids[2], ids[0]])
    assert [pool.is_cached(b) for b in ids] == [True, False, True]
    assert pool.stats.cached_blocks == 2
    pool.free(ids)
    assert pool.evictable_blocks() == [ids[0], ids[2]]
    pool.check_invariants()


def test_metadata_bytes_grows_with_the_pool():
    small, big = BlockPool(16), BlockPool(4096)
    assert 0 < small.metadata_bytes() < big.metadata_bytes()
