"""The storage layer: device tensors under the bookkeeping.

:class:`KVCache` is the facade an engine talks to: it owns the chunked device
storage (:mod:`kvforge.storage.device`), a :class:`~kvforge.core.BlockManager`,
and builds each step's kernel inputs in one call (:class:`StepBatch`).
:class:`HostStorage` is the pinned host tier (:mod:`kvforge.storage.host`;
the cache's swaps and tier reports: :mod:`kvforge.storage.tiers`).
:class:`RedisTier` shares full blocks between instances through a Redis server
(:mod:`kvforge.storage.remote` states the contract, :mod:`kvforge.storage.sharing`
how the cache uses it). :class:`MemoryProfile` measures where its memory goes.
"""
from __future__ import annotations

from kvforge.storage.cache import KVCache, KvCache
from kvforge.storage.device import resolve_device
from kvforge.storage.host import HostStorage
from kvforge.storage.profile import MemoryProfile
from kvforge.storage.redis_tier import RedisTier, RemoteStats
from kvforge.storage.remote import RemoteLayout, RemoteTier
from kvforge.storage.step import StepBatch
from kvforge.storage.tiers import TierUsage

__all__ = ["HostStorage", "KVCache", "KvCache", "MemoryProfile", "RedisTier", "RemoteLayout", "RemoteStats",
           "RemoteTier", "StepBatch", "TierUsage", "resolve_device"]
