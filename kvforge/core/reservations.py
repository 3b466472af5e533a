"""Slots now, token ids later; and taking tokens back.

Two uses need the cache to separate a token's slot from its id:

- **asynchronous scheduling** reserves step ``t + 1``'s slots while step
  ``t``, which samples the ids, still runs:
  :meth:`SequenceReservations.reserve_tokens_batch` hands out the slots of
  *uncommitted* tokens, :meth:`SequenceReservations.commit_token_ids`
  supplies their ids a step later;
- **speculative decoding** appends draft tokens and then takes the rejected
  ones back: :meth:`SequenceReservations.truncate`.

Semantics, all or nothing (every argument is checked before anything changes):

- A reservation goes through the one append path (:mod:`~kvforge.core.appends`):
  the same slots, copy-on-write and refusals as ``append_tokens_batch``
  without ids. Uncommitted tokens are a sequence's last tokens; a sequence
  may hold several (reserve again before committing). Appending after them
  is refused until they are committed (their ids must come first, in order),
  and so is a reservation while prompt tokens are pending (chunked prefill:
  append the prompt first).
- A commit gives the ids of the *oldest* uncommitted tokens of each sequence,
  any number of them up to all (partial commits are allowed). Blocks that
  fill with known ids are keyed and registered then, with the keys an append
  with those ids would have given them (the same chain, the same call). While
  a sequence has uncommitted tokens its ids read as unknown
  (``token_ids()`` is None, a step view has no ``input_ids``).
- A sequence with uncommitted tokens cannot be forked (both would own slots
  whose one id is still to come); commit first. Swapping out, swapping in
  and compaction keep them (they follow their blocks).
- :meth:`SequenceReservations.truncate` takes a sequence back to its first
  ``num_tokens`` tokens, uncommitted ones included (they are the last, so
  they go first). Whole blocks past the end lose this sequence's reference:
  freed when it was the only one, kept for their other owners otherwise, and
  a full keyed block stays cached (evictable) as when a sequence is freed.
  The new partial last block, when this sequence is its only owner, loses its
  prefix key (it will be written again); when others share it (a fork, a
  prefix hit) or it stays keyed for them, it is left to them untouched and
  the sequence's next append copies it first (copy-on-write), so their
  tokens are never overwritten. Refused while prompt tokens are pending.
  :meth:`SequenceReservations.truncate_batch` truncates many sequences in one
  vectorised call.

:class:`SequenceReservations` is that part of :class:`~kvforge.core.manager.BlockManager`.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.host_tier import HostTier
from kvforge.core.ids import as_int, count_array, indexable, token_array
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import PrefixIndex
from kvforge.core.sequences import SequenceRows
from kvforge.core.tables import BlockTables
from kvforge.errors import SequenceError

__all__ = ["SequenceReservations"]

SeqId = Hashable


class SequenceReservations:
    """Reserve, commit and truncate (a mixin of :class:`~kvforge.core.manager.BlockManager`)."""

    block_size: int
    pool: BlockPool
    prefix: PrefixIndex
    tables: BlockTables
    host: HostTier
    _seqs: SequenceRows[KeyChain]
    pending_copies: list[tuple[int, int]]
    _append: Callable[..., np.ndarray]
    _max_new_tokens: int
    _refuse_beyond_pool: Callable[[int, SeqId | None], None]

    def num_uncommitted_tokens(self, seq_id: SeqId) -> int:
        """The sequence's last tokens whose slots are reserved and whose ids are not committed
        (:meth:`reserve_tokens_batch`), swapped out or not."""
        rec = self.host.swapped.get(seq_id) if self.host.swapped else None
        return rec.num_uncommitted if rec is not None else self.tables.num_uncommitted(self._seqs.row(seq_id))

    def reserve_tokens_batch(self, seq_ids: Sequence[SeqId],
                             num_tokens: int | Sequence[int] | np.ndarray = 1) -> np.ndarray:
        """Reserve ``num_tokens`` slots (an int: the same for all) for each sequence, for
        tokens whose ids are not known yet; return the slot mapping (int64), each
        sequence's new slots, sequence after sequence (as :meth:`append_tokens_batch`).

        The ids follow through :meth:`commit_token_ids`, oldest first. All or nothing;
        refused for an unknown, swapped or repeated id, a bad count, a sequence with
        pending prompt tokens (append the prompt first) or when the pool is short."""
        seq_ids = indexable(seq_ids)
        rows = self._seqs.distinct_rows(seq_ids, "reserve_tokens_batch() seq_ids")
        counts = None if type(num_tokens) is int and num_tokens == 1 else \
            count_array(num_tokens, len(rows), "reserve_tokens_batch() num_tokens")
        tables = self.tables
        pend = tables.pending_of(rows)
        stuck = (pend > 0) if counts is None else (pend > 0) & (counts > 0)
        if np.count_nonzero(stuck):
            i = int(np.flatnonzero(stuck)[0])
            raise SequenceError(f"reserve_tokens_batch(): sequence {seq_ids[i]!r} still has {int(pend[i])} prompt "
                                f"tokens pending; append them (append_tokens) before reserving tokens after them")
        if counts is not None and sum(counts.tolist()) > self._max_new_tokens:  # exact: no int64 sum
            self._refuse_beyond_pool(sum(counts.tolist()), None)
        known = tables.known_of(rows)
        slots = self._append(seq_ids, rows, counts, None, False, reserving=True)
        tables.mark_reserved(rows, counts, known)
        return slots

    def commit_token_ids(self, seq_ids: Sequence[SeqId], token_ids: Sequence[int] | np.ndarray,
                         num_tokens: int | Sequence[int] | np.ndarray = 1) -> None:
        """Give the ids of the oldest ``num_tokens`` (an int: the same for all) uncommitted
        tokens of each sequence: ``token_ids`` holds them sequence after sequence, in
        position order. Fewer than a sequence holds is allowed (the rest stay
        uncommitted). Blocks that fill with known ids are keyed and registered for
        prefix reuse now, exactly as an append with those ids would have.

        All or nothing; refused for an unknown, swapped or repeated id, a bad count,
        a wrong number of ids, a bad id, or more tokens than a sequence holds uncommitted."""
        seq_ids = indexable(seq_ids)
        rows = self._seqs.distinct_rows(seq_ids, "commit_token_ids() seq_ids")
        counts = None if type(num_tokens) is int and num_tokens == 1 else \
            count_array(num_tokens, len(rows), "commit_token_ids() num_tokens")
        ids = token_array(token_ids, "commit_token_ids() token_ids")
        want = len(rows) if counts is None else sum(counts.tolist())
        if len(ids) != want:
            raise SequenceError(f"commit_token_ids(): expected {want} token ids (num_tokens per sequence, "
                                f"sequence after sequence), got {len(ids)}")
        tables = self.tables
        unc = tables.uncommitted_of(rows)
        over = (unc < 1) if counts is None else (counts > unc)
        if np.count_nonzero(over):
            i = int(np.flatnonzero(over)[0])
            asked = 1 if counts is None else int(counts[i])
            raise SequenceError(f"commit_token_ids(): sequence {seq_ids[i]!r} has {int(unc[i])} uncommitted "
                                f"token(s); cannot commit {asked}")
        if not len(rows):
            return
        filled = tables.commit_ids(rows, counts, np.frombuffer(ids, np.int64))
        if len(filled) and self.prefix.enabled:
            chains = [self._seqs.state(seq_ids[i]) for i in filled.tolist()]
            if counts is None:  # one each: each filled exactly the block its token went to
                blocks = tables.last_committed_blocks(rows[filled])
                self.prefix._extend_chains([c.keys for c in chains], [c.salt for c in chains],
                                           tables.block_tokens(blocks), blocks)
            else:
                for i, chain in zip(filled.tolist(), chains):
                    chain.register_full_blocks(self.prefix, tables, int(rows[i]))

    def truncate(self, seq_id: SeqId, num_tokens: int) -> None:
        """Take the sequence back to its first ``num_tokens`` tokens (``0 <= num_tokens <=
        num_tokens(seq_id)``), uncommitted ones included; see the module docstring for
        what happens to its blocks. Refused for an unknown or swapped id, a bad count,
        or a sequence with pending prompt tokens; a refused call changes nothing."""
        row, chain = self._seqs.get(seq_id)
        tables, pool, bs = self.tables, self.pool, self.block_size
        n = tables.num_tokens(row)
        num_tokens = as_int(num_tokens, f"truncate({seq_id!r}) num_tokens")
        if num_tokens > n:
            raise SequenceError(f"truncate(): sequence {seq_id!r} has {n} tokens; cannot keep {num_tokens}")
        if tables.num_pending(row):
            raise SequenceError(f"truncate(): sequence {seq_id!r} still has {tables.num_pending(row)} prompt "
                                f"tokens pending (chunked prefill); append them first")
        if num_tokens == n:
            return
        shared = False
        if num_tokens % bs:  # a partial last block: whose is it?
            tail = tables.blocks(row, num_tokens // bs, num_tokens // bs + 1)[0]
            if pool.ref_count(tail) > 1:
                shared = True  # the others keep it, and its key: the next append copies it
            elif pool.is_cached(tail):
                self.prefix._unregister(tail)  # this sequence's only: it will be written again
        chain.truncate(num_tokens // bs)
        self._release_truncated(tables.truncate_row(row, num_tokens, shared)[::-1])

    def truncate_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray) -> None:
        """:meth:`truncate` of many sequences in one vectorised call (a speculative step's
        rejected drafts): sequence ``i`` keeps its first ``num_tokens[i]`` tokens (an int:
        the same for all). All or nothing; a sequence named twice is refused. The same as
        truncating them one by one, those that drop blocks first (a block another sequence
        of the batch lets go of counts as let go when its new owner's tail is decided)."""
        seq_ids = indexable(seq_ids)
        rows = self._seqs.distinct_rows(seq_ids, "truncate_batch() seq_ids")
        counts = count_array(num_tokens, len(rows), "truncate_batch() num_tokens")
        tables, pool, bs, what = self.tables, self.pool, self.block_size, "truncate_batch()"
        ntok = tables.num_tokens_of(rows)
        over = counts > ntok
        if np.count_nonzero(over):
            i = int(np.flatnonzero(over)[0])
            raise SequenceError(f"{what}: sequence {seq_ids[i]!r} has {int(ntok[i])} tokens; "
                                f"cannot keep {int(counts[i])}")
        pend = tables.pending_of(rows)
        if np.count_nonzero(pend):
            i = int(np.flatnonzero(pend)[0])
            raise SequenceError(f"{what}: sequence {seq_ids[i]!r} still has {int(pend[i])} prompt tokens "
                                f"pending (chunked prefill); append them first")
        cut = np.flatnonzero(counts < ntok)
        if not len(cut):
            return
        rows, counts = rows[cut], counts[cut]
        dropped = tables.truncate_rows(rows, counts)
        partial = np.flatnonzero(counts % bs)
        if len(partial):  # a partial last block: whose is it, once this batch's drops are done?
            drops: dict[int, int] = {}
            for b in dropped:
                drops[b] = drops.get(b, 0) + 1
            part_rows = rows[partial].tolist()
            for row, tail in zip(part_rows, tables.last_blocks(part_rows)):
                if pool.ref_count(tail) - drops.get(tail, 0) > 1:
                    tables.mark_tail_shared(row)  # the others keep it, and its key: the next append copies it
                elif pool.is_cached(tail):
                    self.prefix._unregister(tail)  # this sequence's only: it will be written again
        for i, n in zip(cut.tolist(), counts.tolist()):
            self._seqs.state(seq_ids[i]).truncate(n // bs)
        self._release_truncated(dropped)

    def _release_truncated(self, dropped: list[int]) -> None:
        """Drop the truncated sequences' references on the blocks past their new ends (each
        sequence's last block first, as ``free_sequence``: eviction takes it first)."""
        if dropped:
            pool = self.pool
            pool.free(dropped)
            if self.pending_copies:  # a queued copy into a block now free would write nobody's block
                self.pending_copies = [(s, d) for s, d in self.pending_copies
                                       if pool.ref_count(d) or pool.is_cached(d)]
