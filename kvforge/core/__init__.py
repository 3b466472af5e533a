"""The bookkeeping layer: block ids, reference counts, block tables, prefix keys.

Pure Python and numpy: it never imports torch or triton, so it loads fast,
tests without a device, and serves engines that bring their own kernels.

- :class:`BlockPool` (``pool``): reference-counted block ids and the free stack; its
  cached blocks and LRU (``pool_cache``), capacity line and moves (``pool_elastic``),
  counters (``pool_stats``);
- :class:`PrefixIndex` (``prefix``): full blocks keyed by a chained hash of their tokens
  (``keys``: the hash, salts, key checks);
- :class:`BlockTables` (``tables``): per-sequence rows of block ids and token counts
  (``rows``), the token id of every written slot (``slots``), the batched views
  (``steps``: :class:`StepView`), the append path (``append_plan``) and the tokens
  whose ids come later, with truncation (``uncommitted``);
- :class:`BlockManager` (``manager``): sequences over the three, fork, free, views;
  admission with prefix reuse (``admission``), appends with copy-on-write (``appends``),
  slots reserved before their ids, committing the ids, truncation (``reservations``),
  each sequence's key chain (``chains``), the live sequence ids and their rows (``sequences``);
- :class:`HostTier` (``host_tier``): which blocks live on the host, on the device or
  both; spills, one LRU across tiers; swapping sequences out and in (``swap``);
- :class:`BlockUsage` (``usage``): token and block counts, internal fragmentation;
- :func:`plan_compaction` (``compaction``): the fewest moves that pack the pool;
- ``ids``: the validation of counts, block ids and token ids every call shares: every
  public call checks all of its arguments before it changes anything.
"""
from __future__ import annotations

from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.core.host_tier import HostTier, HostTierStats, NullHostTier, SwappedSequence
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
    "HostTier",
    "HostTierStats",
    "NullHostTier",
    "NullPrefixIndex",
    "PhysicalBlockPool",
    "PrefixIndex",
    "PrefixStats",
    "SequenceBlockTable",
    "StepView",
    "SwappedSequence",
    "blocks_for_tokens",
    "plan_compaction",
]
