"""``MemoryProfile``: where a cache's memory goes, measured from the real objects."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvforge.config import format_bytes

if TYPE_CHECKING:
    from kvforge.storage.cache import KVCache

__all__ = ["MemoryProfile"]


def _host_fields(cache: KVCache) -> dict[str, Any]:
    """The ``host_*`` fields of a cache with a host tier (none without one: the defaults hold)."""
    storage = cache.host_storage
    if storage is None:
        return {}
    bpb = cache.config.bytes_per_block
    st = cache.host_stats()
    to_host, to_device = cache.host_bytes_moved
    return dict(
        has_host_tier=True,
        host_pinned=storage.is_pinned,
        host_capacity_blocks=st.num_blocks,
        host_capacity_bytes=st.num_blocks * bpb,
        host_allocated_bytes=storage.num_bytes,
        host_used_blocks=st.used_blocks,
        host_used_bytes=st.used_blocks * bpb,
        host_cached_blocks=st.cached_blocks,
        host_free_blocks=st.num_blocks - st.used_blocks,
        host_use=st.used_blocks / st.num_blocks if st.num_blocks else 0.0,
        swapped_sequences=st.swapped_sequences,
        host_spilled_blocks=st.spilled_blocks,
        host_spill_reuses=st.spill_reuses,
        host_onboarded_blocks=st.onboarded_blocks,
        host_hit_tokens=cache.prefix_stats().host_hit_tokens,
        host_swapped_out_blocks=st.swapped_out_blocks,
        host_swapped_in_blocks=st.swapped_in_blocks,
        host_bytes_to_host=to_host,
        host_bytes_to_device=to_device,
        host_dropped_blocks=st.dropped_blocks,
        host_failed_copies=st.failed_copies,
    )


def _metadata_bytes(cache: KVCache) -> int:
    """Host bytes of the bookkeeping (tables, pool lists, prefix maps, token ids) and the chunk offsets."""
    total = cache.manager.metadata_bytes()
    if cache.chunk_offsets is not None:
        total += cache.chunk_offsets.numel() * 8
    return int(total)


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """A snapshot of a :class:`~kvforge.storage.cache.KVCache`'s memory.

    Bytes: ``total_bytes`` is what the cache's tensors hold on the device,
    ``used_bytes`` the blocks in use (referenced or cached), ``free_bytes`` the
    rest, ``live_kv_bytes`` the token slots holding keys/values. Blocks:
    ``physical_blocks`` distinct blocks referenced by sequences (evictable
    cached blocks are counted in ``evictable_blocks``, and with them in
    ``used_bytes``), ``logical_blocks`` block-table entries over all
    sequences (shared blocks count once per sequence). ``kv_dtype`` is the
    storage dtype (``"float8_e4m3fn"`` for an fp8 cache, whose every byte
    figure is half of bf16's; the report names it beside the bytes per token).
    Ratios follow ARCHITECTURE.md: ``internal_fragmentation``,
    ``fragmentation_ratio`` (external) and ``memory_efficiency``.

    Tiers. ``device_use`` is the share of backed device blocks in use.
    With ``CacheConfig(host_memory=...)`` (``has_host_tier``) the ``host_*``
    fields describe the host tier: ``host_capacity_blocks`` and
    ``host_capacity_bytes`` its budget in whole blocks, ``host_allocated_bytes``
    the host memory allocated for it now (pinned when ``host_pinned``, on a GPU; chunks
    are allocated on first use), ``host_used_blocks`` / ``host_used_bytes``
    the blocks holding data (held for swapped sequences, or cached),
    ``host_cached_blocks`` those with a prefix key or a device copy,
    ``host_free_blocks`` the rest and ``host_use`` the used share;
    ``swapped_sequences`` the sequences swapped out to it. Counters since
    the cache was made: ``host_spilled_blocks`` (device evictions copied to
    the host), ``host_spill_reuses`` (evictions whose host copy existed),
    ``host_onboarded_blocks`` (copied back for a prefix hit),
    ``host_hit_tokens`` (prompt tokens served from the host),
    ``host_swapped_out_blocks`` / ``host_swapped_in_blocks``,
    ``host_bytes_to_host`` / ``host_bytes_to_device`` (bytes the tier's
    copies moved each way), ``host_dropped_blocks`` (dropped when the tier
    was full) and ``host_failed_copies`` (tier copies that raised). Without a
    host tier they are all zero and the report shows none of them.
    """

    device: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    live_kv_bytes: int
    max_bytes: int
    metadata_bytes: int
    device_free_bytes: int | None
    device_total_bytes: int | None
    block_size: int
    capacity_blocks: int
    max_blocks: int
    physical_blocks: int
    logical_blocks: int
    free_blocks: int
    evictable_blocks: int
    num_chunks: int
    active_sequences: int
    total_tokens: int
    bytes_per_token: int
    bytes_per_block: int
    internal_fragmentation: float
    fragmentation_ratio: float
    memory_efficiency: float
    peak_allocations: int
    compaction_count: int
    total_bytes_returned: int
    prefix_hit_rate: float
    cow_copies: int
    # tiers (defaults: no host tier)
    device_use: float = 0.0
    has_host_tier: bool = False
    host_pinned: bool = False
    host_capacity_blocks: int = 0
    host_capacity_bytes: int = 0
    host_allocated_bytes: int = 0
    host_used_blocks: int = 0
    host_used_bytes: int = 0
    host_cached_blocks: int = 0
    host_free_blocks: int = 0
    host_use: float = 0.0
    swapped_sequences: int = 0
    host_spilled_blocks: int = 0
    host_spill_reuses: int = 0
    host_onboarded_blocks: int = 0
    host_hit_tokens: int = 0
    host_swapped_out_blocks: int = 0
    host_swapped_in_blocks: int = 0
    host_bytes_to_host: int = 0
    host_bytes_to_device: int = 0
    host_dropped_blocks: int = 0
    host_failed_copies: int = 0
    kv_dtype: str = ""

    @classmethod
    def of(cls, cache: KVCache) -> MemoryProfile:
        """Measure ``cache`` now."""
        cfg, pool, m = cache.config, cache.pool, cache.manager
        stats = pool.stats
        in_use = stats.current_allocations + stats.evictable_blocks
        dev_free = dev_total = None
        if cache.device.type == "cuda":
            dev_free, dev_total = torch.cuda.mem_get_info(cache.device)
        logical = m.usage().num_logical_blocks
        total = cache.storage_bytes
        return cls(
            device=str(cache.device),
            total_bytes=total,
            used_bytes=in_use * cfg.bytes_per_block,
            free_bytes=total - in_use * cfg.bytes_per_block,
            live_kv_bytes=cache.live_kv_bytes(),
            max_bytes=cfg.estimated_memory_bytes(),
            metadata_bytes=_metadata_bytes(cache),
            device_free_bytes=dev_free,
            device_total_bytes=dev_total,
            block_size=cfg.block_size,
            capacity_blocks=pool.capacity,
            max_blocks=cfg.num_blocks,
            physical_blocks=stats.current_allocations,
            logical_blocks=logical,
            free_blocks=stats.free_blocks,
            evictable_blocks=stats.evictable_blocks,
            num_chunks=cache.num_chunks,
            active_sequences=len(m),
            total_tokens=m.num_live_tokens(),
            bytes_per_token=cfg.bytes_per_token,
            bytes_per_block=cfg.bytes_per_block,
            internal_fragmentation=m.internal_fragmentation(),
            fragmentation_ratio=pool.fragmentation_ratio(),
            memory_efficiency=cache.memory_efficiency(),
            peak_allocations=stats.peak_allocations,
            compaction_count=stats.compaction_count,
            total_bytes_returned=stats.total_bytes_returned,
            prefix_hit_rate=cache.prefix.stats().hit_rate,
            cow_copies=cache.num_cow_copies,
            device_use=in_use / pool.capacity if pool.capacity else 0.0,
            **_host_fields(cache),
            kv_dtype=str(cfg.dtype).removeprefix("torch."),
        )

    @staticmethod
    def format_bytes(num_bytes: int | float) -> str:
        """``3 * 2**30`` -> ``'3.00 GiB'``."""
        return format_bytes(num_bytes)

    def efficiency_ratio(self) -> float:
        """Bytes of live keys/values over bytes held on the device."""
        return self.memory_efficiency

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """The report's (label, value) rows."""
        fb = format_bytes
        rows = [
            ("device", self.device),
            ("device memory (cache)", f"{fb(self.total_bytes)} in {self.num_chunks} chunk(s), max {fb(self.max_bytes)}"),
            ("used / free", f"{fb(self.used_bytes)} / {fb(self.free_bytes)}"),
            ("live keys/values", fb(self.live_kv_bytes)),
            ("metadata (host)", fb(self.metadata_bytes)),
            ("blocks backed / max", f"{self.capacity_blocks} / {self.max_blocks} of {self.block_size} tokens"),
            ("physical / logical blocks", f"{self.physical_blocks} / {self.logical_blocks}"),
            ("free / evictable blocks", f"{self.free_blocks} / {self.evictable_blocks}"),
            ("active sequences", str(self.active_sequences)),
            ("tokens", str(self.total_tokens)),
            ("bytes per token / block", f"{fb(self.bytes_per_token)} / {fb(self.bytes_per_block)}"
                                        + (f" ({self.kv_dtype})" if self.kv_dtype.startswith("float8") else "")),
            ("internal fragmentation", f"{self.internal_fragmentation:.1%}"),
            ("external fragmentation", f"{self.fragmentation_ratio:.1%}"),
            ("memory efficiency", f"{self.memory_efficiency:.1%}"),
            ("peak blocks", str(self.peak_allocations)),
            ("compactions / bytes returned", f"{self.compaction_count} / {fb(self.total_bytes_returned)}"),
            ("prefix hit rate", f"{self.prefix_hit_rate:.1%}"),
            ("copy-on-write copies", str(self.cow_copies)),
        ]
        if self.device_free_bytes is not None and self.device_total_bytes is not None:
            rows.insert(1, ("device free / total", f"{fb(self.device_free_bytes)} / {fb(self.device_total_bytes)}"))
        return rows + self.host_rows()

    def host_rows(self) -> list[tuple[str, str]]:
        """The report's host-tier rows (none without a host tier)."""
        if not self.has_host_tier:
            return []
        fb = format_bytes
        pinned = "pinned" if self.host_pinned else "pageable"
        return [
            ("host memory (tier)", f"{fb(self.host_allocated_bytes)} allocated ({pinned}), "
                                   f"budget {fb(self.host_capacity_bytes)}"),
            ("host used / free", f"{fb(self.host_used_bytes)} / "
                                 f"{fb(self.host_capacity_bytes - self.host_used_bytes)}"),
            ("host blocks used / max", f"{self.host_used_blocks} / {self.host_capacity_blocks} "
                                       f"of {self.block_size} tokens"),
            ("host cached / free blocks", f"{self.host_cached_blocks} / {self.host_free_blocks}"),
            ("device / host use", f"{self.device_use:.1%} / {self.host_use:.1%}"),
            ("swapped sequences", str(self.swapped_sequences)),
            ("spilled / reused / dropped", f"{self.host_spilled_blocks} / {self.host_spill_reuses} / "
                                           f"{self.host_dropped_blocks} blocks"),
            ("host hits: blocks / tokens", f"{self.host_onboarded_blocks} / {self.host_hit_tokens}"),
            ("swapped out / in blocks", f"{self.host_swapped_out_blocks} / {self.host_swapped_in_blocks}"),
            ("bytes to host / to device", f"{fb(self.host_bytes_to_host)} / {fb(self.host_bytes_to_device)}"),
            ("failed tier copies", str(self.host_failed_copies)),
        ]

    def report(self, file: Any = None, *, echo: bool = True) -> str:
        """Print the profile as an aligned table (to ``file``, default stdout) and
        return the text; ``echo=False`` only returns it."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = ["KV cache memory profile", "-" * (width + 30)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        text = "\n".join(lines)
        if echo:
            print(text, file=file if file is not None else sys.stdout)
        return text


