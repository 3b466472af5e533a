"""The live sequences of a manager: each id with its row in the tables and its state.

Sequence ids are any hashable. :class:`SequenceRows` keeps them in insertion
order and names the id in every error: unknown, already present, unhashable,
or listed twice in a batch that must name each sequence once.
"""
from __future__ import annotations

import sys
from typing import Container, Generic, Hashable, Sequence, TypeVar

import numpy as np

from kvforge.errors import SequenceError

__all__ = ["SequenceRows"]

SeqId = Hashable
State = TypeVar("State")


class SequenceRows(Generic[State]):
    """The live sequence ids, in insertion order, each with its row and a state object.

    A lookup of an unknown or unhashable id, or an :meth:`add` of a taken one,
    raises :class:`SequenceError` naming the id. :meth:`rows` reads a whole
    batch in one pass (the decode step's only per-sequence Python work).
    """

    def __init__(self) -> None:
        self._rows: dict[SeqId, int] = {}
        self._states: dict[SeqId, State] = {}
        #: ids that exist but have no row (swapped out): errors say so
        self.swapped: Container[SeqId] = ()

    def __contains__(self, seq_id: SeqId) -> bool:
        try:
            return seq_id in self._rows
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None

    def __len__(self) -> int:
        return len(self._rows)

    def ids(self) -> list[SeqId]:
        """The live ids, oldest first."""
        return list(self._rows)

    def items(self) -> list[tuple[SeqId, int, State]]:
        """``(seq_id, row, state)`` of every live sequence, oldest first."""
        return [(sid, row, self._states[sid]) for sid, row in self._rows.items()]

    def get(self, seq_id: SeqId) -> tuple[int, State]:
        """The row and state of a live sequence."""
        try:
            return self._rows[seq_id], self._states[seq_id]
        except KeyError:
            if seq_id in self.swapped:
                raise SequenceError(f"sequence {seq_id!r} is swapped out to the host tier "
                                    f"(swap_in() it first)") from None
            raise SequenceError(f"unknown sequence {seq_id!r}") from None
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None

    def row(self, seq_id: SeqId) -> int:
        """The row of a live sequence."""
        return self.get(seq_id)[0]

    def state(self, seq_id: SeqId) -> State:
        """The state of a live sequence."""
        return self.get(seq_id)[1]

    def check_new(self, seq_id: SeqId) -> None:
        """Raise unless ``seq_id`` is hashable and not live."""
        try:
            taken = seq_id in self._rows
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None
        if taken:
            raise SequenceError(f"sequence {seq_id!r} already exists")

    def add(self, seq_id: SeqId, row: int, state: State) -> None:
        """Register a new sequence (:meth:`check_new` first)."""
        self._rows[seq_id] = row
        self._states[seq_id] = state

    def remove(self, seq_id: SeqId) -> None:
        """Forget a live sequence."""
        del self._rows[seq_id], self._states[seq_id]

    def rows(self, seq_ids: Sequence[SeqId]) -> np.ndarray:
        """The rows (int64) of a batch (a list or tuple of ids), in one pass."""
        try:
            return np.fromiter(map(self._rows.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))
        except (KeyError, TypeError):
            return np.array([self.row(s) for s in seq_ids], dtype=np.int64)

    def distinct_rows(self, seq_ids: Sequence[SeqId], what: str) -> np.ndarray:
        """:meth:`rows`, refusing a batch that names a sequence twice (the error names it)."""
        rows = self.rows(seq_ids)
        if len(rows) > 1:
            seen = np.bincount(rows)
            twice = int(seen.argmax())  # argmax, not max(): no ufunc reduction on the decode path
            if seen[twice] > 1:
                sid = seq_ids[int(np.flatnonzero(rows == twice)[0])]
                raise SequenceError(f"{what} names sequence {sid!r} {int(seen[twice])} times")
        return rows

    def metadata_bytes(self) -> int:
        """Host bytes of the two maps."""
        return sys.getsizeof(self._rows) + sys.getsizeof(self._states)
