"""The batched views of the block tables: what one forward step reads.

:class:`StepView` is every kernel input of a step (positions, slots, context
lengths, padded tables, query offsets, input ids), built by
:meth:`TableViews.step_view` in one vectorised pass over the rows; the other
views (:meth:`TableViews.slot_mapping`, :meth:`TableViews.block_table_array`,
:meth:`TableViews.context_lens`) are its parts, read alone. Every view is a
fresh array: later bookkeeping never changes it. :class:`TableViews` is that
part of :class:`~kvforge.core.tables.BlockTables`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kvforge.core.rows import TableRows

__all__ = ["StepView", "TableViews"]


class StepView(NamedTuple):
    """What the kernels of one forward step read, for ``B`` sequences and ``T`` tokens.

    Sequence ``i`` computes its last ``q_i`` tokens, positions
    ``context_lens[i] - q_i .. context_lens[i] - 1``; ``T = sum(q_i)``.
    ``positions`` int64 ``[T]`` and their ``slot_mapping`` int64 ``[T]``
    (``block_id * block_size + pos % block_size``), sequence after sequence;
    ``context_lens`` int32 ``[B]``; ``block_tables`` int32 ``[B, W]`` padded
    with -1, ``W`` the longest table (at least 1) rounded up to the step's
    ``width_multiple``; ``query_start_loc`` int32 ``[B + 1]`` (``0, q_0,
    q_0 + q_1, ...``); ``input_ids`` int64 ``[T]``, or None when some id is
    unknown. Fresh arrays: later bookkeeping never changes them.
    """

    positions: np.ndarray
    slot_mapping: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    query_start_loc: np.ndarray
    input_ids: np.ndarray | None


class TableViews(TableRows):
    """The batched reads of :class:`~kvforge.core.tables.BlockTables` (a mixin over the rows)."""

    def block_table_array(self, rows: np.ndarray, width: int | None = None) -> np.ndarray:
        """``[len(rows), width]`` int32 tables padded with -1 (``width``: default the longest)."""
        w = int(self._nblk[rows].max()) if len(rows) and width is None else (width or 0)
        self._ensure_width(w)
        return self._tables[rows, :w]

    def context_lens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens with a slot, per row (int32)."""
        return self._ntok[rows].astype(np.int32)

    def _last(self, rows: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        ntok = self._ntok[rows]
        return (rows, ntok - 1) if counts is None else self._positions(rows, ntok - counts, counts)

    def slot_mapping(self, rows: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
        """Slots (int64) of the last ``counts[i]`` tokens of each row (None: 1 each), concatenated;
        the caller checked ``0 <= counts[i] <= num_tokens``."""
        return self._slots_at(*self._last(rows, counts))

    def step_view(self, rows: np.ndarray, counts: np.ndarray | None, width_multiple: int) -> StepView:
        """The :class:`StepView` of these rows computing their last ``counts`` tokens (None: 1 each)."""
        tok_rows, pos = self._last(rows, counts)
        slots = self._slots_at(tok_rows, pos)
        longest = int(self._nblk[rows].max()) if len(rows) else 0
        width = -(-max(1, longest) // width_multiple) * width_multiple
        if width <= self._tables.shape[1]:
            tables = self._tables[rows, :width]
        else:  # padding beyond the matrix: a view does not grow it
            tables = np.full((len(rows), width), -1, dtype=np.int32)
            tables[:, :longest] = self._tables[rows, :longest]
        qsl = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(np.ones(len(rows), dtype=np.int32) if counts is None else counts, out=qsl[1:])
        known = self._known[rows] if counts is None else self._known[rows] | (counts == 0)
        ids = self._slot_tokens.read(slots) if np.count_nonzero(known) == len(rows) else None
        return StepView(pos, slots, self._ntok[rows].astype(np.int32), tables, qsl, ids)
