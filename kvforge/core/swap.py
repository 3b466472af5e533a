"""Swapping sequences between the device and the host tier, and the tier copies.

:meth:`SequenceSwap.swap_out` moves sequences' blocks to host blocks and
frees their device blocks; :meth:`SequenceSwap.swap_in` brings them back into
fresh device blocks, bit-exact. Both are all or nothing: every argument and
the room on the target tier are checked first, the data is copied (through
the storage's ``copy_to_host`` / ``copy_to_device``) before any table
changes, and a copy that raises undoes the allocations and re-raises, so the
sequences stay where they were.

What moves. A block that a sequence outside the batch also references (a
running sequence sharing a prefix) stays on the device: the swapped sequence
keeps its reference. A cached block that already has a host copy is not
copied again. Blocks shared inside the batch are copied once and come back
shared. While swapped, a sequence has no row in the tables; its blocks, token
ids, key chain and uncommitted tokens (slots reserved, ids to come) wait in a
:class:`~kvforge.core.host_tier.SwappedSequence`; ids committed after the
swap-in land in the new blocks.

Spills. Device evictions queue spill copies in the host tier;
:meth:`SequenceSwap.flush_spills` hands them to the storage. Every path that
writes into a device block (copy-on-write, onboarding, swap-in, compaction,
and the storage after each allocating call) flushes first, so an evicted
block is copied out before anything overwrites it. A spill that raises loses
only those prefix entries (they are recomputed on their next use).
:class:`SequenceSwap` is that part of :class:`~kvforge.core.manager.BlockManager`.
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.host_tier import HostTier, SwappedSequence
from kvforge.core.ids import indexable
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import PrefixIndex
from kvforge.core.sequences import SequenceRows
from kvforge.core.slots import UNKNOWN
from kvforge.core.tables import BlockTables
from kvforge.errors import OutOfBlocksError, SequenceError

__all__ = ["SequenceSwap"]

log = logging.getLogger(__name__)

SeqId = Hashable
Pairs = list[tuple[int, int]]


class SequenceSwap:
    """``swap_out`` / ``swap_in`` and the tier copies (a mixin of the manager)."""

    block_size: int
    pool: BlockPool
    prefix: PrefixIndex
    tables: BlockTables
    host: HostTier
    _seqs: SequenceRows[KeyChain]
    #: the storage's copies ``fn([(device_block, host_block), ...])`` and
    #: ``fn([(host_block, device_block), ...])``; None: bookkeeping only
    copy_to_host: Callable[[Pairs], None] | None
    copy_to_device: Callable[[Pairs], None] | None

    def is_swapped(self, seq_id: SeqId) -> bool:
        """Whether the sequence is swapped out to the host tier."""
        try:
            return seq_id in self.host.swapped
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None

    @property
    def swapped_seq_ids(self) -> list[SeqId]:
        """Ids of the swapped-out sequences, oldest swap first."""
        return list(self.host.swapped)

    def _check_tier(self, what: str) -> None:
        if not self.host.enabled:
            raise OutOfBlocksError(f"{what}: the cache has no host tier (set CacheConfig(host_memory=...))",
                                   requested=1, available=0)

    # ------------------------------------------------------------- spills
    def flush_spills(self) -> None:
        """Hand the queued spill copies to the storage (one batch)."""
        if not self.host._pending:
            return
        pairs = self.host.take_pending_spills()
        if self.copy_to_host is None:
            return
        try:
            self.copy_to_host(pairs)
        except Exception as exc:  # nothing live is lost: those prefixes are recomputed when next used
            self.host.spill_failed(pairs)
            log.warning("spilling %d evicted block(s) to the host tier failed (%s); their prefix entries "
                        "are dropped", len(pairs), exc)

    # ------------------------------------------------------------- swap out
    def swap_out(self, seq_ids: Sequence[SeqId]) -> Pairs:
        """Move the sequences to the host tier; return the ``(device, host)`` blocks copied.

        Raises :class:`OutOfBlocksError` when the host tier lacks room and
        :class:`SequenceError` for an unknown, swapped or repeated id; a copy
        that raises is re-raised. In every case nothing changed."""
        self._check_tier("swap_out()")
        seq_ids = indexable(seq_ids)
        for s in seq_ids:
            if self.is_swapped(s):
                raise SequenceError(f"swap_out(): sequence {s!r} is swapped out already")
        rows = self._seqs.distinct_rows(seq_ids, "swap_out()").tolist()
        tables, pool, host = self.tables, self.pool, self.host
        tables_of = [tables.blocks(r) for r in rows]
        in_batch: dict[int, int] = {}
        for blocks in tables_of:
            for b in blocks:
                in_batch[b] = in_batch.get(b, 0) + 1
        parked = self._swapped_device_refs()  # references of sequences swapped out before
        stays = {b for b, k in in_batch.items() if pool.ref_count(b) > k + parked.get(b, 0)}
        reuse = {b: host.copy_of(b) for b in in_batch if b not in stays and host.copy_of(b) is not None}
        to_copy = [b for b in in_batch if b not in stays and b not in reuse]
        revive = sum(1 for h in reuse.values() if host.pool.ref_count(h) == 0)
        avail = host.pool.num_available_blocks
        if len(to_copy) + revive > avail:
            raise OutOfBlocksError(
                f"swap_out() of {len(seq_ids)} sequence(s) needs {len(to_copy) + revive} host blocks; the host "
                f"tier has {avail} available of {host.num_blocks}", requested=len(to_copy) + revive,
                available=avail)
        host.pool.incref(list(reuse.values()))  # first: the allocation below must not drop them
        fresh = host.pool.allocate(len(to_copy))
        pairs = list(zip(to_copy, fresh))
        try:
            self.flush_spills()
            if pairs and self.copy_to_host is not None:
                self.copy_to_host(pairs)
        except BaseException:
            host.failed_copies += 1
            host.pool.free(fresh + list(reuse.values()))
            raise
        where = dict(pairs) | reuse
        for b, h in pairs:
            if pool.is_cached(b):  # a keyed device block: its host copy serves its next eviction
                host.add_copy(b, h)
        extra = [where[b] for b, k in in_batch.items() if b in where for _ in range(k - 1)]
        if extra:  # a block shared inside the batch: one host reference per sharer
            host.pool.incref(extra)
        moved_parked = [b for b in where if parked.get(b)]
        if moved_parked:  # sequences swapped out before that still held these device blocks move too
            self._move_parked(where, moved_parked)
        for seq_id, row, blocks in zip(seq_ids, rows, tables_of):
            on_host = [b not in stays for b in blocks]
            num_tokens, unc = tables.num_tokens(row), tables.num_uncommitted(row)
            ids = tables.token_ids(row) if tables.is_known(row) else \
                tables.token_ids(row)[: num_tokens - unc] if unc and tables.is_head_known(row) else None
            chain = self._seqs.state(seq_id)
            host.swapped[seq_id] = SwappedSequence(
                [where[b] if h else b for b, h in zip(blocks, on_host)], on_host, num_tokens, ids,
                tables.num_pending(row), chain, tables.is_tail_shared(row), unc)
            pool.free([b for b, h in zip(blocks, on_host) if h][::-1])  # tail first, as free_sequence
            self._seqs.remove(seq_id)
            tables.release_row(row)
        host.swapped_out += len(pairs)
        return pairs

    def _swapped_device_refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for rec in self.host.swapped.values():
            for b in rec.device_blocks():
                refs[b] = refs.get(b, 0) + 1
        return refs

    def _move_parked(self, where: dict[int, int], blocks: list[int]) -> None:
        """Point swapped records at the host copies of ``blocks`` (device references become host ones)."""
        moving = set(blocks)
        for rec in self.host.swapped.values():
            for i, (b, on_host) in enumerate(zip(rec.blocks, rec.on_host)):
                if not on_host and b in moving:
                    self.host.pool.incref([where[b]])
                    self.pool.free([b])
                    rec.blocks[i], rec.on_host[i] = where[b], True

    # ------------------------------------------------------------- swap in
    def num_blocks_to_swap_in(self, seq_ids: Sequence[SeqId]) -> int:
        """Device blocks :meth:`swap_in` of these sequences would allocate."""
        return len(self._swap_in_sources(indexable(seq_ids)))

    def _swap_in_sources(self, seq_ids: list[SeqId]) -> list[int]:
        seen: set[SeqId] = set()
        for s in seq_ids:
            if not self.is_swapped(s):
                state = "running" if s in self._seqs else "unknown"
                raise SequenceError(f"swap_in(): sequence {s!r} is not swapped out ({state})")
            if s in seen:
                raise SequenceError(f"swap_in() names sequence {s!r} twice")
            seen.add(s)
        return list(dict.fromkeys(h for s in seq_ids for h in self.host.swapped[s].host_blocks()))

    def swap_in(self, seq_ids: Sequence[SeqId]) -> Pairs:
        """Bring swapped sequences back into device blocks; return the ``(host, device)``
        blocks copied. Raises :class:`OutOfBlocksError` when the device pool lacks room;
        a copy that raises is re-raised; either way nothing changed."""
        seq_ids = indexable(seq_ids)
        sources = self._swap_in_sources(seq_ids)
        pool, host, tables = self.pool, self.host, self.tables
        if len(sources) > pool.num_available_blocks:
            raise OutOfBlocksError(
                f"swap_in() of {len(seq_ids)} sequence(s) needs {len(sources)} device blocks; "
                f"{pool.num_available_blocks} available", requested=len(sources),
                available=pool.num_available_blocks)
        fresh = pool.allocate(len(sources))
        pairs = list(zip(sources, fresh))
        try:
            self.flush_spills()
            if pairs and self.copy_to_device is not None:
                self.copy_to_device(pairs)
        except BaseException:
            host.failed_copies += 1
            pool.free(fresh)
            raise
        where = dict(pairs)
        uses: dict[int, int] = {}
        for s in seq_ids:
            for h in host.swapped[s].host_blocks():
                uses[h] = uses.get(h, 0) + 1
        extra = [where[h] for h, k in uses.items() for _ in range(k - 1)]
        if extra:  # shared inside the batch: one device reference per sharer
            pool.incref(extra)
        for s in seq_ids:
            rec = host.swapped.pop(s)
            blocks = [where[b] if h else b for b, h in zip(rec.blocks, rec.on_host)]
            row = tables.new_row()
            ids, unc = rec.token_ids, rec.num_uncommitted
            if unc and ids is not None:  # the uncommitted slots read unknown until committed
                ids = np.concatenate([ids, np.full(unc, UNKNOWN, dtype=np.int64)])
            tables.assign(row, blocks, rec.num_tokens, ids, 0)
            tables.restore_uncommitted(row, unc, rec.token_ids is not None)
            if rec.shared_tail or any(uses.get(h, 0) > 1 for h in rec.host_blocks()[-1:]):
                tables.mark_tail_shared(row)
            self._seqs.add(s, row, rec.chain)
            self._register_swapped_in(rec, blocks)
            host.pool.free(rec.host_blocks())
        host.swapped_in += len(pairs)
        return pairs

    def _register_swapped_in(self, rec: SwappedSequence, blocks: list[int]) -> None:
        """Key the swapped-in full blocks whose key is free again (a host-only key moves
        back to the device; its host block stays as the copy)."""
        if self.prefix.enabled:
            fresh = [i for i in range(len(rec.chain.keys)) if rec.on_host[i]]
            self.prefix._register_many([blocks[i] for i in fresh], [rec.chain.keys[i] for i in fresh])

    # ------------------------------------------------------------- free
    def _free_swapped(self, seq_id: SeqId) -> None:
        rec = self.host.swapped.pop(seq_id)
        self.pool.free(rec.device_blocks()[::-1])
        self.host.pool.free(rec.host_blocks()[::-1])
