"""Appending tokens to sequences: the one append path, copy-on-write included.

:meth:`SequenceAppends.append_tokens` (one sequence) and
:meth:`SequenceAppends.append_tokens_batch` (a decode step's batch) check
their arguments, then share one path: plan the append over the rows
(:mod:`~kvforge.core.append_plan`), refuse it whole when the pool is short,
give every row that must write into a shared, partially filled last block a
private copy of it (copy-on-write, in batch order, as sequential appends
would), commit, and key and register the blocks that filled.

A partial last block that a truncation left shared (or still keyed in the
prefix index for its other owners) is copied the same way before a row
writes into it. Tokens reserved without ids (:mod:`~kvforge.core.reservations`)
take the same path; a plain append after them is refused until their ids are
committed.

Copy-on-write copies through the storage's ``copy_blocks`` when the manager
has one, before any table changes; otherwise the ``(src, dst)`` pairs are
queued in ``pending_copies`` for the storage layer to copy before the new
slots are written. :class:`SequenceAppends` is that part of
:class:`~kvforge.core.manager.BlockManager`.
"""
from __future__ import annotations

from array import array
from typing import Callable, Hashable, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.ids import MAX_COUNT, as_int, as_token_id, count_array, indexable, token_array
from kvforge.core.sequences import SequenceRows
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import PrefixIndex
from kvforge.core.tables import BlockTables
from kvforge.errors import OutOfBlocksError, SequenceError

__all__ = ["SequenceAppends"]

SeqId = Hashable


class SequenceAppends:
    """The append calls (a mixin of :class:`~kvforge.core.manager.BlockManager`)."""

    block_size: int
    pool: BlockPool
    prefix: PrefixIndex
    tables: BlockTables
    _seqs: SequenceRows[KeyChain]
    pending_copies: list[tuple[int, int]]
    copy_blocks: Callable[[list[tuple[int, int]]], None] | None
    flush_spills: Callable[[], None]
    num_cow_copies: int

    def append_tokens(self, seq_id: SeqId, n: int, token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Reserve slots for ``n`` more tokens; return their slot ids (int64), all or nothing.

        The batch of one of :meth:`append_tokens_batch`: pending prompt tokens
        (see ``add_sequence``) come first; ``token_ids`` (length ``n``) let
        filled blocks enter the prefix cache; a shared, partially filled last
        block is copied first (copy-on-write).
        """
        row = self._seqs.row(seq_id)
        if type(n) is not int or not 0 <= n <= MAX_COUNT:
            n = as_int(n, "append_tokens() count n")
        ids = token_array(token_ids, "token_ids") if token_ids is not None else None
        if ids is not None and len(ids) != n:
            raise SequenceError(f"append_tokens({seq_id!r}, n={n}) got {len(ids)} token_ids")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if n > self._max_new_tokens:
            self._refuse_beyond_pool(n, seq_id)
        counts = None if n == 1 else np.array([n], dtype=np.int64)
        return self._append((seq_id,), np.array([row], dtype=np.int64), counts, ids, True)

    def append_token(self, seq_id: SeqId, token_id: int | None = None) -> int:
        """Reserve one slot; return its slot id."""
        row = self._seqs.row(seq_id)
        ids = None if token_id is None else array("q", (as_token_id(token_id, "token_id"),))
        return int(self._append((seq_id,), np.array([row], dtype=np.int64), None, ids, True)[0])

    def append_tokens_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray = 1,
                            token_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Reserve ``num_tokens`` more slots for each sequence (an int: the same for all);
        return the slot mapping (int64): each sequence's new slots, sequence after sequence.

        Vectorised, all or nothing; every argument is checked first (a sequence
        named twice is refused, naming it). ``token_ids``: the new tokens' ids in
        that order (one per sequence in a decode step); sequences with pending
        prompt tokens take none. Copy-on-write as :meth:`append_tokens`, in
        batch order.
        """
        seq_ids = indexable(seq_ids)
        rows = self._seqs.distinct_rows(seq_ids, "append_tokens_batch() seq_ids")
        counts = None if type(num_tokens) is int and num_tokens == 1 else \
            count_array(num_tokens, len(rows), "num_tokens")
        ids = token_array(token_ids, "token_ids") if token_ids is not None else None
        want = len(rows) if counts is None else sum(counts.tolist())  # exact: no int64 sum
        if ids is not None and len(ids) != want:
            raise SequenceError(f"token_ids: expected one id per new token ({want}), got {len(ids)}")
        if counts is not None and want > self._max_new_tokens:
            self._refuse_beyond_pool(want, None)
        return self._append(seq_ids, rows, counts, ids, False)

    @property
    def _max_new_tokens(self) -> int:
        """The most tokens one append may ask for: the pool's slots (more never fit, and
        refusing them first keeps the planning's int64 arithmetic exact)."""
        return self.pool.num_blocks * self.block_size

    def _refuse_beyond_pool(self, num_tokens: int, seq_id: SeqId | None) -> None:
        avail = self.pool.num_available_blocks
        need = -(-num_tokens // self.block_size)
        subject = "the batch" if seq_id is None else f"sequence {seq_id!r}"
        raise OutOfBlocksError(f"{subject} needs {need} more blocks for {num_tokens} tokens "
                               f"(the pool has {self.pool.num_blocks}); {avail} available",
                               requested=need, available=avail)

    def _append(self, seq_ids: Sequence[SeqId], rows: np.ndarray, counts: np.ndarray | None,
                ids: array[int] | None, single: bool, reserving: bool = False) -> np.ndarray:
        """The one append: ``counts[i]`` tokens (None: one each) to each of the distinct ``rows``.

        Only a reservation (``reserving``: :mod:`~kvforge.core.reservations`) may add
        tokens after uncommitted ones: their ids must come first, in order."""
        tables, pool = self.tables, self.pool
        if tables.num_uncommitted_rows and not reserving:
            unc = tables.uncommitted_of(rows)
            stuck = (unc > 0) if counts is None else (unc > 0) & (counts > 0)
            if np.count_nonzero(stuck):
                i = int(np.flatnonzero(stuck)[0])
                raise SequenceError(f"sequence {seq_ids[i]!r} has {int(unc[i])} reserved token(s) whose ids are "
                                    f"not committed; commit_token_ids() or truncate() them before appending")
        plan = tables.plan_append(rows, counts, pool.ref_count, pool.is_cached)
        if ids is not None and plan.pending is not None:
            stuck = (plan.pending > 0) if counts is None else (plan.pending > 0) & (counts > 0)
            if np.count_nonzero(stuck):
                i = int(np.flatnonzero(stuck)[0])
                raise SequenceError(f"sequence {seq_ids[i]!r} still has {int(plan.pending[i])} prompt tokens "
                                    f"pending; append them (without token ids) first")
        need, avail = plan.num_new_blocks + len(plan.cow_rows), pool.num_available_blocks
        if need > avail:
            subject = (f"sequence {seq_ids[0]!r} needs {need} more blocks for "
                       f"{1 if counts is None else int(counts[0])} tokens") if single else \
                f"the batch needs {need} more blocks"
            raise OutOfBlocksError(f"{subject}; {avail} available", requested=need, available=avail)
        if plan.cow_rows:
            self._copy_on_write(plan.cow_rows)
        new_blocks = pool.allocate(plan.num_new_blocks) if plan.num_new_blocks else []
        slots = tables.commit_append(plan, new_blocks, None if ids is None else np.frombuffer(ids, np.int64))
        filled = tables.filled_rows(plan) if self.prefix.enabled else None
        if filled:
            chains = [self._seqs.state(seq_ids[i]) for i in filled]
            if counts is None:  # a decode step: each filled the block its token went to
                blocks = tables.last_blocks(rows[filled])
                self.prefix._extend_chains([c.keys for c in chains], [c.salt for c in chains],
                                           tables.block_tokens(blocks), blocks)  # made here: no checks
            else:
                for i, chain in zip(filled, chains):
                    chain.register_full_blocks(self.prefix, tables, int(rows[i]))
        return slots

    def _copy_on_write(self, rows: list[int]) -> None:
        """Give each row a private copy of its shared, partially filled last block.

        With :attr:`copy_blocks` set, the data is copied first and the tables
        change only after the copy succeeded: a copy that raises frees the new
        blocks and leaves every row as it was. Without it the pairs are queued
        in :attr:`pending_copies` for the caller to copy before anything reads
        the new blocks."""
        tables, pool = self.tables, self.pool
        fresh = pool.allocate(len(rows))
        pairs = list(zip(tables.last_blocks(rows), fresh))
        if self.copy_blocks is not None:
            try:
                self.flush_spills()  # the fresh blocks may have been evicted just now: copied out first
                self.copy_blocks(pairs)
            except BaseException:
                pool.free(fresh)
                raise
        for row, new_block in zip(rows, fresh):
            pool.free([tables.copy_on_write(row, new_block)])
        if self.copy_blocks is None:
            self.pending_copies += pairs
        self.num_cow_copies += len(rows)
