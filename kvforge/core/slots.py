"""The token id held in each slot of a pool, stored only as far as slots were written.

A pool of ``num_blocks`` blocks of ``block_size`` tokens has
``num_blocks * block_size`` slots; slot ``block_id * block_size + offset``
holds one token. :class:`SlotTokens` keeps the id of the token in each slot,
so a decode step stores its ids with one scatter, a filled block's prefix key
hashes its slots, and a step's ``input_ids`` are one gather.

Storage grows with use. The ids live in one int64 array covering the first
:attr:`SlotTokens.num_stored_blocks` blocks; a write that reaches a block
beyond it grows the array (doubling, at most ``num_blocks`` blocks), so a
pool of ``2**32`` slots whose sequences touched its first few blocks costs
those few blocks of host memory, not 32 GiB. Because the pool hands out the
lowest free ids first, the stored prefix follows the pool's peak occupancy.

A slot never written reads :data:`UNKNOWN` (-1; token ids are non-negative),
whether it lies inside the stored prefix or beyond it. Copies
(:meth:`SlotTokens.copy_blocks`: copy-on-write, compaction) carry unknown
slots along as unknown.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["UNKNOWN", "SlotTokens"]

#: what an unwritten slot reads
UNKNOWN = -1


class SlotTokens:
    """Token ids per slot (int64) of a pool of ``num_blocks`` blocks of ``block_size`` slots.

    Slot ids passed in are non-negative and below ``num_blocks * block_size``
    (the tables compute them from block ids of the pool); nothing here
    validates caller input.
    """

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self._stored = 0  # blocks covered by _ids
        self._ids = np.empty(0, dtype=np.int64)
        self._by_block = self._ids.reshape(0, self.block_size)

    @property
    def num_stored_blocks(self) -> int:
        """Blocks whose slots have host storage now (``0 .. num_stored_blocks - 1``)."""
        return self._stored

    @property
    def nbytes(self) -> int:
        """Host bytes of the stored ids."""
        return int(self._ids.nbytes)

    def _grow(self, num_blocks: int) -> None:
        """Store at least blocks ``0 .. num_blocks - 1`` (doubling; at most the pool)."""
        if num_blocks <= self._stored:
            return
        new = min(self.num_blocks, max(num_blocks, 2 * self._stored))
        ids = np.full(new * self.block_size, UNKNOWN, dtype=np.int64)
        ids[: self._ids.size] = self._ids
        self._ids, self._stored = ids, new
        self._by_block = ids.reshape(new, self.block_size)

    # ----------------------------------------------------------------- writes
    def write(self, slots: np.ndarray, token_ids: np.ndarray) -> None:
        """Store ``token_ids[i]`` in slot ``slots[i]`` (int64 arrays of one length)."""
        try:  # the common case costs no bound check of its own: numpy checks the indices
            self._ids[slots] = token_ids
        except IndexError:
            self._grow(int(slots.max()) // self.block_size + 1)
            self._ids[slots] = token_ids

    def copy_blocks(self, src: Sequence[int] | np.ndarray, dst: Sequence[int] | np.ndarray) -> None:
        """Copy every slot of block ``src[i]`` into block ``dst[i]``, all at once (no
        ``dst`` is a ``src``); unknown slots stay unknown."""
        src = np.asarray(src, dtype=np.int64).reshape(-1)
        dst = np.asarray(dst, dtype=np.int64).reshape(-1)
        if not len(src):
            return
        stored = src < self._stored
        if np.count_nonzero(stored):
            self._grow(int(dst[stored].max()) + 1)
        values = self._by_block[src[stored]]
        lost = dst[~stored]
        self._by_block[lost[lost < self._stored]] = UNKNOWN
        self._by_block[dst[stored]] = values

    # ------------------------------------------------------------------ reads
    def read(self, slots: np.ndarray) -> np.ndarray:
        """The ids in ``slots`` (int64, a fresh array); unwritten slots read :data:`UNKNOWN`."""
        try:
            return self._ids[slots]
        except IndexError:
            inside = slots < self._ids.size
            out = np.full(len(slots), UNKNOWN, dtype=np.int64)
            out[inside] = self._ids[slots[inside]]
            return out

    def block_bytes(self, block_ids: Sequence[int]) -> bytes:
        """The ids held by these blocks, int64 bytes, block after block (what a key hashes)."""
        try:
            return self._by_block[block_ids].tobytes()
        except IndexError:
            bs = self.block_size
            blocks = np.asarray(block_ids, dtype=np.int64).reshape(-1, 1)
            return self.read((blocks * bs + np.arange(bs, dtype=np.int64)).reshape(-1)).tobytes()

    def is_stored(self, slots: np.ndarray) -> bool:
        """Whether every one of ``slots`` lies in the stored prefix."""
        return not len(slots) or int(slots.max()) < self._ids.size
