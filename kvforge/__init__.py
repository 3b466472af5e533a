"""kvforge: a paged KV cache for LLM inference on PyTorch.

The package face: every public name, imported on first use, so that
``import kvforge.core`` (the numpy-only bookkeeping) never loads torch. The
layers, bottom to top, are the folders (see ``docs/architecture.md``):
``config`` (:mod:`kvforge.config`, :mod:`kvforge.errors`,
:mod:`kvforge.model_shapes`), :mod:`kvforge.core`, :mod:`kvforge.kernels`,
:mod:`kvforge.storage`, :mod:`kvforge.engine`, :mod:`kvforge.integrations`
and :mod:`kvforge.tools`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # config layer
    "CacheConfig": "kvforge.config",
    "CachePreset": "kvforge.config",
    "format_bytes": "kvforge.config",
    "parse_bytes": "kvforge.config",
    "ConfigError": "kvforge.errors",
    "InvalidBlockError": "kvforge.errors",
    "KernelError": "kvforge.errors",
    "KVForgeError": "kvforge.errors",
    "ModelError": "kvforge.errors",
    "OutOfBlocksError": "kvforge.errors",
    "SequenceError": "kvforge.errors",
    "TraceError": "kvforge.errors",
    "MODEL_SHAPES": "kvforge.model_shapes",
    # bookkeeping
    "AddSequenceResult": "kvforge.core",
    "AllocationStats": "kvforge.core",
    "BlockManager": "kvforge.core",
    "BlockPool": "kvforge.core",
    "CompactionPlan": "kvforge.core",
    "HostTier": "kvforge.core",
    "HostTierStats": "kvforge.core",
    "NullPrefixIndex": "kvforge.core",
    "PhysicalBlockPool": "kvforge.core",
    "plan_compaction": "kvforge.core",
    "PrefixIndex": "kvforge.core",
    "PrefixStats": "kvforge.core",
    "SequenceBlockTable": "kvforge.core",
    "SwappedSequence": "kvforge.core",
    # storage
    "HostStorage": "kvforge.storage",
    "RedisTier": "kvforge.storage",
    "RemoteLayout": "kvforge.storage",
    "RemoteStats": "kvforge.storage",
    "RemoteTier": "kvforge.storage",
    "TierUsage": "kvforge.storage",
    "KVCache": "kvforge.storage",
    "KvCache": "kvforge.storage",
    "MemoryProfile": "kvforge.storage",
    "StepBatch": "kvforge.storage",
    # engine
    "CompletionOutput": "kvforge.engine",
    "Engine": "kvforge.engine",
    "EngineConfig": "kvforge.engine",
    "EngineStats": "kvforge.engine",
    "PreemptionPolicy": "kvforge.engine",
    "RequestOutput": "kvforge.engine",
    "SamplingParams": "kvforge.engine",
    # tools
    "load_trace": "kvforge.tools.workload",
    "make_workload": "kvforge.tools.workload",
    "Request": "kvforge.tools.workload",
    "Workload": "kvforge.tools.workload",
    "simulate": "kvforge.tools.simulate",
    "SimulationConfig": "kvforge.tools.simulate",
    "SimulationResult": "kvforge.tools.simulate",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers see the names without importing anything at run time
    from kvforge.config import CacheConfig, CachePreset, format_bytes, parse_bytes
    from kvforge.core import (
        AddSequenceResult, AllocationStats, BlockManager, BlockPool, CompactionPlan, HostTier, HostTierStats,
        NullPrefixIndex, PhysicalBlockPool, PrefixIndex, PrefixStats, SequenceBlockTable, SwappedSequence,
        plan_compaction,
    )
    from kvforge.engine import (
        CompletionOutput, Engine, EngineConfig, EngineStats, PreemptionPolicy, RequestOutput, SamplingParams,
    )
    from kvforge.errors import (
        ConfigError, InvalidBlockError, KernelError, KVForgeError, ModelError, OutOfBlocksError, SequenceError,
        TraceError,
    )
    from kvforge.model_shapes import MODEL_SHAPES
    from kvforge.storage import (
        HostStorage, KVCache, KvCache, MemoryProfile, RedisTier, RemoteLayout, RemoteStats, RemoteTier, StepBatch,
        TierUsage,
    )
    from kvforge.tools.simulate import SimulationConfig, SimulationResult, simulate
    from kvforge.tools.workload import Request, Workload, load_trace, make_workload
