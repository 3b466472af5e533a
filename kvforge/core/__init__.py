"""The bookkeeping layer: block ids, reference counts, block tables, prefix keys.

Pure Python and numpy: it never imports torch or triton, so it loads fast,
tests without a device, and serves engines that bring their own kernels.

- :class:`BlockPool`: reference-counted block ids, free stack, LRU of cached blocks;
- :class:`PrefixIndex`: full blocks keyed by a chained hash of their tokens;
- :class:`BlockManager`: per-sequence block tables over a pool, prefix reuse, fork,
  copy-on-write, batched decode-step calls;
- :func:`plan_compaction`: the fewest moves that pack the pool.
"""
from __future__ import annotations

from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.core.manager import AddSequenceResult, BlockManager, SequenceBlockTable
from kvforge.core.pool import AllocationStats, BlockPool, PhysicalBlockPool
from kvforge.core.prefix import BlockKey, NullPrefixIndex, PrefixIndex, PrefixStats

__all__ = [
    "AddSequenceResult",
    "AllocationStats",
    "BlockKey",
    "BlockManager",
    "BlockPool",
    "CompactionPlan",
    "NullPrefixIndex",
    "PhysicalBlockPool",
    "PrefixIndex",
    "PrefixStats",
    "SequenceBlockTable",
    "plan_compaction",
]
