"""The block pool's capacity line and compaction moves.

Ids ``0..capacity-1`` of a pool are backed by storage. :meth:`ElasticPool.grow`
backs more of them (the storage layer added a chunk) and puts them *below*
the older free ids on the free stack, so they are used last and the pool's
high-water mark keeps following its peak occupancy; :meth:`ElasticPool.shrink`
gives back a free tail. Compaction packs :meth:`ElasticPool.held_blocks`
(:meth:`ElasticPool.live_blocks` those referenced), then
:meth:`ElasticPool.relocate` moves ownership of blocks ``src -> dst`` after
their data was copied, and :meth:`ElasticPool.sort_free_list` puts the lowest
free ids on top again.
:class:`ElasticPool` is that part of :class:`~kvforge.core.pool.BlockPool`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Collection, Sequence

from kvforge.core.ids import as_int, move_list
from kvforge.errors import InvalidBlockError

__all__ = ["ElasticPool"]


class ElasticPool:
    """Grow, shrink and relocate for a :class:`~kvforge.core.pool.BlockPool` (a mixin)."""

    num_blocks: int
    _capacity: int
    _lock: threading.RLock
    _ref: list[int]
    _cached: bytearray
    _free: list[int]
    _evictable: OrderedDict[int, None]
    _high: int

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

    def sort_free_list(self) -> None:
        """Reorder the free stack so the lowest ids are handed out first."""
        with self._lock:
            self._free.sort(reverse=True)

    sort_free_lists = sort_free_list

    def grow(self, new_capacity: int) -> None:
        """Back ids ``capacity..new_capacity-1`` and add them to the free stack (below older ones)."""
        with self._lock:
            new_capacity = as_int(new_capacity, "grow() new_capacity", InvalidBlockError)
            if not self._capacity <= new_capacity <= self.num_blocks:
                raise InvalidBlockError(f"cannot grow from {self._capacity} to new_capacity={new_capacity} "
                                        f"blocks (max {self.num_blocks})")
            new = list(range(new_capacity - 1, self._capacity - 1, -1))
            self._free[:0] = new  # bottom of the stack: used after the older free blocks
            self._capacity = new_capacity

    def shrink(self, new_capacity: int) -> None:
        """Stop backing ids ``new_capacity..capacity-1``; each must be free."""
        with self._lock:
            new_capacity = as_int(new_capacity, "shrink() new_capacity", InvalidBlockError)
            if new_capacity > self._capacity:
                raise InvalidBlockError(f"cannot shrink from {self._capacity} to new_capacity={new_capacity} blocks")
            held = [b for b in range(new_capacity, self._capacity) if self._ref[b] or self._cached[b]]
            if held:
                raise InvalidBlockError(f"cannot shrink to {new_capacity} blocks: block {held[0]} "
                                        f"(and {len(held) - 1} more) above the line is in use")
            self._free = [b for b in self._free if b < new_capacity]
            self._capacity = new_capacity
            self._high = min(self._high, new_capacity)

    def check_moves(self, moves: Sequence[tuple[int, int]], *, freed: Collection[int] = (),
                    taken: Collection[int] = ()) -> list[tuple[int, int]]:
        """The moves as ``(src, dst)`` pairs of Python ints, checked as :meth:`relocate`
        checks them (each ``dst`` free and below the capacity, each ``src`` held or
        cached, no id twice among the sources or the destinations); changes nothing.

        A later phase of a compaction is checked against the pool as the earlier
        phases leave it: ids in ``freed`` count as free, ids in ``taken`` as held."""
        pairs = move_list(moves, self.num_blocks)
        ref, cached = self._ref, self._cached
        srcs: set[int] = set()
        dsts: set[int] = set()
        for src, dst in pairs:
            if src in srcs or dst in dsts:
                twice, role = (src, "source") if src in srcs else (dst, "destination")
                raise InvalidBlockError(f"moves name block {twice} twice as a {role}")
            srcs.add(src)
            dsts.add(dst)
            dst_held = (dst in taken or ref[dst] or cached[dst]) and dst not in freed
            if dst_held or dst >= self._capacity:
                why = "held" if dst_held else f"beyond the capacity {self._capacity}"
                raise InvalidBlockError(f"cannot move block {src} to {dst}: {dst} is {why}, not free")
            if not ((src in taken or ref[src] or cached[src]) and src not in freed):
                raise InvalidBlockError(f"cannot move block {src} to {dst}: {src} is free")
        return pairs

    def relocate(self, moves: Sequence[tuple[int, int]]) -> None:
        """Move ownership ``src -> dst`` for each pair (compaction): ``dst`` must be
        free and ``src`` held; reference counts and cached flags follow."""
        with self._lock:
            moves = self.check_moves(moves)
            dsts = {d for _, d in moves}
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
