"""The rows of the block tables: one live sequence per row, in numpy arrays.

:class:`TableRows` owns, per *row*, its block table (a row of an int32
matrix padded with -1), its token and block counts, its pending prompt
tokens (ids known, no slot yet), its *uncommitted* tokens (a slot reserved,
the id to come: :mod:`~kvforge.core.uncommitted`), whether its partially
filled last block may be shared, and whether every one of its token ids is
*known*; and the token
id held in each slot of the pool (a :class:`~kvforge.core.slots.SlotTokens`,
host memory only for the blocks written so far). Rows are created once and
reused; the arrays grow by doubling. No Python object is touched per
sequence on the decode path. The batched reads (:mod:`~kvforge.core.steps`)
and the append path (:mod:`~kvforge.core.append_plan`) work on these arrays;
:class:`~kvforge.core.tables.BlockTables` is the three together.

Slots: token ``pos`` of a row lives in block ``table[pos // block_size]`` at
offset ``pos % block_size``; its slot id is ``block_id * block_size + offset``.

Invariants (:meth:`TableRows.check_invariants`): a live row of ``t`` tokens
holds exactly ``ceil(t / block_size)`` block ids and -1 past them; a free row
is all -1 with zero counts and no flags. The slots of a known row's tokens
hold their ids (blocks shared with other rows hold the same ids there). A row
with uncommitted tokens is not known (its last ids are missing); whether the
ids before them are is kept beside it, and it has no pending prompt tokens.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from kvforge.core.slots import SlotTokens

__all__ = ["TableRows", "int_max", "int_sum", "remap_blocks"]


class TableRows:
    """Rows of block ids and counts for the sequences over a pool of ``num_blocks`` blocks.

    ``rows`` arguments are int64 arrays of live rows (distinct for an append):
    the manager guarantees that; nothing here validates caller input.
    """

    def __init__(self, block_size: int, num_blocks: int, *, rows: int = 64, width: int = 16) -> None:
        self.block_size = int(block_size)
        self._tables = np.full((rows, width), -1, dtype=np.int32)
        self._nblk = np.zeros(rows, dtype=np.int64)
        self._ntok = np.zeros(rows, dtype=np.int64)
        self._npending = np.zeros(rows, dtype=np.int64)  # prompt tokens known but not reserved
        self._shared_tail = np.zeros(rows, dtype=bool)   # last block partial and possibly shared
        self._known = np.zeros(rows, dtype=bool)         # every token id of the row is known
        self._nunc = np.zeros(rows, dtype=np.int64)       # last tokens reserved, ids not committed yet
        self._head_known = np.zeros(rows, dtype=bool)    # with _nunc: every id before them is known
        self._live = np.zeros(rows, dtype=bool)
        self._num_uncommitted_rows = 0                   # rows with _nunc > 0: appends check only then
        self._slot_tokens = SlotTokens(self.block_size, num_blocks)  # grows with use
        self._pending_ids: dict[int, np.ndarray] = {}  # row -> ids of its pending prompt tokens
        self._free_rows: list[int] = []
        self._next_row = 0

    # ------------------------------------------------------------------ rows
    def new_row(self) -> int:
        """A cleared row for a new sequence (the last freed one first); grows the arrays by doubling."""
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row = self._next_row
            if row == len(self._nblk):
                self._tables = np.concatenate([self._tables, np.full_like(self._tables, -1)])
                (self._nblk, self._ntok, self._npending, self._shared_tail, self._known, self._nunc,
                 self._head_known, self._live) = (
                    np.concatenate([a, np.zeros_like(a)]) for a in
                    (self._nblk, self._ntok, self._npending, self._shared_tail, self._known, self._nunc,
                     self._head_known, self._live))
            self._next_row += 1
        self._live[row] = True
        return row

    def assign(self, row: int, block_ids: list[int], num_tokens: int, token_ids: np.ndarray | None,
               num_cached: int = 0) -> np.ndarray:
        """Give a new row its blocks (``ceil(num_tokens / block_size)`` of them) for its first
        ``num_tokens`` tokens, of ids ``token_ids`` (None: unknown; more ids than tokens: the
        rest are pending). The first ``num_cached`` tokens sit in cached blocks, which hold
        their ids already. Returns the slots (int64) of the other reserved tokens."""
        self._ensure_width(len(block_ids))
        self._tables[row, : len(block_ids)] = block_ids
        self._nblk[row], self._ntok[row] = len(block_ids), num_tokens
        slots = self.row_slots(row, num_cached, num_tokens)
        self._known[row] = token_ids is not None
        if token_ids is not None:
            self._slot_tokens.write(slots, token_ids[num_cached:num_tokens])
            self._npending[row] = len(token_ids) - num_tokens
            if len(token_ids) > num_tokens:
                self._pending_ids[row] = token_ids[num_tokens:].copy()
        return slots

    def fork_row(self, parent: int) -> int:
        """A new row sharing every block of ``parent`` (which has no uncommitted tokens: the
        manager refuses that fork); both tails are marked shared when partial."""
        assert not self._nunc[parent], "fork of a row with uncommitted tokens"
        row = self.new_row()
        for a in (self._tables, self._nblk, self._ntok, self._npending, self._known):
            a[row] = a[parent]
        if parent in self._pending_ids:  # shared: pending ids are sliced, never changed in place
            self._pending_ids[row] = self._pending_ids[parent]
        partial = int(self._ntok[parent]) % self.block_size != 0
        self._shared_tail[row] = partial
        self._shared_tail[parent] |= partial
        return row

    def release_row(self, row: int) -> None:
        """Clear a row for reuse."""
        self._tables[row, : self._nblk[row]] = -1
        if self._nunc[row]:
            self._num_uncommitted_rows -= 1
        self._nblk[row] = self._ntok[row] = self._npending[row] = self._nunc[row] = 0
        self._shared_tail[row] = self._known[row] = self._head_known[row] = self._live[row] = False
        self._pending_ids.pop(row, None)
        self._free_rows.append(row)

    def _ensure_width(self, width: int) -> None:
        cur = self._tables.shape[1]
        if width > cur:  # doubling: a long decode widens the matrix a logarithmic number of times
            grown = np.full((self._tables.shape[0], max(width, 2 * cur)), -1, dtype=np.int32)
            grown[:, :cur] = self._tables
            self._tables = grown

    def live_rows(self) -> np.ndarray:
        """Rows of live sequences (int64, ascending)."""
        return np.flatnonzero(self._live[: self._next_row])

    @staticmethod
    def are_distinct(rows: np.ndarray) -> bool:
        """Whether no row appears twice in ``rows``."""
        return not len(rows) or int(np.bincount(rows).max()) == 1

    # ------------------------------------------------------------- one row
    def num_tokens(self, row: int) -> int:
        """Tokens with a reserved slot."""
        return int(self._ntok[row])

    def num_pending(self, row: int) -> int:
        """Prompt tokens known but without a slot yet."""
        return int(self._npending[row])

    def is_known(self, row: int) -> bool:
        """Whether every token id of the row (reserved or pending) is known."""
        return bool(self._known[row])

    def is_tail_shared(self, row: int) -> bool:
        """Whether the row's partial last block may be shared (an append checks its references)."""
        return bool(self._shared_tail[row])

    def mark_tail_shared(self, row: int) -> None:
        """Flag the row's last block as possibly shared (when it is partial)."""
        if self._ntok[row] % self.block_size:
            self._shared_tail[row] = True

    def blocks(self, row: int, start: int = 0, stop: int | None = None) -> list[int]:
        """Block ids ``start .. stop - 1`` of the row (default: all), in position order."""
        nb = int(self._nblk[row])
        return self._tables[row, start: nb if stop is None else min(stop, nb)].tolist()

    def block_of(self, row: int, pos: int) -> tuple[int, int]:
        """``(block_id, offset)`` of token ``pos`` (the caller checked ``0 <= pos < num_tokens``)."""
        return int(self._tables[row, pos // self.block_size]), int(pos % self.block_size)

    def row_slots(self, row: int, start: int, stop: int) -> np.ndarray:
        """Slots (int64) of the row's tokens ``start .. stop - 1``."""
        pos = np.arange(start, stop, dtype=np.int64)
        return self._tables[row, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size

    def copy_on_write(self, row: int, block_id: int) -> int:
        """Put ``block_id`` in place of the row's last block, its token ids copied; return the old id."""
        last = int(self._nblk[row]) - 1
        old = int(self._tables[row, last])
        self._tables[row, last] = block_id
        self._slot_tokens.copy_blocks([old], [block_id])
        return old

    # ---------------------------------------------------------- token ids
    def token_ids(self, row: int) -> np.ndarray:
        """The row's token ids (int64), reserved then pending; meaningful when the row is known."""
        ids = self._slot_tokens.read(self.row_slots(row, 0, int(self._ntok[row])))
        pending = self._pending_ids.get(row)
        return ids if pending is None else np.concatenate([ids, pending])

    def block_tokens(self, block_ids: Sequence[int]) -> bytes:
        """The token ids held by these blocks, int64 bytes, block after block (what a key hashes)."""
        return self._slot_tokens.block_bytes(block_ids)

    # ------------------------------------------------------------- batches
    def num_tokens_of(self, rows: np.ndarray) -> np.ndarray:
        """Tokens with a slot, per row (int64 copy)."""
        return self._ntok[rows]

    def num_blocks_of(self, rows: np.ndarray) -> np.ndarray:
        """Table lengths, per row (int64 copy)."""
        return self._nblk[rows]

    def last_blocks(self, rows: Sequence[int]) -> list[int]:
        """The last block id of each row (each must hold one)."""
        return self._tables[rows, self._nblk[rows] - 1].tolist() if len(rows) else []

    @staticmethod
    def _positions(rows: np.ndarray, start: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows repeated ``counts`` times and positions ``start[i] .. start[i] + counts[i] - 1``."""
        if len(counts) == 1:  # one row (append_tokens): no repeat needed
            n, first = int(counts[0]), int(start[0])
            return rows.repeat(n), np.arange(first, first + n)
        begin = counts.cumsum() - counts
        return rows.repeat(counts), (start - begin).repeat(counts) + np.arange(int_sum(counts))

    def _slots_at(self, tok_rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self._tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs

    # -------------------------------------------------------------- upkeep
    def relocate(self, moves: Sequence[tuple[int, int]], num_blocks: int) -> None:
        """Follow compaction moves ``src -> dst`` (ids below ``num_blocks``): tables and token ids."""
        src, dst = remap_blocks(self._tables, moves, num_blocks)
        self._slot_tokens.copy_blocks(src, dst)

    def metadata_bytes(self) -> int:
        """Host bytes of the row arrays, the slot token ids and the free-row list."""
        arrays = (self._tables, self._nblk, self._ntok, self._npending, self._shared_tail, self._known,
                  self._nunc, self._head_known, self._live)
        return int(sum(a.nbytes for a in arrays) + self._slot_tokens.nbytes
                   + sum(a.nbytes for a in self._pending_ids.values())
                   + sys.getsizeof(self._free_rows) + sys.getsizeof(self._pending_ids))

    def check_invariants(self, num_block_ids: int) -> None:
        """Assert row consistency; block ids must lie in ``0..num_block_ids-1``."""
        n = self._next_row
        live, nb, nt, tab = self._live[:n], self._nblk[:n], self._ntok[:n], self._tables[:n]
        assert (nb == -(-nt // self.block_size))[live].all(), "a row's block count does not match its tokens"
        held = np.arange(tab.shape[1])[None, :] < nb[:, None]
        assert ((tab >= 0) & (tab < num_block_ids))[held].all(), "bad block id in a table"
        assert (tab[~held] == -1).all(), "stale block id past a table's end"
        unc, head = self._nunc[:n], self._head_known[:n]
        flags = (nb, nt, self._npending[:n], self._shared_tail[:n], self._known[:n], unc, head)
        assert not any(a[~live].any() for a in flags), "a free row is not cleared"
        assert sorted(self._free_rows) == np.flatnonzero(~live).tolist(), "free rows lost or duplicated"
        assert not self._live[n:].any() and (self._tables[n:] == -1).all()
        pend = self._npending[:n]
        assert self._known[:n][pend > 0].all(), "a row with pending prompt ids is not known"
        assert {r: len(a) for r, a in self._pending_ids.items()} == \
            {r: int(pend[r]) for r in np.flatnonzero(pend).tolist()}, "pending ids do not match the counts"
        assert ((unc >= 0) & (unc <= nt)).all(), "uncommitted tokens outside a row's tokens"
        assert not self._known[:n][unc > 0].any(), "a row with uncommitted tokens is known"
        assert not head[unc == 0].any(), "a row without uncommitted tokens has a known head"
        assert not pend[unc > 0].any(), "a row with uncommitted tokens has pending prompt tokens"
        assert self._num_uncommitted_rows == int(np.count_nonzero(unc)), "uncommitted row count drifted"
        assert not self._nunc[n:].any() and not self._head_known[n:].any()
        for row in np.flatnonzero(self._known[:n] | head).tolist():
            assert self._slot_tokens.is_stored(self.row_slots(row, 0, int(nt[row] - unc[row]))), \
                f"row {row} is known but some of its slots were never written"



def remap_blocks(tables: np.ndarray, moves: Sequence[tuple[int, int]], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite every block id ``src`` of ``tables`` (int32, -1 = none) to ``dst`` in place, for
    compaction moves ``src -> dst`` below ``num_blocks``; return the moves' ``(src, dst)`` arrays."""
    remap = np.arange(num_blocks, dtype=np.int32)
    src, dst = np.array(moves, dtype=np.int64).reshape(-1, 2).T
    remap[src] = dst
    live = tables >= 0
    tables[live] = remap[tables[live]]
    return src, dst


# numpy reductions cost microseconds each; a one-row batch (append_tokens) reads its element
def int_sum(a: np.ndarray) -> int:
    """``int(a.sum())``, without the reduction for one element."""
    return int(a[0]) if len(a) == 1 else int(a.sum())


def int_max(a: np.ndarray) -> int:
    """``int(a.max())``, without the reduction for one element."""
    return int(a[0]) if len(a) == 1 else int(a.max())
