"""Compaction planner: the fewest block moves that pack live blocks low.

Pure bookkeeping. Given the ids that hold data (referenced or cached) among
``capacity`` backed ids, :func:`plan_compaction` moves every held block at or
above ``k = len(held)`` into a free id below ``k``. That is the fewest moves
that leave ids ``0..k-1`` exactly the held ones: each held block above the
line must move, and no block below it needs to. Sources are paired
highest-first with destinations lowest-first.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["CompactionPlan", "plan_compaction"]


class CompactionPlan(NamedTuple):
    """Moves ``(src, dst)``; afterwards ids ``0..packed_blocks-1`` hold all data."""

    moves: list[tuple[int, int]]
    packed_blocks: int

    @property
    def num_moves(self) -> int:
        """How many blocks move."""
        return len(self.moves)


def plan_compaction(held: Sequence[int], capacity: int) -> CompactionPlan:
    """Plan moves that pack the ``held`` ids (distinct, below ``capacity``) into ``0..len(held)-1``."""
    k = len(held)
    held_set = set(held)
    if len(held_set) != k:
        raise ValueError("held ids must be distinct")
    if any(not 0 <= b < capacity for b in held_set):
        raise ValueError(f"held ids must lie in [0, {capacity})")
    sources = sorted((b for b in held_set if b >= k), reverse=True)
    holes = [b for b in range(k) if b not in held_set]
    assert len(sources) == len(holes)
    return CompactionPlan(list(zip(sources, holes)), k)
