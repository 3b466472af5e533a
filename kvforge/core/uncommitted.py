"""Uncommitted tokens and truncation over the block tables.

An *uncommitted* token has a reserved slot (its keys and values may be
written) but no token id yet: the id comes later, from a step still running
(asynchronous scheduling). The tables already know tokens appended without
ids (the row is then not *known*, for good); an uncommitted token is such a
token whose id is promised. Per row they are counted (``_nunc``): they are
always the row's **last** ``_nunc`` tokens, committed oldest first, and
beside the count the tables keep whether every id before them is known
(``_head_known``). While a row has uncommitted tokens it reads as not known
(step views give no input ids, the manager gives no token ids); when the last
one is committed the row is known again exactly when its head was.

:meth:`UncommittedRows.mark_reserved` records a reservation (the append path
reserved the slots), :meth:`UncommittedRows.commit_ids` writes ids into the
oldest uncommitted slots, :meth:`UncommittedRows.truncate_row` (one row, scalar: a
single call's fast path) and :meth:`UncommittedRows.truncate_rows` (many,
vectorised) take rows back to fewer tokens (uncommitted ones go first, as they are the last).
:class:`UncommittedRows` is that part of :class:`~kvforge.core.tables.BlockTables`;
the manager (:mod:`~kvforge.core.reservations`) checks every argument first.
"""
from __future__ import annotations

import numpy as np

from kvforge.core.rows import TableRows

__all__ = ["UncommittedRows"]


class UncommittedRows(TableRows):
    """Uncommitted tokens and truncation (a mixin of :class:`~kvforge.core.tables.BlockTables`).

    ``rows`` arguments are distinct live rows (int64); nothing here validates caller input.
    """

    def num_uncommitted(self, row: int) -> int:
        """The row's last tokens whose slots are reserved and whose ids are not committed yet."""
        return int(self._nunc[row])

    def uncommitted_of(self, rows: np.ndarray) -> np.ndarray:
        """Uncommitted tokens, per row (int64 copy)."""
        return self._nunc[rows]

    def pending_of(self, rows: np.ndarray) -> np.ndarray:
        """Pending prompt tokens (ids known, no slot), per row (int64 copy)."""
        return self._npending[rows]

    def known_of(self, rows: np.ndarray) -> np.ndarray:
        """Whether every token id is known, per row (bool copy)."""
        return self._known[rows]

    @property
    def num_uncommitted_rows(self) -> int:
        """Rows with at least one uncommitted token."""
        return self._num_uncommitted_rows

    def is_head_known(self, row: int) -> bool:
        """Whether every id before the row's uncommitted tokens is known (all of them when it has none)."""
        return bool(self._head_known[row]) if self._nunc[row] else bool(self._known[row])

    def keyable_tokens(self, row: int) -> int:
        """How many of the row's first tokens have known ids, as far as prefix keys may go:
        all of a known row, those before the uncommitted ones when they are known, else 0."""
        if self._known[row]:
            return int(self._ntok[row])
        if self._nunc[row] and self._head_known[row]:
            return int(self._ntok[row] - self._nunc[row])
        return 0

    def last_committed_blocks(self, rows: np.ndarray) -> list[int]:
        """The block of each row's last committed full block (each row has one)."""
        idx = (self._ntok[rows] - self._nunc[rows]) // self.block_size - 1
        return self._tables[rows, idx].tolist()

    def mark_reserved(self, rows: np.ndarray, counts: np.ndarray | None, known_before: np.ndarray) -> None:
        """Record that the append path just reserved ``counts[i]`` (None: 1 each) slots of
        ``rows`` without ids, as uncommitted tokens; ``known_before``: each row's
        :meth:`known_of` before that append."""
        if counts is not None:
            grow = counts > 0
            rows, counts, known_before = rows[grow], counts[grow], known_before[grow]
        fresh = self._nunc[rows] == 0
        self._head_known[rows[fresh]] = known_before[fresh]
        self._num_uncommitted_rows += int(np.count_nonzero(fresh))
        self._nunc[rows] += 1 if counts is None else counts

    def commit_ids(self, rows: np.ndarray, counts: np.ndarray | None, token_ids: np.ndarray) -> np.ndarray:
        """Write ``token_ids`` (int64, row after row) into the oldest ``counts[i]`` (None: 1
        each, at most :meth:`uncommitted_of`) uncommitted slots of each row; a row whose
        last one is committed is known again when its head was. Returns the indices into
        ``rows`` of the rows with a known head whose committed tokens filled a block (their
        new full blocks may be keyed)."""
        bs = self.block_size
        unc, head = self._nunc[rows], self._head_known[rows]
        start = self._ntok[rows] - unc
        if counts is None:
            slots, k = self._slots_at(rows, start), 1
        else:
            slots, k = self._slots_at(*self._positions(rows, start, counts)), counts
        self._slot_tokens.write(slots, token_ids)
        left = unc - k
        self._nunc[rows] = left
        done = rows[(left == 0) & (unc > 0)]
        if len(done):
            self._known[done] = self._head_known[done]
            self._head_known[done] = False
            self._num_uncommitted_rows -= len(done)
        return (((start + k) // bs > start // bs) & head).nonzero()[0]

    def restore_uncommitted(self, row: int, num_uncommitted: int, head_known: bool) -> None:
        """Mark the last ``num_uncommitted`` tokens of a freshly assigned row (a swap-in) as
        uncommitted again; ``head_known``: the ids before them are known (assigned already)."""
        if num_uncommitted:
            self._nunc[row] = num_uncommitted
            self._head_known[row] = head_known
            self._known[row] = False
            self._num_uncommitted_rows += 1

    def truncate_row(self, row: int, num_tokens: int, shared_tail: bool) -> list[int]:
        """Take the row back to its first ``num_tokens`` tokens (fewer than it has; it has no
        pending prompt tokens); return the block ids it no longer holds, in position order.

        Uncommitted tokens are the last, so they go first; a row left without any is known
        when its head was, and a row left empty is known (no id is missing). ``shared_tail``:
        the new partial last block may be shared (its next append copies it first)."""
        bs = self.block_size
        nb, cut = int(self._nblk[row]), int(self._ntok[row]) - num_tokens
        keep = -(-num_tokens // bs)
        dropped = self._tables[row, keep:nb].tolist()
        self._tables[row, keep:nb] = -1
        self._nblk[row], self._ntok[row] = keep, num_tokens
        unc = int(self._nunc[row])
        if unc:
            left = max(0, unc - cut)
            self._nunc[row] = left
            if not left:
                self._known[row] = self._head_known[row]
                self._head_known[row] = False
                self._num_uncommitted_rows -= 1
        if num_tokens == 0:
            self._known[row] = True
        self._shared_tail[row] = bool(shared_tail and num_tokens % bs)
        return dropped

    def truncate_rows(self, rows: np.ndarray, num_tokens: np.ndarray) -> list[int]:
        """Take each row back to its first ``num_tokens[i]`` tokens (fewer than it has; it has
        no pending prompt tokens); return the block ids they no longer hold, row after row,
        each row's last block first.

        As :meth:`truncate_row`, vectorised; every row's shared-tail flag is cleared (the
        caller flags the rows whose new partial last block is shared: ``mark_tail_shared``)."""
        bs = self.block_size
        keep, nb = -(-num_tokens // bs), self._nblk[rows]
        width = int(nb.max()) if len(rows) else 0
        sub = self._tables[rows, :width]
        cols = np.arange(width)[None, :]
        gone = (cols >= keep[:, None]) & (cols < nb[:, None])
        dropped = sub[:, ::-1][gone[:, ::-1]].tolist()
        sub[gone] = -1
        self._tables[rows, :width] = sub
        cut = self._ntok[rows] - num_tokens
        self._nblk[rows], self._ntok[rows] = keep, num_tokens
        unc = self._nunc[rows]
        if np.count_nonzero(unc):
            left = np.maximum(0, unc - cut)
            self._nunc[rows] = left
            done = rows[(unc > 0) & (left == 0)]
            self._known[done] = self._head_known[done]
            self._head_known[done] = False
            self._num_uncommitted_rows -= len(done)
        self._known[rows[num_tokens == 0]] = True
        self._shared_tail[rows] = False
        return dropped
