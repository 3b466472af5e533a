"""Concurrent callers on one BlockPool never lose or duplicate a block."""
from __future__ import annotations

import random
import sys
import threading

import pytest

from kvforge.errors import OutOfBlocksError
from kvforge.core.pool import BlockPool

NUM_THREADS = 8
NUM_BLOCKS = 64
ITERATIONS = 3000


@pytest.fixture
def fast_switching():
    # switch threads every microsecond so that calls interleave as much as they can
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def worker(pool: BlockPool, seed: int, held: list[int], errors: list[BaseException],
           start: threading.Barrier) -> None:
    rng = random.Random(seed)
    mine: list[int] = []
    try:
        start.wait()
        for _ in range(ITERATIONS):
            r = rng.random()
            if r < 0.45:
                n = rng.randint(1, 6)
                try:
                    mine.extend(pool.allocate(n))
                except OutOfBlocksError:
                    pass
            elif r < 0.55:
                run = pool.allocate_consecutive(rng.randint(1, 3))
                if run is not None:
                    mine.extend(run)
            elif r < 0.65 and mine:
                b = rng.choice(mine)
                pool.incref([b])               # a second reference, dropped below
                mine.append(b)
            elif mine:
                k = rng.randint(1, len(mine))
                rng.shuffle(mine)
                out, mine[:] = mine[:k], mine[k:]
                pool.free(out)
        held.extend(mine)
    except BaseException as exc:  # surfaced in the main thread
        errors.append(exc)


def test_threads_never_lose_or_duplicate_blocks(fast_switching):
    pool = BlockPool(NUM_BLOCKS)
    helds: list[list[int]] = [[] for _ in range(NUM_THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(NUM_THREADS)
    threads = [threading.Thread(target=worker, args=(pool, seed, helds[seed], errors, start))
               for seed in range(NUM_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    pool.check_invariants()
    # every reference a thread holds matches the pool's count exactly
    counts: dict[int, int] = {}
    for held in helds:
        for b in held:
            counts[b] = counts.get(b, 0) + 1
    assert all(pool.ref_count(b) == k for b, k in counts.items())
    free = pool.free_blocks()
    assert len(set(free)) == len(free)
    assert not set(free) & set(counts)
    assert len(free) + len(counts) == pool.capacity == NUM_BLOCKS
    assert pool.stats.current_allocations == len(counts)
    s = pool.stats
    assert s.total_allocations - s.total_deallocations == len(counts)
    for held in helds:
        pool.free(held)
    pool.check_invariants()
    assert sorted(pool.free_blocks()) == list(range(NUM_BLOCKS))
    assert pool.stats.current_allocations == 0


def test_threads_with_cached_blocks_and_eviction(fast_switching):
    pool = BlockPool(32)
    evicted: list[int] = []
    pool.on_evict = evicted.append
    errors: list[BaseException] = []
    helds: list[list[int]] = [[] for _ in range(4)]

    def run(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[int] = []
        try:
            for _ in range(2000):
                if rng.random() < 0.5:
                    try:
                        ids = pool.allocate(rng.randint(1, 4))
                    except OutOfBlocksError:
                        continue
                    for b in ids:
                        if rng.random() < 0.5:
                            pool.mark_cached(b)
                    mine.extend(ids)
                elif mine:
                    pool.free([mine.pop(rng.randrange(len(mine)))])
            helds[seed].extend(mine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    pool.check_invariants()
    held = [b for h in helds for b in h]
    assert len(set(held)) == len(held)         # every block held once (no increfs here)
    avail = pool.free_blocks() + pool.evictable_blocks()
    assert sorted(avail + held) == list(range(32))
    assert pool.stats.num_evictions == len(evicted) > 0
