"""kvforge: a paged KV cache for LLM inference on PyTorch.

Public face of the package; see ``ARCHITECTURE.md`` for the layers.
"""
from __future__ import annotations

from kvforge.block_table import AddSequenceResult, BlockManager, SequenceBlockTable
from kvforge.cache import KVCache, KvCache
from kvforge.compaction import CompactionPlan, plan_compaction
from kvforge.config import CacheConfig, CachePreset, format_bytes, parse_bytes
from kvforge.errors import (
    ConfigError,
    InvalidBlockError,
    KernelError,
    KVForgeError,
    ModelError,
    OutOfBlocksError,
    SequenceError,
    TraceError,
)
from kvforge.pool import AllocationStats, BlockPool, PhysicalBlockPool
from kvforge.prefix import NullPrefixIndex, PrefixIndex, PrefixStats
from kvforge.profile import MemoryProfile

__version__ = "0.1.0"

__all__ = [
    "AddSequenceResult",
    "AllocationStats",
    "BlockManager",
    "BlockPool",
    "CacheConfig",
    "CompactionPlan",
    "KVCache",
    "KvCache",
    "MemoryProfile",
    "CachePreset",
    "ConfigError",
    "InvalidBlockError",
    "KVForgeError",
    "KernelError",
    "ModelError",
    "NullPrefixIndex",
    "OutOfBlocksError",
    "PhysicalBlockPool",
    "PrefixIndex",
    "PrefixStats",
    "SequenceBlockTable",
    "SequenceError",
    "TraceError",
    "format_bytes",
    "parse_bytes",
    "plan_compaction",
]
