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
    sequences (shared blocks count once per sequence).
    Ratios follow ARCHITECTURE.md: ``internal_fragmentation``,
    ``fragmentation_ratio`` (external) and ``memory_efficiency``.
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
            ("bytes per token / block", f"{fb(self.bytes_per_token)} / {fb(self.bytes_per_block)}"),
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
        return rows

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


