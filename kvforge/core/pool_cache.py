"""Cached blocks of the block pool: the flags, the LRU of evictable blocks, eviction.

A block registered in a prefix index is *cached*. When its reference count
drops to zero it is not freed but queued as *evictable*, in
least-recently-released order (an ``OrderedDict``: O(1) queue, removal and
membership). Allocation evicts from the front of the queue only when the free
stack is empty, and every eviction calls the pool's ``on_evict`` (the prefix
index forgets the key). :class:`CachedBlocks` is that part of
:class:`~kvforge.core.pool.BlockPool`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

from kvforge.core.ids import as_block_id, block_id_list, check_block_ids
from kvforge.errors import InvalidBlockError

__all__ = ["CachedBlocks"]


class CachedBlocks:
    """Cached flags and the evictable queue of a :class:`~kvforge.core.pool.BlockPool` (a mixin)."""

    num_blocks: int
    _lock: threading.RLock
    _ref: list[int]
    _cached: bytearray
    _free: list[int]
    _evictable: OrderedDict[int, None]
    _num_cached: int
    _evictions: int
    on_evict: Callable[[int], None] | None

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

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is registered in a prefix index."""
        return bool(self._cached[as_block_id(block_id, self.num_blocks)])

    def mark_cached(self, block_id: int) -> None:
        """Mark a held block as cached: at zero references it becomes evictable."""
        with self._lock:
            if type(block_id) is not int or not 0 <= block_id < self.num_blocks:
                block_id = as_block_id(block_id, self.num_blocks)
            if self._ref[block_id] <= 0:
                raise InvalidBlockError(f"cannot cache block {block_id}: it is not held")
            if not self._cached[block_id]:
                self._num_cached += 1
            self._cached[block_id] = 1

    def mark_cached_many(self, block_ids: Sequence[int]) -> None:
        """:meth:`mark_cached` for each block, under one lock; all or nothing."""
        with self._lock:
            ref, cached = self._ref, self._cached
            if type(block_ids) is not list or not all(type(b) is int for b in block_ids):
                block_ids = block_id_list(block_ids, "mark_cached_many() block ids")
            for b in block_ids:
                if not 0 <= b < self.num_blocks:
                    check_block_ids([b], self.num_blocks, "mark_cached_many() block ids")
                if ref[b] <= 0:
                    raise InvalidBlockError(f"cannot cache block {b}: it is not held")
            for b in block_ids:
                if not cached[b]:
                    self._num_cached += 1
                    cached[b] = 1

    def unmark_cached(self, block_id: int) -> None:
        """Forget that a block is cached; an evictable one is freed."""
        with self._lock:
            block_id = as_block_id(block_id, self.num_blocks)
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

    def evict_blocks(self, ids: Iterable[int]) -> None:
        """Evict these evictable blocks now (each must be cached with no reference)."""
        with self._lock:
            ids = block_id_list(ids, "evict_blocks() block ids", self.num_blocks)
            self.check_evictable(ids)
            for b in ids:
                del self._evictable[b]
                self._cached[b] = 0
                self._num_cached -= 1
                self._evictions += 1
                if self.on_evict is not None:
                    self.on_evict(b)
                self._free.append(b)

    def check_evictable(self, ids: list[int]) -> None:
        """Raise unless these ids (Python ints of the pool) are distinct evictable blocks."""
        seen: set[int] = set()
        for b in ids:
            if b in seen:
                raise InvalidBlockError(f"evict_blocks() got block {b} twice")
            seen.add(b)
            if b not in self._evictable:
                state = "held" if self._ref[b] else "free"
                raise InvalidBlockError(f"cannot evict block {b}: it is {state}, not evictable")

    def reclaim_unused_blocks(self) -> int:
        """Evict every evictable block to the free stack; return how many."""
        with self._lock:
            k = len(self._evictable)
            self._evict(k)
            return k
