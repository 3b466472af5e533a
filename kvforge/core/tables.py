"""Block tables of many sequences as rows of numpy arrays, the token id of every slot,
and the batched views.

:class:`BlockTables` owns, per *row* (one live sequence each), its block
table (a row of an int32 matrix padded with -1), its token and block counts,
its pending prompt tokens (ids known, no slot yet), whether its partially
filled last block may be shared, and whether every one of its token ids is
*known*. It also keeps the token id held in each slot of the pool (a
:class:`~kvforge.core.slots.SlotTokens`, host memory only for the blocks
written so far), so a decode step stores its ids with one scatter, a filled
block's prefix key hashes its slots, and a step's ``input_ids`` are one gather. Rows are created once and reused; the arrays
grow by doubling. No Python object is touched per sequence on the decode path.

It knows nothing of pools, prefixes or sequence ids: the
:class:`~kvforge.core.manager.BlockManager` maps ids to rows and hands over
block ids from the pool; everything else reads through the methods here.

Slots: token ``pos`` of a row lives in block ``table[pos // block_size]`` at
offset ``pos % block_size``; its slot id is ``block_id * block_size + offset``.

Invariants (:meth:`BlockTables.check_invariants`): a live row of ``t`` tokens
holds exactly ``ceil(t / block_size)`` block ids and -1 past them; a free row
is all -1 with zero counts and no flags. The slots of a known row's tokens
hold their ids (blocks shared with other rows hold the same ids there).
"""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

from kvforge.core.slots import SlotTokens

__all__ = ["AppendPlan", "BlockTables", "StepView", "blocks_for_tokens"]


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (``ceil(num_tokens / block_size)``, exact)."""
    return -(-int(num_tokens) // int(block_size))


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


class AppendPlan(NamedTuple):
    """What an append will do (:meth:`BlockTables.plan_append`); nothing changed yet.

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


class BlockTables:
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
        self._live = np.zeros(rows, dtype=bool)
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
                self._nblk, self._ntok, self._npending, self._shared_tail, self._known, self._live = (
                    np.concatenate([a, np.zeros_like(a)]) for a in
                    (self._nblk, self._ntok, self._npending, self._shared_tail, self._known, self._live))
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
        """A new row sharing every block of ``parent``; both tails are marked shared when partial."""
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
        self._nblk[row] = self._ntok[row] = self._npending[row] = 0
        self._shared_tail[row] = self._known[row] = self._live[row] = False
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

    def block_table_array(self, rows: np.ndarray, width: int | None = None) -> np.ndarray:
        """``[len(rows), width]`` int32 tables padded with -1 (``width``: default the longest)."""
        w = int(self._nblk[rows].max()) if len(rows) and width is None else (width or 0)
        self._ensure_width(w)
        return self._tables[rows, :w]

    def context_lens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens with a slot, per row (int32)."""
        return self._ntok[rows].astype(np.int32)

    @staticmethod
    def _positions(rows: np.ndarray, start: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows repeated ``counts`` times and positions ``start[i] .. start[i] + counts[i] - 1``."""
        if len(counts) == 1:  # one row (append_tokens): no repeat needed
            n, first = int(counts[0]), int(start[0])
            return rows.repeat(n), np.arange(first, first + n)
        begin = counts.cumsum() - counts
        return rows.repeat(counts), (start - begin).repeat(counts) + np.arange(_total(counts))

    def _slots_at(self, tok_rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self._tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs

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

    # -------------------------------------------------------------- append
    def plan_append(self, rows: np.ndarray, counts: np.ndarray | None,
                    ref_count: Callable[[int], int]) -> AppendPlan:
        """What appending ``counts[i]`` tokens (None: one each) to each row needs; changes nothing.

        A row gaining tokens in a partial last block that ``ref_count`` says is
        shared copies it, as sequential appends would: every sharer in the batch
        but the last one left holding the block."""
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
            total = _total(need)
        cow: list[int] = []
        flagged = bool(np.count_nonzero(self._shared_tail[rows]))  # count_nonzero: cheaper than any()
        if flagged:
            refs_left: dict[int, int] = {}
            for r, o, k in zip(rows.tolist(), old.tolist(), [1] * len(rows) if counts is None else counts.tolist()):
                if k and self._shared_tail[r] and o % bs:
                    tail = int(self._tables[r, self._nblk[r] - 1])
                    left = refs_left.get(tail)
                    left = ref_count(tail) if left is None else left
                    if left > 1:
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
                self._ensure_width(_largest(start) + 1)
                self._tables[g_rows, start] = block_ids
                self._nblk[g_rows] = start + 1
            else:
                grow = plan.need > 0  # type: ignore[operator]
                g_rows, g_need = rows[grow], plan.need[grow]  # type: ignore[index]
                start = self._nblk[g_rows]
                self._ensure_width(_largest(start + g_need))
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

    # -------------------------------------------------------------- upkeep
    def relocate(self, moves: Sequence[tuple[int, int]], num_blocks: int) -> None:
        """Follow compaction moves ``src -> dst`` (ids below ``num_blocks``): tables and token ids."""
        remap = np.arange(num_blocks, dtype=np.int32)
        src, dst = np.array(moves, dtype=np.int64).reshape(-1, 2).T
        remap[src] = dst
        live = self._tables >= 0
        self._tables[live] = remap[self._tables[live]]
        self._slot_tokens.copy_blocks(src, dst)

    def metadata_bytes(self) -> int:
        """Host bytes of the row arrays, the slot token ids and the free-row list."""
        arrays = (self._tables, self._nblk, self._ntok, self._npending, self._shared_tail, self._known,
                  self._live)
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
        flags = (nb, nt, self._npending[:n], self._shared_tail[:n], self._known[:n])
        assert not any(a[~live].any() for a in flags), "a free row is not cleared"
        assert sorted(self._free_rows) == np.flatnonzero(~live).tolist(), "free rows lost or duplicated"
        assert not self._live[n:].any() and (self._tables[n:] == -1).all()
        pend = self._npending[:n]
        assert self._known[:n][pend > 0].all(), "a row with pending prompt ids is not known"
        assert {r: len(a) for r, a in self._pending_ids.items()} == \
            {r: int(pend[r]) for r in np.flatnonzero(pend).tolist()}, "pending ids do not match the counts"
        for row in np.flatnonzero(self._known[:n]).tolist():
            assert self._slot_tokens.is_stored(self.row_slots(row, 0, int(nt[row]))), \
                f"row {row} is known but some of its slots were never written"


# numpy reductions cost microseconds each; a one-row batch (append_tokens) reads its element
def _total(a: np.ndarray) -> int:
    return int(a[0]) if len(a) == 1 else int(a.sum())


def _largest(a: np.ndarray) -> int:
    return int(a[0]) if len(a) == 1 else int(a.max())
