"""The storage layer: device tensors under the bookkeeping.

:class:`KVCache` is the facade an engine talks to: it owns the chunked device
storage (:mod:`kvforge.storage.device`), a :class:`~kvforge.core.BlockManager`,
and builds each step's kernel inputs in one call (:class:`StepBatch`).
:class:`MemoryProfile` measures where its memory goes.
"""
from __future__ import annotations

from kvforge.storage.cache import KVCache, KvCache
from kvforge.storage.device import resolve_device
from kvforge.storage.profile import MemoryProfile
from kvforge.storage.step import StepBatch

__all__ = ["KVCache", "KvCache", "MemoryProfile", "StepBatch", "resolve_device"]
