"""Compaction planner: the fewest block moves that pack live blocks low.

Pure bookkeeping. Live blocks (referenced by a sequence) must keep their
data; cached blocks that nobody references (evictable prefix-cache blocks)
are worth keeping but may be dropped. With ``k`` live blocks,
:func:`plan_compaction` moves every live block at or above ``k`` into an id
below ``k`` that no live block holds: the fewest moves that leave ids
``0..k-1`` exactly the live blocks (each live block above the line must
move, none below it needs to). A cached block sitting in such a destination
is evicted.

The cached blocks that are kept (the most recently released ones, as many as
fit below ``keep_blocks``; default: all) then fill ids ``k..k+m-1``. Their
moves form a second phase: some of their destinations are ids the live
blocks leave in the first. Within a phase every destination is free (or
evicted) and no source is a destination, so each phase is one batched copy.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from kvforge.core.ids import as_int, as_real, block_id_list
from kvforge.errors import ConfigError, InvalidBlockError

__all__ = ["COMPACTION_EFFICIENCY_LIMIT", "CompactionPlan", "plan_compaction", "should_compact"]

MAX_BLOCKS = 2**31  # as the pool's (block tables are int32)


class CompactionPlan(NamedTuple):
    """What a compaction does, in order: evict ``evict``, copy ``moves`` (live
    blocks), then copy ``cached_moves``; afterwards ids ``0..packed_blocks-1``
    hold every block kept."""

    moves: list[tuple[int, int]]
    packed_blocks: int
    evict: list[int] = []
    cached_moves: list[tuple[int, int]] = []

    @property
    def num_moves(self) -> int:
        """How many blocks move (both phases)."""
        return len(self.moves) + len(self.cached_moves)

    @property
    def all_moves(self) -> list[tuple[int, int]]:
        """Both phases' moves (no block moves twice)."""
        return self.moves + self.cached_moves


def plan_compaction(held: Sequence[int], capacity: int, *, evictable: Sequence[int] = (),
                    keep_blocks: int | None = None) -> CompactionPlan:
    """Plan moves that pack the ``held`` (live) ids into ``0..len(held)-1`` and the
    kept ``evictable`` ids (given oldest first) right above them, below ``keep_blocks``.

    ``held`` and ``evictable`` must be distinct ids below ``capacity``; anything else
    raises :class:`~kvforge.errors.InvalidBlockError` (a ``ValueError``) naming the id.
    """
    capacity = as_int(capacity, "capacity", InvalidBlockError, high=MAX_BLOCKS)
    held = block_id_list(held, "held", capacity)
    cached = block_id_list(evictable, "evictable", capacity)
    if keep_blocks is not None:
        keep_blocks = as_int(keep_blocks, "keep_blocks", InvalidBlockError)
    live: set[int] = set()
    for b in held:
        if b in live:
            raise InvalidBlockError(f"held names block {b} twice")
        live.add(b)
    cached_set: set[int] = set()
    for b in cached:
        if b in cached_set or b in live:
            raise InvalidBlockError(f"evictable names block {b} " + ("twice" if b in cached_set else "that is held"))
        cached_set.add(b)
    k = len(live)
    sources = sorted((b for b in live if b >= k), reverse=True)
    holes = [b for b in range(k) if b not in live]
    assert len(sources) == len(holes)
    moves = list(zip(sources, holes))
    evict = [b for b in holes if b in cached_set]  # cached blocks in the way of live ones
    in_the_way = set(evict)
    remaining = [b for b in cached if b not in in_the_way]  # oldest first
    limit = capacity if keep_blocks is None else max(k, min(keep_blocks, capacity))
    n_keep = min(len(remaining), limit - k)
    evict += remaining[: len(remaining) - n_keep]
    kept = remaining[len(remaining) - n_keep:]
    region = range(k, k + n_keep)
    stay = {b for b in kept if k <= b < k + n_keep}
    movers = sorted((b for b in kept if b not in stay), reverse=True)
    slots = [b for b in region if b not in stay]  # free, evicted, or left by a live block in phase 1
    assert len(slots) == len(movers)
    return CompactionPlan(moves, k + n_keep, evict, list(zip(movers, slots)))


#: compaction is pointless while this share of the pool holds live keys/values
COMPACTION_EFFICIENCY_LIMIT = 0.7


def should_compact(fragmentation: float, efficiency: float, threshold: float,
                   releasable_chunks: int | None = None) -> bool:
    """The one compaction trigger (the cache's and the simulator's).

    Compact when external ``fragmentation`` exceeds ``threshold``, memory
    ``efficiency`` is below :data:`COMPACTION_EFFICIENCY_LIMIT`, and, where
    storage is released in chunks, packing would hand at least one back
    (``releasable_chunks``; None when the caller has no chunks). The ratios are numbers
    in ``[0, 1]`` (a threshold may be any finite number); anything else raises
    :class:`~kvforge.errors.ConfigError` naming the argument."""
    fragmentation = as_real(fragmentation, "fragmentation", ConfigError, low=0.0, high=1.0)
    efficiency = as_real(efficiency, "efficiency", ConfigError, low=0.0, high=1.0)
    threshold = as_real(threshold, "threshold", ConfigError)
    if releasable_chunks is not None:
        releasable_chunks = as_int(releasable_chunks, "releasable_chunks", ConfigError)
    if not (fragmentation > threshold and fragmentation > 0.0 and efficiency < COMPACTION_EFFICIENCY_LIMIT):
        return False
    return releasable_chunks is None or releasable_chunks > 0
