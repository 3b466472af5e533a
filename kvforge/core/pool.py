"""The block pool: physical block ids, reference counts and allocation statistics.

Pure bookkeeping (no torch): the pool hands out integer block ids; the
storage layer maps an id to device memory.

Free-block policy. Free ids sit on a stack (LIFO). The stack starts in
ascending order with the lowest id on top, so a pool that never needed more
than ``k`` blocks at once only ever touched ids ``0..k-1`` (the high-water
mark equals peak occupancy), and a block freed a moment ago (warm in caches)
is the next one handed out. Both operations are O(1) per block. Holes that
open below live blocks are closed by compaction, after which
:meth:`BlockPool.sort_free_list` puts the lowest free ids back on top.

Cached blocks. A block registered in a prefix index is *cached*. When its
reference count drops to zero it is not freed but queued as *evictable*, in
least-recently-released order. Blocks released by one :meth:`BlockPool.free`
call are queued (and, when uncached, pushed on the free stack) in list order,
whichever path the call takes; :meth:`~kvforge.core.manager.BlockManager.free_sequence`
passes a sequence's blocks tail first, so its last block is evicted before its
first and shared prefixes stay longest. Allocation takes truly
free blocks first and evicts the oldest evictable block only when the free
stack is empty. :meth:`BlockPool.incref` on an evictable block revives it.
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import numpy as np

from kvforge.core.ids import block_id_list, is_int
from kvforge.core.usage import AllocationStats
from kvforge.errors import InvalidBlockError, OutOfBlocksError

__all__ = ["AllocationStats", "BlockPool", "PhysicalBlockPool"]


class BlockPool:
    """Reference-counted block ids ``0..num_blocks-1``.

    ``capacity`` of them (all, unless the pool was created smaller) are backed
    by storage; :meth:`grow` and :meth:`shrink` move that line for an elastic
    pool. Thread-safe: every mutating method holds one (re-entrant) lock for its
    whole call, so concurrent callers never lose or duplicate a block; the
    counters read without the lock are snapshots.
    Every failing call raises and changes nothing.
    """

    def __init__(self, num_blocks: int, capacity: int | None = None) -> None:
        if not is_int(num_blocks) or num_blocks <= 0:
            raise InvalidBlockError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        capacity = num_blocks if capacity is None else capacity
        if not 0 <= capacity <= num_blocks:
            raise InvalidBlockError(f"capacity={capacity} must lie in [0, num_blocks={num_blocks}]")
        self.num_blocks = int(num_blocks)
        self._capacity = int(capacity)
        # re-entrant: eviction callbacks (prefix index, on_removed hooks) may read the pool
        self._lock = threading.RLock()
        self._ref = [0] * self.num_blocks
        self._cached = bytearray(self.num_blocks)
        self._free = list(range(self._capacity - 1, -1, -1))  # top of stack = lowest id
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._high = 0  # one past the highest id that may be held (lowered lazily)
        self.on_evict: Callable[[int], None] | None = None
        # counters
        self._num_allocated = 0  # blocks with ref > 0
        self._total_alloc = 0
        self._total_dealloc = 0
        self._peak = 0
        self._evictions = 0
        self._num_cached = 0  # blocks marked cached (kept as a counter: stats stays O(1))
        self._failed = 0
        self._compactions = 0
        self._last_compaction_ms = 0.0
        self._last_compaction_duration_ms = 0.0
        self._blocks_moved = 0
        self._bytes_returned = 0

    # ------------------------------------------------------------ allocation
    @property
    def capacity(self) -> int:
        """Blocks backed by storage now (ids ``0..capacity-1``)."""
        return self._capacity

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free stack (not counting evictable cached blocks)."""
        return len(self._free)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks with reference count zero, reusable after eviction."""
        return len(self._evictable)

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation may take now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_allocated_blocks(self) -> int:
        """Blocks with a positive reference count."""
        return self._num_allocated

    def can_allocate(self, n: int) -> bool:
        """Whether :meth:`allocate` of ``n`` blocks would succeed now."""
        if not is_int(n):
            raise InvalidBlockError(f"can_allocate() needs a block count, got {n!r}")
        return 0 <= n <= len(self._free) + len(self._evictable)

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
                if not is_int(n) or n < 0:
                    raise InvalidBlockError(f"allocate() needs a block count >= 0, got {n!r}")
                n = int(n)
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
        if not is_int(n) or n <= 0:
            raise InvalidBlockError(f"allocate_consecutive() needs a block count > 0, got {n!r}")
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
            ids = block_id_list(ids)
            self._check_ids(ids)
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
        when it is cached. Freeing a free, unknown or negative id raises
        :class:`InvalidBlockError` and changes nothing.
        """
        if type(ids) is not list:
            ids = block_id_list(ids)
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
                    for b in ids:
                        if ref[b] != 1 or cached[b]:
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
                        if ref[b] != 1:
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
        self._check_ids(ids)
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

    def _check_ids(self, ids: Iterable[int]) -> None:
        n = self.num_blocks
        for b in ids:
            if not is_int(b) or not 0 <= b < n:
                raise InvalidBlockError(f"block id {b!r} is not in this pool (ids 0..{n - 1})")

    def _evict(self, k: int) -> None:
        """Move the ``k`` least recently released evictable blocks to the free stack."""
        pop, cached, push, on_evict = self._evictable.popitem, self._cached, self._free.append, self.on_evict
        self._num_cached -= k
        for _ in range(k):
            b = pop(last=False)[0]
            cached[b] = 0
            self._evictions += 1
            if on_evict is not None:
                on_evict(b)
            push(b)

    # ----------------------------------------------------------- cached state
    def ref_count(self, block_id: int) -> int:
        """Current reference count of a block."""
        self._check_ids([block_id])
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is registered in a prefix index."""
        return bool(self._cached[block_id])

    def mark_cached(self, block_id: int) -> None:
        """Mark a held block as cached: at zero references it becomes evictable."""
        with self._lock:
            if type(block_id) is not int or not 0 <= block_id < self.num_blocks:
                self._check_ids([block_id])
            if self._ref[block_id] <= 0:
                raise InvalidBlockError(f"cannot cache block {block_id}: it is not held")
            if not self._cached[block_id]:
                self._num_cached += 1
            self._cached[block_id] = 1

    def mark_cached_many(self, block_ids: Sequence[int]) -> None:
        """:meth:`mark_cached` for each block, under one lock; all or nothing."""
        with self._lock:
            ref, cached = self._ref, self._cached
            for b in block_ids:
                if type(b) is not int or not 0 <= b < self.num_blocks:
                    self._check_ids([b])
                if ref[b] <= 0:
                    raise InvalidBlockError(f"cannot cache block {b}: it is not held")
            for b in block_ids:
                if not cached[b]:
                    self._num_cached += 1
                    cached[b] = 1

    def unmark_cached(self, block_id: int) -> None:
        """Forget that a block is cached; an evictable one is freed."""
        with self._lock:
            if not self._cached[block_id]:
                return
            self._cached[block_id] = 0
            self._num_cached -= 1
            if block_id in self._evictable:
                del self._evictable[block_id]
                self._free.append(block_id)

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks in eviction order (next evicted first)."""
        with self._lock:
            return list(self._evictable)

    def free_blocks(self) -> list[int]:
        """Free ids in hand-out order (next handed out first)."""
        with self._lock:
            return self._free[::-1]

    def held_blocks(self) -> list[int]:
        """Ids that hold data now, ascending: referenced or cached (evictable)."""
        with self._lock:
            ref, cached = self._ref, self._cached
            return [b for b in range(self._capacity) if ref[b] or cached[b]]

    def live_blocks(self) -> list[int]:
        """Ids with a positive reference count, ascending."""
        with self._lock:
            ref = self._ref
            return [b for b in range(self._capacity) if ref[b]]

    def evict_blocks(self, ids: Iterable[int]) -> None:
        """Evict these evictable blocks now (each must be cached with no reference)."""
        with self._lock:
            ids = block_id_list(ids)
            if len(set(ids)) != len(ids):
                raise InvalidBlockError(f"evict_blocks() got a block twice: {ids!r}")
            for b in ids:
                if b not in self._evictable:
                    raise InvalidBlockError(f"cannot evict block {b}: it is not evictable")
            for b in ids:
                del self._evictable[b]
                self._cached[b] = 0
                self._num_cached -= 1
                self._evictions += 1
                if self.on_evict is not None:
                    self.on_evict(b)
                self._free.append(b)

    def reclaim_unused_blocks(self) -> int:
        """Evict every evictable block to the free stack; return how many."""
        with self._lock:
            k = len(self._evictable)
            self._evict(k)
            return k

    def sort_free_list(self) -> None:
        """Reorder the free stack so the lowest ids are handed out first."""
        with self._lock:
            self._free.sort(reverse=True)

    sort_free_lists = sort_free_list

    # ------------------------------------------------------------ elasticity
    def grow(self, new_capacity: int) -> None:
        """Back ids ``capacity..new_capacity-1`` and add them to the free stack (below older ones)."""
        with self._lock:
            if not self._capacity <= new_capacity <= self.num_blocks:
                raise InvalidBlockError(f"cannot grow from {self._capacity} to {new_capacity} blocks "
                                        f"(max {self.num_blocks})")
            new = list(range(new_capacity - 1, self._capacity - 1, -1))
            self._free[:0] = new  # bottom of the stack: used after the older free blocks
            self._capacity = new_capacity

    def shrink(self, new_capacity: int) -> None:
        """Stop backing ids ``new_capacity..capacity-1``; each must be free."""
        with self._lock:
            if not 0 <= new_capacity <= self._capacity:
                raise InvalidBlockError(f"cannot shrink from {self._capacity} to {new_capacity} blocks")
            held = [b for b in range(new_capacity, self._capacity) if self._ref[b] or self._cached[b]]
            if held:
                raise InvalidBlockError(f"cannot shrink to {new_capacity} blocks: block {held[0]} "
                                        f"(and {len(held) - 1} more) above the line is in use")
            self._free = [b for b in self._free if b < new_capacity]
            self._capacity = new_capacity
            self._high = min(self._high, new_capacity)

    def relocate(self, moves: Sequence[tuple[int, int]]) -> None:
        """Move ownership ``src -> dst`` for each pair (compaction): ``dst`` must be
        free and ``src`` held; reference counts and cached flags follow."""
        with self._lock:
            for src, dst in moves:
                self._check_ids([src, dst])
                if self._ref[dst] or self._cached[dst] or dst >= self._capacity:
                    raise InvalidBlockError(f"cannot move block {src} to {dst}: {dst} is not free")
                if not (self._ref[src] or self._cached[src]):
                    raise InvalidBlockError(f"cannot move block {src}: it is free")
            dsts = {d for _, d in moves}
            if len(dsts) != len(moves) or len({s for s, _ in moves}) != len(moves):
                raise InvalidBlockError(f"relocate() got a block twice among the moves {list(moves)!r}")
            if dsts:
                self._high = max(self._high, max(dsts) + 1)
            evict_pos = {b: i for i, b in enumerate(self._evictable)}
            order = list(self._evictable)
            for src, dst in moves:
                self._ref[dst], self._ref[src] = self._ref[src], 0
                self._cached[dst], self._cached[src] = self._cached[src], 0
                if src in evict_pos:
                    order[evict_pos[src]] = dst
            self._evictable = OrderedDict.fromkeys(order)
            srcs = [s for s, _ in moves]
            self._free = [b for b in self._free if b not in dsts] + srcs

    # --------------------------------------------------------------- metrics
    def high_water_mark(self) -> int:
        """One past the highest id that is held or evictable (0 when none is)."""
        with self._lock:
            return self._lower_high()

    def _lower_high(self) -> int:
        ref, cached = self._ref, self._cached
        h = self._high
        while h > 0 and ref[h - 1] == 0 and not cached[h - 1]:
            h -= 1
        self._high = h
        return h

    def fragmentation_ratio(self) -> float:
        """External fragmentation: free blocks below the highest referenced block
        (they cannot be handed back), over all free blocks; 0 for an empty or a
        perfectly packed pool.

        Evictable cached blocks count as free here: nothing references them and
        compaction may drop them (it keeps those that fit above the live ones)."""
        with self._lock:
            ref = self._ref
            h = self._lower_high()
            while h > 0 and ref[h - 1] == 0:
                h -= 1
            live = self._num_allocated
            free = self._capacity - live
            return (h - live) / free if free > 0 else 0.0

    def memory_efficiency(self) -> float:
        """Blocks held (reference count > 0) over blocks backed by storage.

        Block-granular; :class:`~kvforge.storage.cache.KVCache` reports the token-exact
        figure (bytes of live keys/values over bytes on the device)."""
        return self._num_allocated / self._capacity if self._capacity else 0.0

    def metadata_bytes(self) -> int:
        """Host bytes of the per-block lists (reference counts, cached flags, free stack, LRU)."""
        return (sys.getsizeof(self._ref) + sys.getsizeof(self._free) + sys.getsizeof(self._cached)
                + sys.getsizeof(self._evictable))

    def reset_peak(self) -> None:
        """Start a new measurement window: ``peak_allocations`` becomes the current count."""
        with self._lock:
            self._peak = self._num_allocated

    def record_compaction(self, when_ms: float, duration_ms: float, blocks_moved: int,
                          bytes_returned: int) -> None:
        """Count a compaction (called by the storage layer that performed it)."""
        with self._lock:
            self._compactions += 1
            self._last_compaction_ms = when_ms
            self._last_compaction_duration_ms = duration_ms
            self._blocks_moved += blocks_moved
            self._bytes_returned += bytes_returned

    def record_bytes_returned(self, num_bytes: int) -> None:
        """Count device bytes handed back outside a compaction (e.g. a shrink)."""
        with self._lock:
            self._bytes_returned += num_bytes

    @property
    def stats(self) -> AllocationStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return AllocationStats(
                num_blocks=self.num_blocks,
                capacity_blocks=self._capacity,
                total_allocations=self._total_alloc,
                total_deallocations=self._total_dealloc,
                current_allocations=self._num_allocated,
                peak_allocations=self._peak,
                free_blocks=len(self._free),
                evictable_blocks=len(self._evictable),
                cached_blocks=self._num_cached,
                num_evictions=self._evictions,
                failed_allocations=self._failed,
                high_water_mark=self._lower_high(),
                compaction_count=self._compactions,
                last_compaction_ms=self._last_compaction_ms,
                last_compaction_duration_ms=self._last_compaction_duration_ms,
                total_blocks_moved=self._blocks_moved,
                total_bytes_returned=self._bytes_returned,
            )

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
