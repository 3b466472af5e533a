"""The host tier as a :class:`~kvforge.storage.KVCache` shows it: swaps, spills, tier reports.

:class:`TierMethods` is that part of the cache. The bookkeeping
(:mod:`kvforge.core.host_tier`, :mod:`kvforge.core.swap`) decides what moves
where; :class:`~kvforge.storage.host.HostStorage` moves it. The cache wires
the two together: the manager's ``copy_to_host`` / ``copy_to_device`` are the
host storage's copies, and after every call that may evict a cached block
the queued spills are handed over before anything can overwrite it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple, Sequence, TypeVar

from kvforge.core.host_tier import HostTierStats
from kvforge.errors import KVForgeError

if TYPE_CHECKING:
    from kvforge.config import CacheConfig
    from kvforge.core.manager import BlockManager
    from kvforge.storage.host import HostStorage

__all__ = ["TierMethods", "TierUsage"]

SeqId = Hashable
T = TypeVar("T")


class TierUsage(NamedTuple):
    """Blocks and bytes of one tier now: ``capacity_blocks`` backed (the device's
    chunks, the host's budget), ``used_blocks`` holding data (referenced or cached),
    ``allocated_bytes`` of memory actually allocated for it."""

    tier: str
    capacity_blocks: int
    used_blocks: int
    cached_blocks: int
    allocated_bytes: int

    @property
    def use(self) -> float:
        """``used_blocks / capacity_blocks`` (0 for a tier of no blocks)."""
        return self.used_blocks / self.capacity_blocks if self.capacity_blocks else 0.0


class TierMethods:
    """Swaps and tier reports of a :class:`~kvforge.storage.KVCache` (a mixin)."""

    config: CacheConfig
    manager: BlockManager
    host_storage: HostStorage | None
    _growing: Callable[..., Any]

    @property
    def has_host_tier(self) -> bool:
        """Whether ``CacheConfig(host_memory=...)`` gave the cache a host tier."""
        return self.host_storage is not None

    def swap_out(self, seq_ids: Sequence[SeqId]) -> int:
        """Move the sequences' keys and values to the host tier and free their device
        blocks (blocks a running sequence shares stay); return the blocks copied.

        All or nothing: :class:`~kvforge.errors.OutOfBlocksError` when the host
        tier lacks room (or there is none), :class:`~kvforge.errors.SequenceError`
        for an unknown, swapped or repeated id; a failed copy is re-raised; in
        every case the sequences stay on the device as they were. The device
        blocks may be written again as soon as this returns (the copy has
        read them, or the next kernel waits until it has)."""
        return len(self.manager.swap_out(seq_ids))

    def swap_in(self, seq_ids: Sequence[SeqId]) -> int:
        """Bring swapped sequences back into device blocks, bit-exact; return the blocks
        copied. All or nothing (:class:`~kvforge.errors.OutOfBlocksError` when the
        device lacks room, a failed copy re-raised: the sequences stay swapped).
        The next kernel on the compute stream waits for the copy; the host does not."""
        return len(self._growing(self.manager.swap_in, seq_ids))

    def is_swapped(self, seq_id: SeqId) -> bool:
        """Whether the sequence is swapped out to the host tier."""
        return self.manager.is_swapped(seq_id)

    @property
    def swapped_seq_ids(self) -> list[SeqId]:
        """Ids of the swapped-out sequences."""
        return self.manager.swapped_seq_ids

    def num_blocks_to_swap_in(self, seq_ids: Sequence[SeqId]) -> int:
        """Device blocks :meth:`swap_in` of these sequences would take."""
        return self.manager.num_blocks_to_swap_in(seq_ids)

    def host_stats(self) -> HostTierStats:
        """The host tier's counters (all zero without one)."""
        return self.manager.host.stats()

    @property
    def host_bytes_moved(self) -> tuple[int, int]:
        """Bytes copied ``(to the host, to the device)`` by the tier so far."""
        s = self.host_storage
        return (0, 0) if s is None else (s.bytes_to_host, s.bytes_to_device)

    def synchronize_tiers(self) -> None:
        """Block the host until every tier copy issued so far has finished (tests, benchmarks)."""
        if self.host_storage is not None:
            self.host_storage.synchronize()

    def tier_usage(self) -> list[TierUsage]:
        """One :class:`TierUsage` per tier: the device, then the host (when there is one)."""
        pool = self.manager.pool
        storage_bytes = self.storage_bytes  # type: ignore[attr-defined]
        tiers = [TierUsage("device", pool.capacity, pool.num_allocated_blocks + pool.num_evictable_blocks,
                           pool.num_cached_blocks, storage_bytes)]
        if self.host_storage is not None:
            host = self.manager.host
            tiers.append(TierUsage("host", host.num_blocks, host.num_used_blocks(),
                                   host.stats().cached_blocks, self.host_storage.num_bytes))
        return tiers

    def _wire_host_tier(self) -> None:
        if self.host_storage is not None:
            self.manager.copy_to_host = self._copy_to_host
            self.manager.copy_to_device = self._copy_to_device

    def _copy_to_host(self, pairs: list[tuple[int, int]]) -> None:
        self.host_storage.to_host(pairs)  # type: ignore[union-attr]

    def _copy_to_device(self, pairs: list[tuple[int, int]]) -> None:
        self.host_storage.to_device(pairs)  # type: ignore[union-attr]

    def host_block(self, host_block: int) -> Any:
        """A host block's keys and values ``[num_layers, 2, block_size, kv_heads, head_dim]``
        (a view of pinned memory; call :meth:`synchronize_tiers` before reading it)."""
        if self.host_storage is None:
            raise KVForgeError("the cache has no host tier (set CacheConfig(host_memory=...))")
        return self.host_storage.block(host_block)
