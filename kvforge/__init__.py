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
from kvforge.simulate import SimulationConfig, SimulationResult, simulate
from kvforge.workload import Request, Workload, load_trace, make_workload
from kvforge.engine import CompletionOutput, Engine, EngineConfig, EngineStats, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AddSequenceResult",
    "AllocationStats",
    "BlockManager",
    "BlockPool",
    "CacheConfig",
    "CachePreset",
    "CompactionPlan",
    "CompletionOutput",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "format_bytes",
    "InvalidBlockError",
    "KernelError",
    "KVCache",
    "KvCache",
    "KVForgeError",
    "load_trace",
    "make_workload",
    "MemoryProfile",
    "ModelError",
    "NullPrefixIndex",
    "OutOfBlocksError",
    "parse_bytes",
    "PhysicalBlockPool",
    "plan_compaction",
    "PrefixIndex",
    "PrefixStats",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SequenceBlockTable",
    "SequenceError",
    "simulate",
    "SimulationConfig",
    "SimulationResult",
    "TraceError",
    "Workload",
]
