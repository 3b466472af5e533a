"""``EngineStats``: a snapshot of the engine's counters and its cache's metrics."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvforge.errors import KVForgeError
from kvforge.core.host_tier import HostTierStats
from kvforge.core.pool import AllocationStats
from kvforge.core.prefix import PrefixStats

__all__ = ["EngineStats"]


class _UnknownStat(KVForgeError, KeyError):
    """A key that is not an :class:`EngineStats` field (a KeyError, as a mapping raises)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class EngineStats(Mapping[str, Any]):
    """Counters since the engine started, plus the cache now.

    Read it as attributes (``stats.prefix_hit_rate``) or as a read-only
    mapping of its fields (``stats["prefix_hit_rate"]``, ``keys()``,
    ``items()``); :meth:`to_dict` also turns the nested snapshots into dicts.

    Cache usage counts blocks referenced by a sequence (``used_blocks``)
    over the blocks the pool may hold; ``peak_kv_bytes`` is the peak of
    referenced blocks times the bytes of a block, ``kv_storage_bytes`` what
    the pool holds on the device now. ``prefix_hit_rate`` is prompt tokens
    found in the prefix cache over prompt tokens looked up.
    ``fragmentation_ratio`` is external fragmentation (free blocks trapped
    below live ones, over free blocks); ``internal_fragmentation`` is
    reserved token slots holding no token, over reserved slots.
    ``memory_efficiency`` is bytes of live keys/values over bytes the cache
    holds on the device; ``num_evictions`` counts cached prefix blocks
    evicted to make room. With a host tier, ``num_preemptions`` splits into
    ``num_swaps_out`` (sequences swapped to the host; ``num_swaps_in`` came
    back) and ``num_recompute_preemptions``; ``num_swapped`` are swapped out
    now; ``prefix_host_hit_tokens`` of the prefix hits came from the host
    tier, and ``host`` holds its counters (None without one). With a remote
    tier, ``prefix_remote_hit_tokens`` came from it; ``num_remote_fetches``
    prompts asked it for their blocks and ``num_remote_fetches_declined`` did
    not, computing being faster (``EngineConfig.remote_fetch="auto"``).
    With speculative decoding (``EngineConfig.speculative_tokens``),
    ``num_draft_tokens`` drafts were checked, ``num_accepted_tokens`` of them
    accepted (``draft_acceptance_rate``, 0.0 before any draft). With
    asynchronous scheduling (``EngineConfig.async_scheduling``),
    ``num_overlapped_steps`` steps were launched before the step ahead of them
    was read.
    """

    num_steps: int
    num_decode_steps: int
    num_graph_steps: int
    num_requests: int
    num_finished_requests: int
    num_running: int
    num_waiting: int
    max_concurrent_seqs: int
    num_preemptions: int
    num_prompt_tokens_computed: int
    num_generated_tokens: int
    num_blocks: int
    block_size: int
    used_blocks: int
    cache_usage: float
    peak_used_blocks: int
    kv_storage_bytes: int
    peak_kv_bytes: int
    fragmentation_ratio: float
    internal_fragmentation: float
    prefix_hit_rate: float
    prefix_hit_tokens: int
    num_compactions: int
    num_blocks_moved: int
    bytes_returned: int
    memory_efficiency: float
    num_evictions: int
    allocation: AllocationStats
    prefix: PrefixStats
    num_swapped: int = 0
    num_swaps_out: int = 0
    num_swaps_in: int = 0
    num_recompute_preemptions: int = 0
    prefix_host_hit_tokens: int = 0
    host: HostTierStats | None = None
    prefix_remote_hit_tokens: int = 0
    num_remote_fetches: int = 0
    num_remote_fetches_declined: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_acceptance_rate: float = 0.0
    num_overlapped_steps: int = 0

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in _FIELDS:
            raise _UnknownStat(f"EngineStats has no field {key!r} (fields: {', '.join(_FIELDS)})")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (nested snapshots as dicts)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: cache use, prefix hits, preemptions, compactions."""
        return (f"cache {self.used_blocks}/{self.num_blocks} blocks ({self.cache_usage:.0%}, "
                f"peak {self.peak_used_blocks}), prefix hit rate {self.prefix_hit_rate:.1%}, "
                f"preemptions {self.num_preemptions}, compactions {self.num_compactions}, "
                f"max concurrent {self.max_concurrent_seqs}")


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EngineStats))
