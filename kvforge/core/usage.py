"""Usage metrics: the pool's and the prefix index's counters, the tables' token and
block counts, host bytes.

:class:`AllocationStats` is the pool's counters at one moment
(:attr:`~kvforge.core.pool.BlockPool.stats`), :class:`PrefixStats` the prefix
index's; :class:`BlockUsage` is computed from the public reads of
:class:`~kvforge.core.tables.BlockTables`, vectorised over every live row.
Shared blocks are counted once where a name says *distinct* and once per
sequence where it says *logical* (ARCHITECTURE.md, "Metrics that mean what
they say").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from kvforge.core.ids import SequenceRows
    from kvforge.core.pool import BlockPool
    from kvforge.core.prefix import PrefixIndex
    from kvforge.core.tables import BlockTables

__all__ = ["AllocationStats", "BlockUsage", "PrefixStats", "block_usage", "metadata_bytes", "num_live_tokens"]


@dataclass(frozen=True, slots=True)
class AllocationStats:
    """A snapshot of a pool's counters (block counts unless named otherwise).

    ``total_allocations`` / ``total_deallocations`` count blocks handed out and
    blocks whose reference count returned to zero; ``current_allocations`` are
    blocks with a positive reference count and ``peak_allocations`` the most
    there ever were at once. ``high_water_mark`` is one past the highest id in
    use now. Compaction fields are filled in by the storage layer.
    """

    num_blocks: int
    capacity_blocks: int
    total_allocations: int
    total_deallocations: int
    current_allocations: int
    peak_allocations: int
    free_blocks: int
    evictable_blocks: int
    cached_blocks: int
    num_evictions: int
    failed_allocations: int
    high_water_mark: int
    compaction_count: int
    last_compaction_ms: float
    last_compaction_duration_ms: float
    total_blocks_moved: int
    total_bytes_returned: int

    def to_dict(self) -> dict[str, float]:
        """The snapshot as a plain dict (for JSON)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PrefixStats:
    """Counters of a prefix index (:meth:`~kvforge.core.prefix.PrefixIndex.stats`).
    ``hit_rate`` = hit tokens / queried tokens; ``hit_tokens`` counts hits on either
    tier, ``host_hit_tokens`` those served from the host tier, ``remote_hit_tokens``
    those copied in from a remote tier (shared with other instances)."""

    queries: int
    query_tokens: int
    hit_tokens: int
    hit_rate: float
    cached_blocks: int
    evictable_blocks: int
    evictions: int
    registered_blocks: int
    host_hit_tokens: int = 0
    remote_hit_tokens: int = 0

    def to_dict(self) -> dict[str, float]:
        """The snapshot as a plain dict."""
        return asdict(self)


class BlockUsage(NamedTuple):
    """Token and block counts over every live sequence.

    ``num_live_tokens`` and ``num_logical_blocks`` sum over sequences (a block
    shared by two counts twice); ``num_distinct_blocks`` counts each allocated
    block once, and ``num_used_slots`` the token slots of those blocks that
    hold a token of any sequence sharing them.
    """

    num_sequences: int
    num_live_tokens: int
    num_logical_blocks: int
    num_distinct_blocks: int
    num_used_slots: int
    block_size: int

    @property
    def num_reserved_slots(self) -> int:
        """Token slots of the distinct allocated blocks."""
        return self.num_distinct_blocks * self.block_size

    @property
    def internal_fragmentation(self) -> float:
        """Reserved slots that hold no token, over all reserved slots (0 when none are)."""
        reserved = self.num_reserved_slots
        return 1.0 - self.num_used_slots / reserved if reserved else 0.0


def num_live_tokens(tables: BlockTables) -> int:
    """Tokens with a reserved slot, summed over the live rows."""
    return int(tables.num_tokens_of(tables.live_rows()).sum())


def block_usage(tables: BlockTables) -> BlockUsage:
    """The :class:`BlockUsage` of every live row of ``tables``."""
    rows = tables.live_rows()
    bs = tables.block_size
    ntok = tables.num_tokens_of(rows)
    nblk = tables.num_blocks_of(rows)
    table = tables.block_table_array(rows)
    # tokens held by entry j of a row: the block's share of the row's tokens
    used = np.clip(ntok[:, None] - bs * np.arange(table.shape[1])[None, :], 0, bs)
    held = table >= 0
    ids, used = table[held].astype(np.int64), used[held]
    order = np.lexsort((used, ids))
    ids, used = ids[order], used[order]
    last = np.ones(len(ids), dtype=bool)  # the most used entry of each distinct block
    last[:-1] = ids[1:] != ids[:-1]
    return BlockUsage(len(rows), int(ntok.sum()), int(nblk.sum()), int(np.count_nonzero(last)),
                      int(used[last].sum()), bs)


def metadata_bytes(*owners: BlockTables | BlockPool | PrefixIndex | SequenceRows) -> int:
    """Host bytes of the bookkeeping: the sum of each owner's ``metadata_bytes()``."""
    return int(sum(owner.metadata_bytes() for owner in owners))
