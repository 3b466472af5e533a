"""The bookkeeping layer: block ids, reference counts, block tables, prefix keys.

Pure Python and numpy: it never imports torch or triton, so it loads fast,
tests without a device, and serves engines that bring their own kernels.

- :class:`BlockPool` (``pool``): reference-counted block ids, free stack, LRU of cached blocks;
- :class:`PrefixIndex` (``prefix``): full blocks keyed by a chained hash of their tokens;
- :class:`BlockTables` (``tables``): per-sequence rows of block ids and token counts,
  the batched views (:class:`StepView`);
- :class:`BlockManager` (``manager``): sequences over the three, prefix reuse, fork,
  copy-on-write, one append for one sequence or a batch;
- :class:`BlockUsage` (``usage``): token and block counts, internal fragmentation;
- :func:`plan_compaction` (``compaction``): the fewest moves that pack the pool;
- ``ids``: the validation of counts, block ids and token ids every call shares.
"""
from __future__ import annotations

from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.core.manager import AddSequenceResult, BlockManager, SequenceBlockTable
from kvforge.core.pool import AllocationStats, BlockPool, PhysicalBlockPool
from kvforge.core.prefix import BlockKey, NullPrefixIndex, PrefixIndex, PrefixStats
from kvforge.core.tables import BlockTables, StepView, blocks_for_tokens
from kvforge.core.usage import BlockUsage

__all__ = [
    "AddSequenceResult",
    "AllocationStats",
    "BlockKey",
    "BlockManager",
    "BlockPool",
    "BlockTables",
    "BlockUsage",
    "CompactionPlan",
    "NullPrefixIndex",
    "PhysicalBlockPool",
    "PrefixIndex",
    "PrefixStats",
    "SequenceBlockTable",
    "StepView",
    "blocks_for_tokens",
    "plan_compaction",
]
