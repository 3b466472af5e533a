"""Validation of the ids and counts the bookkeeping takes from callers.

Every public call of :mod:`kvforge.core` that takes a sequence id, a count, a
position, a block id or token ids checks it here, so that the same mistake
gets the same kvforge error everywhere and nothing is changed before the check:

- sequence ids are any hashable; :class:`SequenceRows` maps the live ones to
  their rows and names the id in every error (unknown, taken, unhashable);
- counts and positions are Python or numpy integers, never ``bool`` (a
  ``True`` that slipped through as ``1`` is a caller bug worth reporting);
- block ids become a list of Python ints (:func:`block_id_list`);
- token ids become an int64 :class:`array.array` (:func:`token_array`), a
  copy the caller cannot change afterwards;
- per-sequence counts become an int64 array (:func:`count_array`,
  :func:`last_counts`).
"""
from __future__ import annotations

import operator
import sys
from array import array
from typing import Generic, Hashable, Iterable, Sequence, TypeVar

import numpy as np

from kvforge.errors import InvalidBlockError, SequenceError

__all__ = ["SequenceRows", "block_id_list", "check_block_ids", "count_array", "indexable", "is_index", "is_int", "last_counts",
           "token_array"]

SeqId = Hashable
State = TypeVar("State")


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer (``bool`` is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_index(value: object) -> bool:
    """Whether ``value`` converts exactly to an int (``operator.index``: numpy ints, 0-d tensors)."""
    try:
        operator.index(value)
        return True
    except TypeError:
        return False


def block_id_list(ids: object) -> list[int]:
    """Block ids from a list, tuple, numpy array or tensor, as Python ints.

    Raises :class:`InvalidBlockError` for a scalar, a string, a nested
    sequence or a non-integer id."""
    if isinstance(ids, (int, np.integer)) or isinstance(ids, (str, bytes)):
        raise InvalidBlockError(f"expected a sequence of block ids, got {ids!r}")
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        ids = tolist()
        if not isinstance(ids, list):
            raise InvalidBlockError(f"expected a 1-D sequence of block ids, got {ids!r}")
    out: list[int] = []
    for b in ids:  # type: ignore[union-attr]
        if type(b) is not int:
            if isinstance(b, bool):
                raise InvalidBlockError(f"block ids must be integers, got {b!r}")
            try:
                b = operator.index(b)
            except TypeError:
                raise InvalidBlockError(f"block ids must be integers, got {b!r}") from None
        out.append(b)
    return out


def indexable(seq_ids: Sequence[SeqId] | Iterable[SeqId]) -> Sequence[SeqId]:
    """A batch's ids as an indexable sequence (any iterable is accepted)."""
    return seq_ids if isinstance(seq_ids, (list, tuple)) else list(seq_ids)


def check_block_ids(ids: Iterable[object], num_blocks: int) -> None:
    """Raise :class:`InvalidBlockError` naming the first id that is not an int in ``[0, num_blocks)``."""
    for b in ids:
        if not is_int(b) or not 0 <= b < num_blocks:  # type: ignore[operator]
            raise InvalidBlockError(f"block id {b!r} is not in this pool (ids 0..{num_blocks - 1})")


def token_array(token_ids: Sequence[int] | np.ndarray) -> array[int]:
    """Token ids as an int64 ``array`` (compact, and hashed without conversion).

    Raises :class:`SequenceError` for anything but a flat sequence of integers."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise SequenceError(f"token ids must be a sequence of integers, got {type(token_ids).__name__}")
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or not (np.issubdtype(token_ids.dtype, np.integer) or token_ids.size == 0):
            raise SequenceError(f"token ids must be a 1-D integer array, got {token_ids.dtype} {token_ids.shape}")
        out = array("q")
        out.frombytes(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
        return out
    try:
        return array("q", token_ids)
    except (TypeError, OverflowError):  # numpy ints or 0-d tensors: convert one by one, exactly
        try:
            return array("q", [operator.index(t) for t in token_ids])
        except (TypeError, OverflowError):
            bad = next((t for t in token_ids if not is_index(t)), None)
            raise SequenceError(f"token ids must be integers, got {bad!r}") from None


def count_array(counts: int | Sequence[int] | np.ndarray, size: int, what: str) -> np.ndarray:
    """Per-sequence counts as int64 ``[size]``: one int for all, or one each, every one >= 0.

    Raises :class:`SequenceError` naming ``what`` and the value otherwise."""
    if is_int(counts):
        if counts < 0:
            raise SequenceError(f"{what} must be >= 0, got {counts!r}")
        return np.full(size, int(counts), dtype=np.int64)
    raw = np.asarray(counts) if not isinstance(counts, (str, bytes)) else np.asarray(None)
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or (raw.size == 0 and raw.ndim == 1)):
        raise SequenceError(f"{what} must be integers, got {counts!r}")
    if raw.shape != (size,):
        raise SequenceError(f"{what} must be one int or one per sequence ({size}), got {counts!r}")
    n = raw.astype(np.int64)
    if size and n.min() < 0:
        raise SequenceError(f"{what} must be >= 0, one per sequence ({size}), got {counts!r}")
    return n


def last_counts(value: int | Sequence[int] | np.ndarray, num_tokens: np.ndarray, seq_ids: Sequence[SeqId],
                what: str) -> np.ndarray | None:
    """Per-sequence counts of last tokens (:func:`count_array`), each at most the sequence's
    ``num_tokens``; None when the count is the int 1 (one each: the decode fast path)."""
    counts = None if type(value) is int and value == 1 else count_array(value, len(num_tokens), what)
    over = (num_tokens < 1) if counts is None else (counts > num_tokens)
    if np.count_nonzero(over):
        i = int(np.flatnonzero(over)[0])
        raise SequenceError(f"{what}={value!r}: sequence {seq_ids[i]!r} has only {int(num_tokens[i])} tokens")
    return counts


class SequenceRows(Generic[State]):
    """The live sequence ids, in insertion order, each with its row and a state object.

    A lookup of an unknown or unhashable id, or an :meth:`add` of a taken one,
    raises :class:`SequenceError` naming the id. :meth:`rows` reads a whole
    batch in one pass (the decode step's only per-sequence Python work).
    """

    def __init__(self) -> None:
        self._rows: dict[SeqId, int] = {}
        self._states: dict[SeqId, State] = {}

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._rows

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
        """The rows (int64) of a batch, in one pass."""
        try:
            return np.fromiter(map(self._rows.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))
        except (KeyError, TypeError):
            return np.array([self.row(s) for s in seq_ids], dtype=np.int64)

    def metadata_bytes(self) -> int:
        """Host bytes of the two maps."""
        return sys.getsizeof(self._rows) + sys.getsizeof(self._states)
