"""The block pool: physical block ids, reference counts, the free stack.

Pure bookkeeping (no torch): the pool hands out integer block ids; the
storage layer maps an id to device memory. :class:`BlockPool` is assembled
from one concept per module: allocation and reference counts (here), cached
blocks and their LRU (:mod:`~kvforge.core.pool_cache`), the capacity line and
compaction moves (:mod:`~kvforge.core.pool_elastic`), counters and metrics
(:mod:`~kvforge.core.pool_stats`).

Free-block policy. Free ids sit on a stack (LIFO). The stack starts in
ascending order with the lowest id on top, so a pool that never needed more
than ``k`` blocks at once only ever touched ids ``0..k-1`` (the high-water
mark equals peak occupancy), and a block freed a moment ago (warm in caches)
is the next one handed out. Both operations are O(1) per block. Holes that
open below live blocks are closed by compaction, after which
:meth:`BlockPool.sort_free_list` puts the lowest free ids back on top.

Cached blocks. A block registered in a prefix index is *cached*. When its
reference count drops to zero it is not freed but queued as *evictable*, in
least-recently-released order (:mod:`~kvforge.core.pool_cache`). Blocks released by one :meth:`BlockPool.free`
call are queued (and, when uncached, pushed on the free stack) in list order,
whichever path the call takes; :meth:`~kvforge.core.manager.BlockManager.free_sequence`
passes a sequence's blocks tail first, so its last block is evicted before its
first and shared prefixes stay longest. Allocation takes truly
free blocks first and evicts the oldest evictable block only when the free
stack is empty. :meth:`BlockPool.incref` on an evictable block revives it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import numpy as np

from kvforge.core.ids import as_block_id, as_int, block_id_list
from kvforge.core.pool_cache import CachedBlocks
from kvforge.core.pool_elastic import ElasticPool
from kvforge.core.pool_stats import PoolMetrics
from kvforge.core.usage import AllocationStats
from kvforge.errors import InvalidBlockError, OutOfBlocksError

__all__ = ["MAX_BLOCKS", "AllocationStats", "BlockPool", "PhysicalBlockPool"]

#: the most blocks a pool holds: block tables are int32
MAX_BLOCKS = 2**31


class BlockPool(PoolMetrics, ElasticPool, CachedBlocks):
    """Reference-counted block ids ``0..num_blocks-1``.

    ``capacity`` of them (all, unless the pool was created smaller) are backed
    by storage; :meth:`grow` and :meth:`shrink` move that line for an elastic
    pool. Thread-safe: every mutating method holds one (re-entrant) lock for its
    whole call, so concurrent callers never lose or duplicate a block; the
    counters read without the lock are snapshots.
    Every failing call raises and changes nothing.
    """

    def __init__(self, num_blocks: int, capacity: int | None = None) -> None:
        num_blocks = as_int(num_blocks, "num_blocks", InvalidBlockError, low=1, high=MAX_BLOCKS)
        capacity = num_blocks if capacity is None else \
            as_int(capacity, "capacity", InvalidBlockError, high=num_blocks)
        self.num_blocks = num_blocks
        self._capacity = capacity
        # re-entrant: eviction callbacks (prefix index, on_removed hooks) may read the pool
        self._lock = threading.RLock()
        self._ref = [0] * self.num_blocks
        self._cached = bytearray(self.num_blocks)
        self._free = list(range(self._capacity - 1, -1, -1))  # top of stack = lowest id
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._high = 0  # one past the highest id that may be held (lowered lazily)
        self.on_evict: Callable[[int], None] | None = None
        self._init_counters()

    # ------------------------------------------------------------ allocation
    @property
    def capacity(self) -> int:
        """Blocks backed by storage now (ids ``0..capacity-1``)."""
        return self._capacity

    def can_allocate(self, n: int) -> bool:
        """Whether :meth:`allocate` of ``n`` blocks (an int >= 0) would succeed now."""
        n = as_int(n, "can_allocate() block count n", InvalidBlockError)
        return n <= len(self._free) + len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` blocks with reference count 1, all or nothing.

        Raises :class:`OutOfBlocksError` (allocating nothing) when fewer than
        ``n`` are free or evictable.
        """
        with self._lock:
            free = self._free
            if n == 1 and free and type(n) is int:  # the decode-step fast path
                b = free.pop()
                self._ref[b] = 1
                ids = [b]
                if b >= self._high:
                    self._high = b + 1
            else:
                n = as_int(n, "allocate() block count n", InvalidBlockError)
                if n > len(free):
                    if n > len(free) + len(self._evictable):
                        self._failed += 1
                        raise OutOfBlocksError(
                            f"cannot allocate {n} blocks: {len(free)} free and "
                            f"{len(self._evictable)} evictable of {self._capacity} (pool max {self.num_blocks})",
                            requested=int(n), available=len(free) + len(self._evictable))
                    self._evict(n - len(free))
                if n == 0:
                    return []
                ids = free[-n:]
                del free[-n:]
                ids.reverse()  # hand out in stack order: lowest-on-top first
                ref = self._ref
                for b in ids:
                    ref[b] = 1
                top = max(ids) + 1
                if top > self._high:
                    self._high = top
            self._num_allocated += n
            self._total_alloc += n
            if self._num_allocated > self._peak:
                self._peak = self._num_allocated
            return ids

    def allocate_consecutive(self, n: int) -> list[int] | None:
        """``n`` adjacent free ids (the lowest such run), or ``None`` if none exists.

        Only truly free blocks count (no eviction). O(free blocks) per call.
        """
        n = as_int(n, "allocate_consecutive() block count n", InvalidBlockError, low=1)
        with self._lock:
            if n > len(self._free):
                return None
            ids = np.sort(np.fromiter(self._free, dtype=np.int64, count=len(self._free)))
            # a run of n starts at i when ids[i + n - 1] - ids[i] == n - 1
            starts = np.flatnonzero(ids[n - 1:] - ids[: len(ids) - n + 1] == n - 1)
            if len(starts) == 0:
                return None
            first = int(ids[starts[0]])
            run = list(range(first, first + n))
            taken = set(run)
            self._free = [b for b in self._free if b not in taken]
            ref = self._ref
            for b in run:
                ref[b] = 1
            self._high = max(self._high, first + n)
            self._num_allocated += n
            self._total_alloc += n
            self._peak = max(self._peak, self._num_allocated)
            return run

    def incref(self, ids: Iterable[int]) -> None:
        """Add one reference to each block (held or evictable; an evictable one is revived)."""
        with self._lock:
            ids = block_id_list(ids, "incref() block ids", self.num_blocks)
            ref, cached = self._ref, self._cached
            for b in ids:
                if ref[b] == 0 and not (cached[b] and b in self._evictable):
                    raise InvalidBlockError(f"incref of block {b}, which is free")
            for b in ids:
                if ref[b] == 0:  # revive an evictable cached block: it counts as allocated again
                    del self._evictable[b]
                    self._num_allocated += 1
                    self._total_alloc += 1
                ref[b] += 1
            if self._num_allocated > self._peak:
                self._peak = self._num_allocated

    def free(self, ids: Sequence[int]) -> int:
        """Drop one reference from each block; return how many reached zero.

        A block at zero goes back to the free stack, or to the evictable queue
        when it is cached. An id listed ``k`` times drops ``k`` references.
        Freeing a free, unknown or negative id, or anything but an integer id,
        raises :class:`InvalidBlockError` and changes nothing.
        """
        if type(ids) is not list:
            ids = block_id_list(ids, "free() block ids")
        with self._lock:
            ref, cached = self._ref, self._cached
            if not ids:
                return 0
            # fast path: every block exclusively held and uncached
            done = 0
            checked = False
            try:
                if min(ids) >= 0:
                    checked = True
                    for b in ids:  # only Python ints take the fast paths (a bool would index)
                        if type(b) is not int or ref[b] != 1 or cached[b]:
                            break
                        ref[b] = 0
                        done += 1
            except (IndexError, TypeError):
                pass
            if done == len(ids):
                self._free.extend(ids)
                self._num_allocated -= done
                self._total_dealloc += done
                return done
            if checked:  # next most common: every block held once, some of them cached
                try:
                    for b in ids[done:]:
                        if type(b) is not int or ref[b] != 1:
                            break
                        ref[b] = 0
                        done += 1
                except (IndexError, TypeError):
                    pass
                if done == len(ids):
                    push, evictable = self._free.append, self._evictable
                    for b in ids:  # list order, as the slow path
                        if cached[b]:
                            evictable[b] = None
                        else:
                            push(b)
                    self._num_allocated -= done
                    self._total_dealloc += done
                    return done
            for b in ids[:done]:  # undo, then take the careful path
                ref[b] = 1
            return self._free_slow(list(ids))

    def _free_slow(self, ids: list[int]) -> int:
        ids = block_id_list(ids, "free() block ids", self.num_blocks)
        ref, cached = self._ref, self._cached
        drops: dict[int, int] = {}
        for b in ids:
            drops[b] = drops.get(b, 0) + 1
        for b, k in drops.items():
            if ref[b] < k:
                state = "free" if ref[b] == 0 else f"held {ref[b]} time(s)"
                raise InvalidBlockError(f"cannot free block {b} {k} time(s): it is {state}")
        zero: list[int] = []
        for b in ids:
            ref[b] -= 1
            if ref[b] == 0:
                zero.append(b)
        for b in zero:  # list order, as the fast path
            if cached[b]:
                self._evictable[b] = None
            else:
                self._free.append(b)
        self._num_allocated -= len(zero)
        self._total_dealloc += len(zero)
        return len(zero)

    def ref_count(self, block_id: int) -> int:
        """Current reference count of a block."""
        if type(block_id) is int and 0 <= block_id < self.num_blocks:
            return self._ref[block_id]
        return self._ref[as_block_id(block_id, self.num_blocks)]

    def free_blocks(self) -> list[int]:
        """Free ids in hand-out order (next handed out first)."""
        with self._lock:
            return self._free[::-1]

    # ------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Assert the pool's internal consistency (for tests)."""
        with self._lock:
            free = self._free
            assert len(set(free)) == len(free), "duplicate id on the free stack"
            assert all(0 <= b < self._capacity for b in free), "free id outside capacity"
            assert all(self._ref[b] == 0 and not self._cached[b] for b in free), "free id held or cached"
            for b in self._evictable:
                assert self._ref[b] == 0 and self._cached[b], f"evictable block {b} held or uncached"
            assert not set(free) & set(self._evictable), "block both free and evictable"
            held = sum(1 for r in self._ref if r > 0)
            assert held == self._num_allocated, f"held {held} != counter {self._num_allocated}"
            assert all(r >= 0 for r in self._ref), "negative reference count"
            assert all(self._ref[b] == 0 and not self._cached[b] for b in range(self._capacity, self.num_blocks)), \
                "block beyond capacity in use"
            assert len(free) + len(self._evictable) + held == self._capacity, "blocks lost or duplicated"
            assert self._total_alloc - self._total_dealloc == self._num_allocated
            assert self._peak >= self._num_allocated
            assert self._num_cached == sum(self._cached), "cached-block counter drifted"

    def __repr__(self) -> str:
        return (f"BlockPool(num_blocks={self.num_blocks}, capacity={self._capacity}, "
                f"allocated={self._num_allocated}, free={len(self._free)}, evictable={len(self._evictable)})")


#: ROCmForge's name.
PhysicalBlockPool = BlockPool
