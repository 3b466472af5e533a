"""The host tier's bookkeeping: which blocks have keys and values in host memory, and where.

This module is the one place that knows where a block lives. Device blocks are
ids of the manager's :class:`~kvforge.core.pool.BlockPool`; host blocks are ids
of a second pool, :attr:`HostTier.pool`, whose blocks the storage layer backs
with pinned host memory in the same block layout. A block's keys and values are

- *on the device only*: every block a running sequence writes into;
- *on both*: a cached (full, keyed) device block ``d`` whose copy is host block
  ``h`` (:meth:`HostTier.copy_of`). Cached blocks are full and never written
  again, so the copy stays exact, and evicting ``d`` costs no copy;
- *on the host only*: a prefix key whose device block was evicted; the key
  names host block ``h`` (:meth:`HostTier.host_block`). Exactly one of the
  device prefix index and this map names a key;
- *held for a swapped-out sequence* (:class:`SwappedSequence`): the host
  blocks hold references in the host pool.

Spill. When the device pool evicts a cached block, the prefix index calls
:meth:`HostTier.on_device_evict`: the key moves to the host map; a block with
a copy needs nothing more, any other gets a host block and a queued ``(device,
host)`` copy (:meth:`HostTier.take_pending_spills`), which the manager hands to
the storage before anything writes into the device block again.

One LRU order across tiers. Host blocks with a key or a device copy are
*cached* in the host pool: with no reference they are evictable, oldest
first. A spilled block enters at the young end, in the order the device
evicted (its release order), so the host tier continues the device's LRU:
when it is full, the oldest host blocks are dropped for good
(:meth:`HostTier.on_host_evict`). Blocks of swapped sequences are
referenced and never dropped.

Pure bookkeeping: copying is the storage layer's (the manager calls its
``copy_to_host`` / ``copy_to_device``); counters say what moved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Hashable, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.keys import BlockKey
from kvforge.core.pool import BlockPool

__all__ = ["HostTier", "HostTierStats", "NullHostTier", "SwappedSequence"]

SeqId = Hashable


@dataclass(frozen=True, slots=True)
class HostTierStats:
    """Counters of a host tier (blocks unless named otherwise).

    ``spilled_blocks``: device evictions copied to the host; ``spill_reuses``:
    evictions whose host copy existed (no copy); ``dropped_blocks``: host blocks
    dropped when the tier was full (plus evictions it had no room for);
    ``onboarded_blocks``: host blocks copied back for a prefix hit;
    ``host_hit_tokens``: prompt tokens served from host blocks;
    ``swapped_out_blocks`` / ``swapped_in_blocks``: blocks copied by swaps;
    ``failed_copies``: tier copies that raised (nothing live was lost)."""

    num_blocks: int
    used_blocks: int
    cached_blocks: int
    swapped_sequences: int
    spilled_blocks: int
    spill_reuses: int
    dropped_blocks: int
    onboarded_blocks: int
    host_hit_tokens: int
    swapped_out_blocks: int
    swapped_in_blocks: int
    failed_copies: int

    def to_dict(self) -> dict[str, int]:
        """The snapshot as a plain dict."""
        return asdict(self)


class SwappedSequence:
    """A swapped-out sequence: its blocks in position order (``on_host[i]``: block ``i``
    is a host block, else a device block it still references because a running
    sequence shares it), its token count, token ids (reserved then pending; None
    when unknown; with uncommitted tokens, the ids before them, None unless all
    known), pending count, key chain, whether its partial tail was shared, and
    its uncommitted tokens (its last ones: slots reserved, ids to come)."""

    __slots__ = ("blocks", "on_host", "num_tokens", "token_ids", "num_pending", "chain", "shared_tail",
                 "num_uncommitted")

    def __init__(self, blocks: list[int], on_host: list[bool], num_tokens: int, token_ids: np.ndarray | None,
                 num_pending: int, chain: KeyChain, shared_tail: bool, num_uncommitted: int = 0) -> None:
        self.blocks, self.on_host, self.num_tokens = blocks, on_host, num_tokens
        self.token_ids, self.num_pending, self.chain, self.shared_tail = token_ids, num_pending, chain, shared_tail
        self.num_uncommitted = num_uncommitted

    def host_blocks(self) -> list[int]:
        """Its host blocks, in position order."""
        return [b for b, h in zip(self.blocks, self.on_host) if h]

    def device_blocks(self) -> list[int]:
        """The device blocks it still references (shared with running sequences), in position order."""
        return [b for b, h in zip(self.blocks, self.on_host) if not h]


class HostTier:
    """Placement of blocks beyond the device: a pool of ``num_blocks`` host blocks,
    the host-only prefix keys, the host copies of cached device blocks, the queued
    spills and the swapped-out sequences. See the module docstring for the states."""

    enabled = True

    def __init__(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.pool.on_evict = self.on_host_evict
        self._keys: dict[BlockKey, int] = {}      # host-only key -> host block
        self._key_of: dict[int, BlockKey] = {}    # host block -> its host-only key
        self._copy: dict[int, int] = {}           # cached device block -> its host copy
        self._copy_of: dict[int, int] = {}        # host block -> the device block it copies
        self._pending: dict[int, int] = {}        # host block -> device block to copy from (queued spill)
        self.swapped: dict[SeqId, SwappedSequence] = {}
        self._dropping = False
        self.spilled = self.spill_reuses = self.dropped = self.onboarded = 0
        self.host_hit_tokens = self.swapped_out = self.swapped_in = self.failed_copies = 0

    @property
    def num_blocks(self) -> int:
        """Host blocks of the tier (its budget)."""
        return self.pool.num_blocks

    # ------------------------------------------------------------ where
    def host_block(self, key: BlockKey) -> int | None:
        """The host block holding a host-only prefix key, if any."""
        return self._keys.get(key)

    def copy_of(self, device_block: int) -> int | None:
        """The host copy of a cached device block, if it has one."""
        return self._copy.get(device_block)

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Host blocks for the longest run of ``keys`` that are all host-only."""
        hits = []
        get = self._keys.get
        for k in keys:
            h = get(k)
            if h is None:
                break
            hits.append(h)
        return hits

    # ------------------------------------------------------------ spills
    def on_device_evict(self, device_block: int, key: BlockKey) -> None:
        """A cached device block was evicted (called through the prefix index): keep its
        key on the host, copying the block unless a copy exists or the tier is full."""
        h = self._copy.pop(device_block, None)
        if h is not None:
            del self._copy_of[h]
        if self._dropping:  # its data is not to be trusted: forget the copy too
            if h is not None:
                self.pool.unmark_cached(h)
            return
        if h is not None:
            self._set_key(h, key)
            self.spill_reuses += 1
            return
        if not self.pool.can_allocate(1):  # every host block is held by a swapped sequence
            self.dropped += 1
            return
        h = self.pool.allocate(1)[0]  # may drop the oldest host blocks (on_host_evict)
        self.pool.mark_cached(h)
        self.pool.free([h])  # evictable, youngest
        self._set_key(h, key)
        self._pending[h] = device_block
        self.spilled += 1

    def on_device_register(self, device_block: int, key: BlockKey) -> None:
        """A device block was registered under ``key`` (its tokens were computed again):
        a host-only block of that key becomes its copy."""
        h = self._keys.get(key)
        if h is not None:
            self.adopt(device_block, h)

    def on_device_unregister(self, device_block: int, key: BlockKey) -> None:
        """A held device block lost its key (it will be written again): its host copy, if
        any, keeps the key as a host-only block; without one the key is gone (no copy is
        made: the block was keyed only while its owner held it)."""
        h = self._copy.pop(device_block, None)
        if h is not None:
            del self._copy_of[h]
            self._set_key(h, key)

    def _set_key(self, h: int, key: BlockKey) -> None:
        self._keys[key] = h
        self._key_of[h] = key

    def on_host_evict(self, h: int) -> None:
        """The host pool dropped block ``h`` (called by the host pool): forget what it held."""
        key = self._key_of.pop(h, None)
        if key is not None:
            del self._keys[key]
        d = self._copy_of.pop(h, None)
        if d is not None:
            del self._copy[d]
        self._pending.pop(h, None)
        self.dropped += 1

    def take_pending_spills(self) -> list[tuple[int, int]]:
        """The queued spill copies ``(device_block, host_block)``, emptied."""
        pairs = [(d, h) for h, d in self._pending.items()]
        self._pending.clear()
        return pairs

    def spill_failed(self, pairs: Sequence[tuple[int, int]]) -> None:
        """A spill copy raised: its host blocks hold nothing; their keys are forgotten
        (those prefixes are recomputed on their next use; no live data is involved)."""
        self.failed_copies += 1
        self.spilled -= len(pairs)  # counted when queued; these were never copied
        for _, h in pairs:
            key = self._key_of.pop(h, None)
            if key is not None:
                del self._keys[key]
                self.pool.unmark_cached(h)
            d = self._copy_of.pop(h, None)  # adopted as a device block's copy while its spill was queued
            if d is not None:
                del self._copy[d]
                self.pool.unmark_cached(h)

    def dropping(self) -> _Dropping:
        """A context in which device evictions forget their blocks instead of spilling
        (the blocks' keys and values are not to be trusted: a failed step)."""
        return _Dropping(self)

    # ------------------------------------------------------------ onboard
    def adopt(self, device_block: int, h: int) -> None:
        """A host-only block was copied into ``device_block``, which now holds its key in
        the device index: ``h`` stays as its copy (both tiers)."""
        key = self._key_of.pop(h)
        del self._keys[key]
        self._copy[device_block] = h
        self._copy_of[h] = device_block

    def forget_key(self, h: int) -> None:
        """Drop host block ``h``'s key (the device holds the key now); unreferenced, it is freed."""
        del self._keys[self._key_of.pop(h)]
        self._pending.pop(h, None)
        self.pool.unmark_cached(h)

    def add_copy(self, device_block: int, h: int) -> None:
        """Record ``h`` as the host copy of cached ``device_block`` (``h`` is held)."""
        self.pool.mark_cached(h)
        self._copy[device_block] = h
        self._copy_of[h] = device_block

    # ------------------------------------------------------------ compaction
    def relocate(self, mapping: dict[int, int]) -> None:
        """Follow device-block moves ``old -> new`` (compaction)."""
        if not mapping:
            return
        moved = {old: self._copy.pop(old) for old in list(self._copy) if old in mapping}
        for old, h in moved.items():
            self._copy[mapping[old]] = h
            self._copy_of[h] = mapping[old]
        for h, d in self._pending.items():
            self._pending[h] = mapping.get(d, d)
        for rec in self.swapped.values():
            rec.blocks = [b if on_host else mapping.get(b, b) for b, on_host in zip(rec.blocks, rec.on_host)]

    # ------------------------------------------------------------ reports
    def num_used_blocks(self) -> int:
        """Host blocks holding data: referenced (swapped) or cached."""
        return self.pool.num_allocated_blocks + self.pool.num_evictable_blocks

    def stats(self) -> HostTierStats:
        """A snapshot of the counters."""
        return HostTierStats(self.num_blocks, self.num_used_blocks(), len(self._keys) + len(self._copy),
                             len(self.swapped), self.spilled, self.spill_reuses, self.dropped, self.onboarded,
                             self.host_hit_tokens, self.swapped_out, self.swapped_in, self.failed_copies)

    def metadata_bytes(self) -> int:
        return self.pool.metadata_bytes() + 64 * (len(self._keys) + len(self._copy) + len(self._pending))

    def check_invariants(self, device_pool: BlockPool, device_keys: dict[BlockKey, int]) -> None:
        """Assert tier consistency against the device pool and the device prefix map."""
        self.pool.check_invariants()
        assert len(self._keys) == len(self._key_of) and len(self._copy) == len(self._copy_of)
        for key, h in self._keys.items():
            assert self._key_of[h] == key and self.pool.is_cached(h), f"host key of block {h} inconsistent"
            assert key not in device_keys, f"key of host block {h} also on the device"
            assert h not in self._copy_of, f"host block {h} both keyed and a copy"
        for d, h in self._copy.items():
            assert self._copy_of[h] == d and self.pool.is_cached(h), f"host copy {h} of block {d} inconsistent"
            assert device_pool.is_cached(d), f"device block {d} has a host copy but is not cached"
        for h in self._pending:
            assert h in self._key_of, f"queued spill into host block {h}, which holds no key"
        refs: dict[int, int] = {}
        for rec in self.swapped.values():
            for h in rec.host_blocks():
                refs[h] = refs.get(h, 0) + 1
        for h, k in refs.items():
            assert self.pool.ref_count(h) == k, f"host block {h}: ref {self.pool.ref_count(h)} != {k} swapped entries"
        assert self.pool.num_allocated_blocks == len(refs), "referenced host blocks not held by a swapped sequence"


class _Dropping:
    def __init__(self, tier: HostTier) -> None:
        self.tier = tier

    def __enter__(self) -> None:
        self.tier._dropping = True

    def __exit__(self, *exc: object) -> None:
        self.tier._dropping = False


class NullHostTier(HostTier):
    """No host tier (``host_memory=0``): nothing spills, lookups miss, swaps are refused."""

    enabled = False

    def __init__(self) -> None:
        super().__init__(1)

    @property
    def num_blocks(self) -> int:
        return 0

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        return []

    def on_device_evict(self, device_block: int, key: BlockKey) -> None:
        return None

    def stats(self) -> HostTierStats:
        return HostTierStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
