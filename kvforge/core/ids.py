"""Validation of the ids, counts and numbers the bookkeeping takes from callers.

Every public call of :mod:`kvforge.core` checks *all* of its arguments here
before it changes anything, so that the same mistake gets the same kvforge
error everywhere, the message names the argument and the value, and a
refused call leaves every table, count and statistic as it was:

- counts, positions and block ids are Python ints; numpy integer scalars are
  converted (what the core hands out, and keeps, is always a Python int);
  ``bool`` (a ``True`` that slipped through as ``1`` is a caller bug worth
  reporting), floats, strings and None are refused (:func:`as_int`);
- counts lie in ``[0, MAX_COUNT]``, far above any pool (int64 arithmetic on
  them stays exact), and block ids in ``[0, num_blocks)``;
- block ids become a list of Python ints (:func:`block_id_list`), compaction
  moves a list of int pairs (:func:`move_list`);
- token ids lie in ``[0, 2**63)`` (the slot store reads -1 for an unknown
  slot) and become an int64 :class:`array.array` (:func:`token_array`), a
  copy the caller cannot change afterwards;
- per-sequence counts become an int64 array (:func:`count_array`,
  :func:`last_counts`); batches of sequence ids are lists or tuples
  (:func:`indexable`), never a string.

The error type is the caller's: the pool and the compaction planner raise
:class:`~kvforge.errors.InvalidBlockError`, the manager
:class:`~kvforge.errors.SequenceError`, the compaction trigger
:class:`~kvforge.errors.ConfigError`.
"""
from __future__ import annotations

import math
import operator
from array import array
from typing import Hashable, Iterable, Sequence

import numpy as np

from kvforge.errors import InvalidBlockError, KVForgeError, SequenceError

__all__ = ["MAX_COUNT", "MAX_TOKEN_ID", "as_block_id", "as_flag", "as_int", "as_real", "as_token_id",
           "block_id_list", "check_block_ids", "count_array", "indexable", "is_int", "last_counts", "move_list",
           "token_array"]

SeqId = Hashable
Error = type[KVForgeError]

#: the largest count (tokens, blocks, bytes) any call takes: beyond every pool, exact in int64 sums
MAX_COUNT = 2**62
#: the largest token id (ids are int64, and -1 marks an unknown slot)
MAX_TOKEN_ID = 2**63 - 1


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer (``bool`` is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def as_int(value: object, what: str, error: Error = SequenceError, *, low: int = 0, high: int = MAX_COUNT) -> int:
    """``value`` as a Python int in ``[low, high]``: a Python or numpy integer, never a bool.

    Raises ``error`` naming ``what`` and the value otherwise."""
    if type(value) is not int:
        if not is_int(value):
            raise error(f"{what} must be an integer, got {_kind(value)}")
        value = int(value)  # type: ignore[call-overload]
    if value < low:  # type: ignore[operator]
        raise error(f"{what} must be >= {low}, got {value!r}")
    if value > high:  # type: ignore[operator]
        raise error(f"{what} must be <= {high}, got {value!r}")
    return value  # type: ignore[return-value]


def as_flag(value: object, what: str, error: Error = SequenceError) -> bool:
    """``value`` as a bool: ``True``/``False`` (numpy's too), nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{what} must be True or False, got {_kind(value)}")
    return bool(value)


def as_real(value: object, what: str, error: Error, *, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in ``[low, high]``: an int or float (numpy's too), never a bool or NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{what} must be a number, got {_kind(value)}")
    f = float(value)
    if not (math.isfinite(f) and low <= f <= high):
        raise error(f"{what} must be a finite number in [{low}, {high}], got {value!r}")
    return f


def indexable(seq_ids: Sequence[SeqId] | Iterable[SeqId], what: str = "seq_ids") -> Sequence[SeqId]:
    """A batch of sequence ids as a list or tuple (any other iterable is listed; a string,
    bytes or a non-iterable is refused: it is one id, not a batch)."""
    if isinstance(seq_ids, (list, tuple)):
        return seq_ids
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise SequenceError(f"{what} must be a list of sequence ids, got {_kind(seq_ids)}")
    return list(seq_ids)


# --------------------------------------------------------------- block ids
def block_id_list(ids: object, what: str = "block ids", num_blocks: int | None = None) -> list[int]:
    """Block ids from a list, tuple, numpy array or tensor, as Python ints (each below
    ``num_blocks`` when given).

    Raises :class:`InvalidBlockError` for a scalar, a string, a nested sequence,
    a non-integer id or (with ``num_blocks``) an id outside the pool."""
    if type(ids) is list and all(type(b) is int for b in ids):  # the common case: one pass, no copy per id
        if num_blocks is not None and ids and (min(ids) < 0 or max(ids) >= num_blocks):
            check_block_ids(ids, num_blocks, what)
        return list(ids)
    if isinstance(ids, (int, np.integer, str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidBlockError(f"{what} must be a sequence of block ids, got {_kind(ids)}")
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        ids = tolist()
        if not isinstance(ids, list):
            raise InvalidBlockError(f"{what} must be a 1-D sequence of block ids, got {ids!r}")
    out: list[int] = []
    for i, b in enumerate(ids):  # type: ignore[arg-type]
        if type(b) is not int:
            if not is_int(b):
                raise InvalidBlockError(f"{what}[{i}] must be an integer block id, got {_kind(b)}")
            b = int(b)
        out.append(b)
    if num_blocks is not None:
        check_block_ids(out, num_blocks, what)
    return out


def as_block_id(value: object, num_blocks: int, what: str = "block_id") -> int:
    """One block id as a Python int in ``[0, num_blocks)``; :class:`InvalidBlockError` otherwise."""
    if type(value) is not int:
        if not is_int(value):
            raise InvalidBlockError(f"{what} must be an integer block id, got {_kind(value)}")
        value = int(value)  # type: ignore[call-overload]
    if not 0 <= value < num_blocks:  # type: ignore[operator]
        raise InvalidBlockError(f"{what} {value!r} is not in this pool (ids 0..{num_blocks - 1})")
    return value  # type: ignore[return-value]


def check_block_ids(ids: Iterable[object], num_blocks: int, what: str = "block ids") -> None:
    """Raise :class:`InvalidBlockError` naming the first id that is not an int in ``[0, num_blocks)``."""
    for b in ids:
        if not is_int(b) or not 0 <= b < num_blocks:  # type: ignore[operator]
            raise InvalidBlockError(f"{what}: block id {b!r} is not in this pool (ids 0..{num_blocks - 1})")


def move_list(moves: object, num_blocks: int, what: str = "moves") -> list[tuple[int, int]]:
    """Compaction moves as ``(src, dst)`` pairs of Python ints below ``num_blocks``."""
    if isinstance(moves, (str, bytes, dict)) or not hasattr(moves, "__iter__"):
        raise InvalidBlockError(f"{what} must be a sequence of (src, dst) pairs, got {_kind(moves)}")
    out = []
    for i, pair in enumerate(moves):  # type: ignore[attr-defined]
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise InvalidBlockError(f"{what}[{i}] must be a (src, dst) pair of block ids, got {pair!r}")
        src, dst = block_id_list(pair, f"{what}[{i}]", num_blocks)
        out.append((src, dst))
    return out


# --------------------------------------------------------------- token ids
def token_array(token_ids: object, what: str = "token_ids") -> array[int]:
    """Token ids as an int64 ``array`` (compact, and hashed without conversion), a copy.

    Accepts a list or tuple of ints (numpy integers too), a 1-D integer numpy
    array, an ``array('q')`` or anything with ``tolist()`` (a tensor). Raises
    :class:`SequenceError` naming ``what``, the position and the value for
    anything else: a bool, float, None or string id, an id outside
    ``[0, 2**63)``, a scalar or a nested sequence."""
    if type(token_ids) is not list and type(token_ids) is not tuple:  # lists first: prompts and decode steps
        if isinstance(token_ids, np.ndarray):
            return _array_tokens(token_ids, what)
        if isinstance(token_ids, array) and token_ids.typecode == "q":
            out = array("q", token_ids)
            if out and _lowest(out) < 0:
                return _bad_token(out.tolist(), what)
            return out
        if isinstance(token_ids, (str, bytes, dict, set)) or not hasattr(token_ids, "__len__"):
            raise SequenceError(f"{what} must be a sequence of integers, got {_kind(token_ids)}")
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()  # a tensor: Python scalars of its dtype
            if not isinstance(token_ids, list):
                raise SequenceError(f"{what} must be 1-D, got the scalar {token_ids!r}")
    try:
        out = array("q", token_ids)  # type: ignore[arg-type]
    except (TypeError, OverflowError):
        return _bad_token(token_ids, what)  # type: ignore[arg-type]
    # array() takes bools as 0 and 1: look at the types only when such a value is present
    if out:
        low = _lowest(out)
        if low < 0 or (low <= 1 and any(isinstance(t, (bool, np.bool_)) for t in token_ids)):  # type: ignore
            return _bad_token(token_ids, what)  # type: ignore[arg-type]
    return out


def _array_tokens(token_ids: np.ndarray, what: str) -> array[int]:
    """:func:`token_array` of a numpy array: 1-D, integers, each in ``[0, 2**63)``."""
    if token_ids.ndim != 1 or not (token_ids.dtype.kind in "iu" or token_ids.size == 0):
        raise SequenceError(f"{what} must be a 1-D integer array, got {token_ids.dtype} {token_ids.shape}")
    if token_ids.size:
        if token_ids.dtype.kind == "u" and token_ids.dtype.itemsize == 8:
            if int(token_ids[token_ids.argmax()]) > MAX_TOKEN_ID:
                return _bad_token(token_ids.tolist(), what)
        elif token_ids[token_ids.argmin()] < 0:
            return _bad_token(token_ids.tolist(), what)
    out = array("q")
    out.frombytes(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
    return out


def _lowest(ids: array[int]) -> int:
    """The smallest of some int64 ids (numpy's argmin: far cheaper than its min reduction)."""
    if len(ids) <= 16:
        return min(ids)
    view = np.frombuffer(ids, np.int64)
    return int(view[view.argmin()])


def _bad_token(token_ids: Sequence[object], what: str) -> array[int]:
    """Raise for the first token id that is not an integer in ``[0, 2**63)``; return the
    ids as an array if none is (numpy integers and other exact ``__index__`` types are integers)."""
    return array("q", [_token(t, f"{what}[{i}]") for i, t in enumerate(token_ids)])


def _token(value: object, what: str) -> int:
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise SequenceError(f"{what} must be an integer token id, got {_kind(value)}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SequenceError(f"{what} must be an integer token id, got {_kind(value)}") from None
    if not 0 <= v <= MAX_TOKEN_ID:
        raise SequenceError(f"{what} must lie in [0, 2**63), got {v!r}")
    return v


def as_token_id(value: object, what: str = "token_id") -> int:
    """One token id as a Python int in ``[0, 2**63)``; :class:`SequenceError` otherwise."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_ID:
        return value
    return _token(value, what)


# ---------------------------------------------------------- per-sequence counts
def count_array(counts: object, size: int, what: str) -> np.ndarray:
    """Per-sequence counts as int64 ``[size]``: one int for all, or one each, every one
    in ``[0, MAX_COUNT]``. Raises :class:`SequenceError` naming ``what`` and the value otherwise."""
    if not isinstance(counts, (list, tuple, np.ndarray)):
        return np.full(size, as_int(counts, what), dtype=np.int64)
    if isinstance(counts, np.ndarray):
        if counts.ndim != 1 or not (counts.dtype.kind in "iu" or counts.size == 0):
            raise SequenceError(f"{what} must be one int or a 1-D integer array, got {counts.dtype} {counts.shape}")
        if counts.size and (int(counts.min()) < 0 or int(counts.max()) > MAX_COUNT):
            bad = next(c for c in counts.tolist() if not 0 <= c <= MAX_COUNT)
            raise SequenceError(f"{what} must lie in [0, {MAX_COUNT}], got {bad!r}")
        n = counts.astype(np.int64)
    else:
        n = np.array([as_int(c, f"{what}[{i}]") for i, c in enumerate(counts)], dtype=np.int64)
    if n.shape != (size,):
        raise SequenceError(f"{what} must be one int or one per sequence ({size}), got {len(n)} values")
    return n


def last_counts(value: object, num_tokens: np.ndarray, seq_ids: Sequence[SeqId], what: str) -> np.ndarray | None:
    """Per-sequence counts of last tokens (:func:`count_array`), each at most the sequence's
    ``num_tokens``; None when the count is the int 1 (one each: the decode fast path)."""
    counts = None if type(value) is int and value == 1 else count_array(value, len(num_tokens), what)
    over = (num_tokens < 1) if counts is None else (counts > num_tokens)
    if np.count_nonzero(over):
        i = int(np.flatnonzero(over)[0])
        raise SequenceError(f"{what}={value!r}: sequence {seq_ids[i]!r} has only {int(num_tokens[i])} tokens")
    return counts
