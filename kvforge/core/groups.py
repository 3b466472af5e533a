"""The block tables of a cache's other layer groups: sliding-window layers keep only what they read.

A model whose layers differ in what they attend to (Gemma 2's alternating
full and 4,096-token sliding-window layers, GPT-OSS, Gemma 3) splits its
layers into *groups* of equal size (``CacheConfig.kv_groups``). A block id
then stands for one group's layers only, and every sequence has one block
table per group, all over the same :class:`~kvforge.core.pool.BlockPool`:
group 0 (full attention) is the :class:`~kvforge.core.manager.BlockManager`'s
own table; each other group is a :class:`GroupTables` here, indexed by the
manager's rows. A group with a window ``w`` holds only the blocks its
layers still read: a token at position ``p`` attends to keys after ``p - w``,
so once a sequence's next token is at ``p``, every block wholly before
``p - w + 1`` is released (its entry becomes -1, which no kernel reads: they
start at the window). A group without a window (full attention split into
several groups) keeps every block, as group 0 does.

Prefix reuse: a group's full blocks are cached in the manager's prefix index
under the group's own key of the block (:meth:`GroupTables.group_key`, a
hash of the block's prefix key and the group), so eviction and compaction
treat them as any cached block. A prompt reuses ``h`` cached blocks only
when every group holds the blocks its layers read at position ``h *
block_size``: a window group the last ``ceil(w / block_size)`` of them, not
the ones before (:meth:`GroupTables.max_hits`).

Only the bookkeeping is here (numpy, no device); the storage copies a shared
partial block before a group writes into it (copy-on-write after a fork).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from kvforge.core.pool import BlockPool
from kvforge.core.prefix import BlockKey, PrefixIndex
from kvforge.core.rows import remap_blocks

__all__ = ["GroupTables"]


class GroupTables:
    """One extra layer group's block tables over a shared pool, rows numbered as the manager's.

    ``window``: the group's sliding window in tokens (None: full attention,
    every block kept). Callers (the :class:`~kvforge.storage.KVCache`) pass
    rows of live sequences and token counts the manager agrees with; nothing
    here validates caller input.
    """

    def __init__(self, pool: BlockPool, prefix: PrefixIndex, block_size: int, window: int | None,
                 index: int) -> None:
        self.pool, self.prefix, self.block_size, self.window = pool, prefix, int(block_size), window
        self.index = index
        self._person = b"kvforge-group%d" % index
        rows = 64
        self._tables = np.full((rows, 16), -1, dtype=np.int32)
        self._first = np.zeros(rows, dtype=np.int64)   # logical blocks before it are released (-1)
        self._nblk = np.zeros(rows, dtype=np.int64)    # logical blocks of the row (released ones too)
        self._ntok = np.zeros(rows, dtype=np.int64)    # tokens with a slot (the manager's count)
        self._nkeyed = np.zeros(rows, dtype=np.int64)  # leading full blocks whose keys were handled
        self._shared_tail = np.zeros(rows, dtype=bool)
        self._live = np.zeros(rows, dtype=bool)

    # ------------------------------------------------------------- helpers
    def group_key(self, key: BlockKey) -> BlockKey:
        """The key of this group's copy of the block named ``key`` (16 bytes)."""
        return hashlib.blake2b(key, digest_size=16, person=self._person).digest()

    def first_needed(self, pos: int | np.ndarray) -> int | np.ndarray:
        """The first logical block a token at position ``pos`` (or later) still reads."""
        if self.window is None:
            return 0 if isinstance(pos, int) else np.zeros_like(pos)
        return np.maximum(pos - self.window + 1, 0) // self.block_size

    def _ensure(self, rows: int, width: int) -> None:
        n, w = self._tables.shape
        if width > w:
            grown = np.full((n, max(width, 2 * w)), -1, dtype=np.int32)
            grown[:, :w] = self._tables
            self._tables = grown
        if rows > n:
            size = max(rows, 2 * n)
            grown = np.full((size, self._tables.shape[1]), -1, dtype=np.int32)
            grown[:n] = self._tables
            self._tables = grown
            for name in ("_first", "_nblk", "_ntok", "_nkeyed", "_shared_tail", "_live"):
                a = getattr(self, name)
                b = np.zeros(size, dtype=a.dtype)
                b[:n] = a
                setattr(self, name, b)

    def kept(self, row: int) -> list[int]:
        """The row's blocks still held, in position order."""
        return self._tables[row, self._first[row]: self._nblk[row]].tolist()

    def num_released(self, row: int) -> int:
        """Leading logical blocks of the row already released."""
        return int(self._first[row])

    # ----------------------------------------------------------- admission
    def max_hits(self, keys: Sequence[BlockKey], limit: int) -> int:
        """The most leading cached blocks (at most ``limit``) a new sequence can reuse as far as this
        group goes: its blocks read at the first computed position must all be cached."""
        if limit <= 0:
            return 0
        blocks = self.prefix._blocks
        present = np.fromiter((self.group_key(k) in blocks for k in keys[:limit]), dtype=bool, count=limit)
        missing = np.concatenate([[0], np.cumsum(~present)])
        for h in range(limit, 0, -1):
            lo = int(self.first_needed(h * self.block_size))
            if missing[h] == missing[lo]:
                return h
        return 0

    def hit_blocks(self, keys: Sequence[BlockKey], num_hits: int) -> tuple[int, list[int]]:
        """``(first, blocks)``: this group's cached blocks for logical blocks ``first .. num_hits - 1``
        (what :meth:`max_hits` found; the caller takes references before anything else allocates)."""
        first = min(int(self.first_needed(num_hits * self.block_size)), num_hits)
        get = self.prefix._blocks.__getitem__
        return first, [get(self.group_key(k)) for k in keys[first:num_hits]]

    def admit(self, row: int, first: int, hits: list[int], new: list[int], num_tokens: int) -> None:
        """Give a new row its blocks: released before ``first``, ``hits`` then ``new`` after it."""
        nblk = first + len(hits) + len(new)
        self._ensure(row + 1, nblk)
        self._tables[row, first:nblk] = hits + new
        self._first[row], self._nblk[row], self._ntok[row] = first, nblk, num_tokens
        self._nkeyed[row] = first + len(hits)
        self._shared_tail[row] = False
        self._live[row] = True

    # -------------------------------------------------------------- appends
    def release(self, rows: np.ndarray, next_pos: np.ndarray) -> None:
        """Release every block no token at ``next_pos[i]`` or later reads (row ``rows[i]``)."""
        if self.window is None or not len(rows):
            return
        new_first = np.minimum(self.first_needed(next_pos), self._nblk[rows])
        moved = np.flatnonzero(new_first > self._first[rows])
        if not len(moved):
            return
        drop: list[int] = []
        tables = self._tables
        for i in moved.tolist():
            row, f = int(rows[i]), int(new_first[i])
            drop += tables[row, self._first[row]: f].tolist()
            tables[row, self._first[row]: f] = -1
            self._first[row] = f
        self.pool.free(drop)

    def blocks_to_add(self, rows: np.ndarray, new_ntok: np.ndarray) -> np.ndarray:
        """New blocks each row needs to hold ``new_ntok`` tokens."""
        return np.maximum(-(-new_ntok // self.block_size) - self._nblk[rows], 0)

    def shared_tails(self, rows: np.ndarray, counts: np.ndarray) -> list[int]:
        """Indexes ``i`` of the rows about to write into a partial last block others hold too."""
        cand = np.flatnonzero(self._shared_tail[rows] & (counts > 0) & (self._ntok[rows] % self.block_size != 0))
        out = []
        for i in cand.tolist():
            row = int(rows[i])
            tail = int(self._tables[row, self._nblk[row] - 1])
            if self.pool.ref_count(tail) > 1 or self.pool.is_cached(tail):
                out.append(i)
            else:
                self._shared_tail[row] = False
        return out

    def extend(self, rows: np.ndarray, new_ntok: np.ndarray, new_blocks: list[int],
               cow: dict[int, int]) -> None:
        """Commit an append: the rows take ``new_blocks`` (in row order, :meth:`blocks_to_add`
        each) and hold ``new_ntok`` tokens; ``cow`` maps a row index to the copy that replaces
        its shared tail (the caller copied the data)."""
        for i, new in cow.items():
            row = int(rows[i])
            last = int(self._nblk[row]) - 1
            old = int(self._tables[row, last])
            self._tables[row, last] = new
            self._shared_tail[row] = False
            self.pool.free([old])
        add = self.blocks_to_add(rows, new_ntok)
        if new_blocks:
            self._ensure(0, int((self._nblk[rows] + add).max()))
            pos = 0
            for i in np.flatnonzero(add).tolist():
                row, k = int(rows[i]), int(add[i])
                nb = int(self._nblk[row])
                self._tables[row, nb: nb + k] = new_blocks[pos: pos + k]
                self._nblk[row] = nb + k
                pos += k
        self._ntok[rows] = new_ntok

    def register(self, row: int, keys: Sequence[BlockKey]) -> None:
        """Cache the row's full blocks whose prefix keys are ``keys`` (the sequence's chain) and
        that this group has not handled yet; released ones stay unregistered."""
        done, full = int(self._nkeyed[row]), min(len(keys), int(self._ntok[row]) // self.block_size)
        if full <= done:
            return
        start = max(done, int(self._first[row]))
        if start < full and self.prefix.enabled:
            blocks = self._tables[row, start:full].tolist()
            self.prefix._register_many(blocks, [self.group_key(k) for k in keys[start:full]])
        self._nkeyed[row] = full

    # ------------------------------------------------------- fork, free, cut
    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every block ``parent`` still holds."""
        self._ensure(child + 1, int(self._nblk[parent]))
        for a in (self._tables, self._first, self._nblk, self._ntok, self._nkeyed):
            a[child] = a[parent]
        self._live[child] = True
        self.pool.incref(self.kept(parent))
        partial = int(self._ntok[parent]) % self.block_size != 0
        self._shared_tail[child] = partial
        self._shared_tail[parent] |= partial

    def free(self, row: int) -> None:
        """Drop the row's blocks (last first: eviction takes it first) and clear it."""
        kept = self.kept(row)
        self._clear(row)
        self.pool.free(kept[::-1])

    def _clear(self, row: int) -> None:
        self._tables[row, : self._nblk[row]] = -1
        self._first[row] = self._nblk[row] = self._ntok[row] = self._nkeyed[row] = 0
        self._shared_tail[row] = self._live[row] = False

    def check_truncate(self, row: int, num_tokens: int) -> str | None:
        """Why the row cannot go back to ``num_tokens`` tokens (None: it can): the blocks its next
        token would read must not have been released."""
        if int(self.first_needed(num_tokens)) < int(self._first[row]) and num_tokens < int(self._ntok[row]):
            return (f"its sliding-window layers (window {self.window}) released the blocks before token "
                    f"{int(self._first[row]) * self.block_size}, which a sequence of {num_tokens} tokens reads")
        return None

    def truncate(self, row: int, num_tokens: int) -> None:
        """Take the row back to ``num_tokens`` tokens (:meth:`check_truncate` passed)."""
        bs = self.block_size
        keep = -(-num_tokens // bs)
        nb = int(self._nblk[row])
        if keep >= nb and num_tokens == int(self._ntok[row]):
            return
        start = max(keep, int(self._first[row]))
        dropped = self._tables[row, start:nb].tolist()
        self._tables[row, start:nb] = -1
        self._nblk[row] = max(keep, int(self._first[row]))
        self._ntok[row] = num_tokens
        self._nkeyed[row] = min(int(self._nkeyed[row]), num_tokens // bs)
        if num_tokens % bs and keep > int(self._first[row]):
            tail = int(self._tables[row, keep - 1])
            if self.pool.ref_count(tail) > 1:
                self._shared_tail[row] = True
            elif self.pool.is_cached(tail):
                self.prefix._unregister(tail)
        self.pool.free(dropped[::-1])

    # --------------------------------------------------------------- views
    def tables_of(self, rows: np.ndarray, width: int) -> np.ndarray:
        """``[len(rows), width]`` int32 tables (-1: released or padding)."""
        self._ensure(0, width)
        return self._tables[rows, :width]

    def slots_at(self, tok_rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Slots (int64) of tokens at ``pos`` of rows ``tok_rows`` (each held by the row)."""
        bs = self.block_size
        return self._tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs

    def blocks_in(self, row: int, lo: int, hi: int) -> list[int]:
        """The row's blocks held for logical blocks ``lo .. hi - 1`` (released ones left out)."""
        return [b for b in self._tables[row, lo:hi].tolist() if b >= 0]

    def block_of(self, row: int, pos: int) -> int:
        """The block holding token ``pos`` of the row (-1: released)."""
        return int(self._tables[row, pos // self.block_size])

    # -------------------------------------------------------------- upkeep
    def relocate(self, moves: Sequence[tuple[int, int]], num_blocks: int) -> None:
        """Follow compaction moves ``src -> dst``."""
        if moves:
            remap_blocks(self._tables, moves, num_blocks)

    def refs(self) -> dict[int, int]:
        """References the rows hold, per block."""
        out: dict[int, int] = {}
        for row in np.flatnonzero(self._live).tolist():
            for b in self.kept(row):
                out[b] = out.get(b, 0) + 1
        return out

    def live_slots(self) -> int:
        """Distinct token slots in use (a block shared by several rows counts once, at its fullest)."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for row in np.flatnonzero(self._live).tolist():
            n, first = int(self._ntok[row]), int(self._first[row])
            for j, b in enumerate(self.kept(row), start=first):
                filled[b] = max(filled.get(b, 0), min(bs, n - j * bs))
        return sum(filled.values())

    def check_invariants(self, rows: dict[int, int]) -> None:
        """Assert the group agrees with the manager's ``{row: num_tokens}`` of live rows."""
        live = np.flatnonzero(self._live).tolist()
        assert sorted(live) == sorted(rows), f"group {self.index}: rows differ from the manager's"
        bs = self.block_size
        for row in live:
            n, nb, first = rows[row], int(self._nblk[row]), int(self._first[row])
            assert int(self._ntok[row]) == n, f"group {self.index}, row {row}: {self._ntok[row]} tokens, not {n}"
            assert nb == -(-n // bs), f"group {self.index}, row {row}: {nb} blocks for {n} tokens"
            assert 0 <= first <= nb and (self._tables[row, :first] == -1).all()
            assert (self._tables[row, first:nb] >= 0).all(), f"group {self.index}, row {row}: a kept block is -1"
            assert (self._tables[row, nb:] == -1).all()
            if self.window is None:
                assert first == 0
            else:
                assert first <= int(self.first_needed(n)), \
                    f"group {self.index}, row {row}: released a block its next token reads"
