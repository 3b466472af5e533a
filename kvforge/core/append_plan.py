"""The append path over the block tables: plan it, then commit it.

An append of ``counts[i]`` tokens to each of a batch of rows is planned first
(:meth:`AppendPlanning.plan_append`: the new counts, how many blocks open,
which rows must copy a shared partial last block), with nothing changed, so
the manager can check the pool and refuse the whole batch; then committed
(:meth:`AppendPlanning.commit_append`) with the blocks the pool handed out.
A decode step (one token each) takes a path without per-row repeats.
:class:`AppendPlanning` is that part of :class:`~kvforge.core.tables.BlockTables`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from kvforge.core.rows import TableRows, int_max, int_sum

__all__ = ["AppendPlan", "AppendPlanning"]


class AppendPlan(NamedTuple):
    """What an append will do (:meth:`AppendPlanning.plan_append`); nothing changed yet.

    ``counts`` is None when every row gains one token (a decode step); then
    ``offset`` is each row's ``num_tokens % block_size`` (0: it opens a block).
    ``num_new_blocks`` blocks are needed besides one per ``cow_rows`` entry: rows
    that must copy their shared partial last block first. ``pending``: the rows'
    pending prompt tokens, None when no row has any.
    """

    rows: np.ndarray
    counts: np.ndarray | None
    old: np.ndarray
    new: np.ndarray
    offset: np.ndarray | None
    need: np.ndarray | None
    num_new_blocks: int
    cow_rows: list[int]
    flagged: bool
    pending: np.ndarray | None


class AppendPlanning(TableRows):
    """Plan and commit appends on the rows (a mixin of :class:`~kvforge.core.tables.BlockTables`)."""

    def plan_append(self, rows: np.ndarray, counts: np.ndarray | None, ref_count: Callable[[int], int],
                    is_cached: Callable[[int], bool] | None = None) -> AppendPlan:
        """What appending ``counts[i]`` tokens (None: one each) to each row needs; changes nothing.

        A row gaining tokens in a partial last block that ``ref_count`` says is
        shared copies it, as sequential appends would: every sharer in the batch
        but the last one left holding the block. A partial last block that
        ``is_cached`` (a full block a truncation took a row back into, still
        keyed for its other owners) is copied by every row that writes into it."""
        bs = self.block_size
        old = self._ntok[rows]
        offset = need = None
        if counts is None:
            offset = old % bs
            new = old + 1
            total = len(rows) - int(np.count_nonzero(offset))  # a row at offset 0 opens a block
        else:
            new = old + counts
            need = (new + bs - 1) // bs - self._nblk[rows]
            total = int_sum(need)
        cow: list[int] = []
        flagged = bool(np.count_nonzero(self._shared_tail[rows]))  # count_nonzero: cheaper than any()
        if flagged:
            refs_left: dict[int, int] = {}
            for r, o, k in zip(rows.tolist(), old.tolist(), [1] * len(rows) if counts is None else counts.tolist()):
                if k and self._shared_tail[r] and o % bs:
                    tail = int(self._tables[r, self._nblk[r] - 1])
                    left = refs_left.get(tail)
                    left = ref_count(tail) if left is None else left
                    if left > 1 or (is_cached is not None and is_cached(tail)):
                        cow.append(r)
                        refs_left[tail] = left - 1
        pending = self._npending[rows]
        return AppendPlan(rows, counts, old, new, offset, need, total, cow, flagged,
                          pending if np.count_nonzero(pending) else None)

    def commit_append(self, plan: AppendPlan, block_ids: list[int], token_ids: np.ndarray | None) -> np.ndarray:
        """Apply ``plan`` (its copies made) with its ``num_new_blocks`` new ``block_ids`` (in row
        order); return the new tokens' slots (int64), row after row. ``token_ids``: their ids,
        None: unknown. Pending prompt tokens come first, their ids known; a row that gains more
        tokens than it had pending without ids is no longer known."""
        rows, counts, bs = plan.rows, plan.counts, self.block_size
        if plan.flagged:  # a row that gains no token keeps its flag: its tail may be shared
            self._shared_tail[rows if counts is None or counts.min() > 0 else rows[counts > 0]] = False
        if block_ids:
            if counts is None:
                g_rows = rows[plan.offset == 0]
                start = self._nblk[g_rows]
                self._ensure_width(int_max(start) + 1)
                self._tables[g_rows, start] = block_ids
                self._nblk[g_rows] = start + 1
            else:
                grow = plan.need > 0  # type: ignore[operator]
                g_rows, g_need = rows[grow], plan.need[grow]  # type: ignore[index]
                start = self._nblk[g_rows]
                self._ensure_width(int_max(start + g_need))
                self._tables[self._positions(g_rows, start, g_need)] = block_ids
                self._nblk[g_rows] = start + g_need
        self._ntok[rows] = plan.new
        if counts is None:
            slots = self._tables[rows, plan.old // bs].astype(np.int64) * bs + plan.offset
        else:
            slots = self._slots_at(*self._positions(rows, plan.old, counts))
        if token_ids is not None:
            self._slot_tokens.write(slots, token_ids)
        elif plan.pending is None:
            self._known[rows if counts is None else rows[counts > 0]] = False
        if plan.pending is not None:
            self._take_pending(plan, slots, token_ids is None)
        return slots

    def _take_pending(self, plan: AppendPlan, slots: np.ndarray, unknown: bool) -> None:
        """Store the ids of the pending prompt tokens an append reserved (the first of each row's)."""
        ks = np.ones(len(plan.rows), dtype=np.int64) if plan.counts is None else plan.counts
        pend = plan.pending
        self._npending[plan.rows] = np.maximum(0, pend - ks)  # type: ignore[operator]
        if unknown:  # tokens past the prompt came without ids
            self._known[plan.rows[ks > pend]] = False  # type: ignore[operator]
        starts = np.cumsum(ks) - ks
        for i in ((pend > 0) & (ks > 0)).nonzero()[0].tolist():  # type: ignore[operator]
            row, take, start = int(plan.rows[i]), min(int(ks[i]), int(pend[i])), int(starts[i])  # type: ignore[index]
            ids = self._pending_ids.pop(row)
            self._slot_tokens.write(slots[start:start + take], ids[:take])
            if take < len(ids):
                self._pending_ids[row] = ids[take:]

    def filled_rows(self, plan: AppendPlan) -> list[int]:
        """Indices into ``plan.rows`` of the known rows whose committed append filled a block."""
        bs = self.block_size
        idx = ((plan.offset == bs - 1) if plan.counts is None else (plan.new // bs > plan.old // bs)).nonzero()[0]
        return idx[self._known[plan.rows[idx]]].tolist() if len(idx) else []
