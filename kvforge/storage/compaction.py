"""Compaction of a cache's storage: move blocks down, rewrite the bookkeeping, hand chunks back.

The plan is the bookkeeping's (:func:`kvforge.core.plan_compaction`: the
fewest moves that pack live blocks into ids ``0..k-1``, cached blocks nobody
references right above them). Storage carries it out: evict the cached blocks
the plan drops, copy the live blocks (one batched
:func:`~kvforge.kernels.copy_blocks`), copy the kept cached blocks (a second),
then rewrite every block table, the prefix index and the free list, and
release the chunks above the highest block in use, so the device's free
memory grows by what was released. See ``docs/compaction.md``.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvforge.storage.cache import KVCache

__all__ = ["compact", "releasable_chunks", "release_unused_chunks"]

log = logging.getLogger(__name__)


def compact(cache: KVCache, *, release: bool = True, keep_cached: bool = True) -> int:
    """Compact ``cache`` (see :meth:`KVCache.compact_cache`); return the bytes released.

    Copies never lose data: no block a live table points to is written before
    the move that vacates it is committed. If the first copy (live blocks) fails,
    the tables still point at the sources and only the planned evictions of
    cached blocks have happened; if the second (cached blocks) fails, the live
    blocks are packed and the cached ones stay where they were. Either way the
    error is re-raised and every sequence's keys and values are intact.
    """
    start = time.perf_counter()
    pool = cache.pool
    keep = None
    if not keep_cached:
        keep = max(cache.min_chunks, math.ceil(pool.num_allocated_blocks / cache.chunk_blocks)) * cache.chunk_blocks
    manager = cache.manager
    plan = manager.plan_compaction(keep_blocks=keep)
    # Evicting first is safe (it drops cache entries, never live data), and it means a
    # copy that raises leaves no cache entry pointing at an overwritten block.
    pool.evict_blocks(plan.evict)
    manager.flush_spills()  # evicted blocks spill to the host tier before anything overwrites them
    # Phase 1 copies live blocks into holes (free or just evicted ids): if it raises
    # partway, only holes were written and every table still points at its sources.
    if plan.moves:
        cache.copy_blocks(plan.moves)
    # The live moves are committed before phase 2 copies cached blocks into ids that
    # phase 1 vacated, so no id a live table points to is ever overwritten. If phase 2
    # raises, the cached blocks stay where they were (their sources are never
    # destinations), the vacated ids were free, and the cache is consistent, only
    # less packed.
    manager.relocate(plan.moves)
    moved = dict(plan.moves)
    try:
        if plan.cached_moves:
            cache.copy_blocks(plan.cached_moves)
        manager.relocate(plan.cached_moves)
        moved.update(plan.cached_moves)
    finally:
        pool.sort_free_list()
        if moved:
            cache.notify_relocation(moved)
    released = release_unused_chunks(cache) if release else 0
    if cache.device.type == "cuda":
        torch.cuda.synchronize(cache.device)
    duration = (time.perf_counter() - start) * 1e3
    pool.record_compaction(time.time() * 1e3, duration, plan.num_moves, 0)
    pool.record_bytes_returned(released)
    log.info("compaction moved %d blocks, evicted %d and released %d bytes in %.2f ms",
             plan.num_moves, len(plan.evict), released, duration)
    return released


def releasable_chunks(cache: KVCache) -> int:
    """Chunks a compaction would hand back now (the blocks in use, packed, need fewer)."""
    in_use = cache.pool.num_allocated_blocks + cache.pool.num_evictable_blocks
    return cache.num_chunks - max(cache.min_chunks, math.ceil(in_use / cache.chunk_blocks))


def release_unused_chunks(cache: KVCache) -> int:
    """Drop the chunks above the highest block in use (keeping ``min_chunks``);
    return the bytes handed back to the device."""
    keep = max(cache.min_chunks, math.ceil(cache.pool.high_water_mark() / cache.chunk_blocks))
    if keep >= cache.num_chunks:
        return 0
    cache.pool.shrink(min(keep * cache.chunk_blocks, cache.config.num_blocks))
    return cache.storage.drop_chunks_from(keep)
