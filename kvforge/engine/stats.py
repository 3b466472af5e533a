"""``EngineStats``: a snapshot of the engine's counters and its cache's metrics."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvforge.pool import AllocationStats
from kvforge.prefix import PrefixStats

__all__ = ["EngineStats"]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters since the engine started, plus the cache now.

    Cache usage counts blocks referenced by a sequence (``used_blocks``)
    over the blocks the pool may hold; ``peak_kv_bytes`` is the peak of
    referenced blocks times the bytes of a block, ``kv_storage_bytes`` what
    the pool holds on the device now. ``prefix_hit_rate`` is prompt tokens
    found in the prefix cache over prompt tokens looked up.
    ``fragmentation_ratio`` is external fragmentation (free blocks trapped
    below live ones, over free blocks); ``internal_fragmentation`` is
    reserved token slots holding no token, over reserved slots.
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
    allocation: AllocationStats
    prefix: PrefixStats

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (nested snapshots as dicts)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: cache use, prefix hits, preemptions, compactions."""
        return (f"cache {self.used_blocks}/{self.num_blocks} blocks ({self.cache_usage:.0%}, "
                f"peak {self.peak_used_blocks}), prefix hit rate {self.prefix_hit_rate:.1%}, "
                f"preemptions {self.num_preemptions}, compactions {self.num_compactions}, "
                f"max concurrent {self.max_concurrent_seqs}")
