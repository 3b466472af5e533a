"""Compaction planner: the fewest block moves that pack live blocks low.

Pure bookkeeping. Live blocks (referenced by a sequence) must keep their
data; cached blocks that nobody references (evictable prefix-cache blocks)
are worth keeping but may be dropped. With ``k`` live blocks,
:func:`plan_compaction` moves every live block at or above ``k`` into an id
below ``k`` that no live block holds: the fewest moves that leave ids
``0..k-1`` exactly the live blocks (each live block above the line must move,
none below it needs to). An evictable block sitting in such a destination is
evicted.

Cached blocks are then packed into the lowest ids above the live ones that
no live block holds before the copy, keeping the most recently released ones
that fit below ``keep_blocks`` (default: all of them); the rest are evicted.
Every destination is free (or evicted) before the copy and no source is also
a destination, so all moves run in one batched copy.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["CompactionPlan", "plan_compaction"]


class CompactionPlan(NamedTuple):
    """Moves ``(src, dst)``, blocks to evict first, and the ids in use afterwards
    (``0..packed_blocks-1`` hold every block that is kept)."""

    moves: list[tuple[int, int]]
    packed_blocks: int
    evict: list[int] = []

    @property
    def num_moves(self) -> int:
        """How many blocks move."""
        return len(self.moves)


def plan_compaction(held: Sequence[int], capacity: int, *, evictable: Sequence[int] = (),
                    keep_blocks: int | None = None) -> CompactionPlan:
    """Plan moves that pack the ``held`` (live) ids into ``0..len(held)-1`` and the
    ``evictable`` ids (oldest first) right above them, up to ``keep_blocks``.

    ``held`` and ``evictable`` must be distinct ids below ``capacity``.
    """
    live = set(held)
    k = len(live)
    if k != len(held):
        raise ValueError("held ids must be distinct")
    cached = list(evictable)
    cached_set = set(cached)
    if len(cached_set) != len(cached) or cached_set & live:
        raise ValueError("evictable ids must be distinct and not held")
    if any(not 0 <= b < capacity for b in live | cached_set):
        raise ValueError(f"ids must lie in [0, {capacity})")
    sources = sorted((b for b in live if b >= k), reverse=True)
    holes = [b for b in range(k) if b not in live]
    assert len(sources) == len(holes)
    moves = list(zip(sources, holes))
    evict = [b for b in holes if b in cached_set]  # cached blocks in the way of live ones
    in_the_way = set(evict)
    remaining = [b for b in cached if b not in in_the_way]  # oldest first
    limit = capacity if keep_blocks is None else max(k, min(keep_blocks, capacity))
    # the lowest ids above the live ones that no live block holds now (live blocks
    # leaving them are copied in this same launch, so their ids are not usable yet)
    usable = [b for b in range(k, limit) if b not in live]
    n_keep = min(len(remaining), len(usable))
    evict += remaining[: len(remaining) - n_keep]
    kept = remaining[len(remaining) - n_keep:]
    target = usable[:n_keep]
    target_set = set(target)
    stay = {b for b in kept if b in target_set}
    movers = sorted((b for b in kept if b not in stay), reverse=True)
    slots = [b for b in target if b not in stay]  # free, or held by a block evicted above
    assert len(slots) == len(movers)
    moves += list(zip(movers, slots))
    final = list(range(k)) + target
    return CompactionPlan(moves, (max(final) + 1) if final else 0, evict)
