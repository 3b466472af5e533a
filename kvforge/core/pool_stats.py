"""The block pool's counters and the metrics read from them.

:class:`PoolMetrics` is the part of :class:`~kvforge.core.pool.BlockPool` that
counts: blocks handed out and returned, the peak, evictions, refused
allocations, compactions; the blocks free, evictable and held now; and the
metrics over the pool's state: high-water mark, external fragmentation,
block-granular efficiency, host bytes. The allocation paths bump the
counters in place (plain attributes: the decode step pays nothing for the
split); :attr:`PoolMetrics.stats` reads them all at once, under the pool's
lock, into an :class:`~kvforge.core.usage.AllocationStats`.
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict

from kvforge.core.ids import as_int, as_real
from kvforge.core.usage import AllocationStats
from kvforge.errors import InvalidBlockError

__all__ = ["PoolMetrics"]


class PoolMetrics:
    """Counters and metrics of a :class:`~kvforge.core.pool.BlockPool` (a mixin: the
    pool's state below is set by the pool; the counters by :meth:`_init_counters`)."""

    num_blocks: int
    _capacity: int
    _lock: threading.RLock
    _ref: list[int]
    _cached: bytearray
    _free: list[int]
    _evictable: OrderedDict[int, None]
    _high: int

    def _init_counters(self) -> None:
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
    def num_cached_blocks(self) -> int:
        """Blocks marked cached (registered in a prefix index), held or evictable."""
        return self._num_cached

    @property
    def num_allocated_blocks(self) -> int:
        """Blocks with a positive reference count."""
        return self._num_allocated

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
        """Count a compaction (called by the storage layer that performed it): when
        (ms since the epoch) and how long it took, blocks moved, device bytes handed back."""
        when_ms = as_real(when_ms, "record_compaction() when_ms", InvalidBlockError, low=0.0)
        duration_ms = as_real(duration_ms, "record_compaction() duration_ms", InvalidBlockError, low=0.0)
        blocks_moved = as_int(blocks_moved, "record_compaction() blocks_moved", InvalidBlockError)
        bytes_returned = as_int(bytes_returned, "record_compaction() bytes_returned", InvalidBlockError)
        with self._lock:
            self._compactions += 1
            self._last_compaction_ms = when_ms
            self._last_compaction_duration_ms = duration_ms
            self._blocks_moved += blocks_moved
            self._bytes_returned += bytes_returned

    def record_bytes_returned(self, num_bytes: int) -> None:
        """Count device bytes handed back outside a compaction (e.g. a shrink)."""
        num_bytes = as_int(num_bytes, "record_bytes_returned() num_bytes", InvalidBlockError)
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
