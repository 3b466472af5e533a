"""Prefix keys: the chained hash that names a full block and every token before it.

A full block's key is ``BLAKE2b-128(parent_key || extra || token_ids)``, the
token ids as native int64 bytes, where the first block's parent key is the
*root key* of the request's salt (:func:`root_key`). The chain makes a key
name the whole prefix, not just one block, and the 128-bit digest makes a
collision that would let one tenant read another's keys/values infeasible.
:class:`~kvforge.core.prefix.PrefixIndex` maps keys to cached blocks; this
module only computes and checks them.

Salts by value. A salt is None (no salt: the root key is 16 zero bytes), a
``str``, ``bytes`` or ``int`` (numpy integers count as ints; ``bool`` does
not), or a tuple of salts (nested tuples allowed, at most
:data:`MAX_SALT_DEPTH` deep). Its root key is
``BLAKE2b-128(encode(salt), person=b"kvforge-salt")`` over a type-tagged,
length-prefixed canonical encoding (:func:`encode_salt`), where ``len`` is an
8-byte big-endian unsigned count::

    str    b"s" + len(utf8) + utf8        utf8 = salt.encode("utf-8"), strict
    bytes  b"b" + len(salt) + salt
    int    b"i" + len(data) + data        data: two's complement, big-endian, fewest bytes
    tuple  b"t" + len(salt) + encode(salt[0]) + encode(salt[1]) + ...

Every encoding is self-delimiting, so the encoding is injective: equal salts
(``1`` and ``numpy.int64(1)``, two equal strings) give equal keys in every
process, and distinct salts give distinct keys, whatever their ``repr`` (the
string ``"1"``, the bytes ``b"1"``, the int ``1`` and the tuple ``(1,)`` all
differ). Anything else (a float, None inside a tuple, a list, a dict, a bool,
any other object) is refused with a :class:`~kvforge.errors.SequenceError`
naming its type, before anything changes.
"""
from __future__ import annotations

import hashlib
from typing import Hashable, Sequence

import numpy as np

from kvforge.errors import InvalidBlockError, SequenceError

__all__ = ["DIGEST", "MAX_SALT_DEPTH", "BlockKey", "chain_end", "chain_keys", "chain_start", "check_extra",
           "check_key", "check_keys", "check_parent", "encode_salt", "next_keys", "root_key"]

BlockKey = bytes
#: bytes of a key (BLAKE2b digest size)
DIGEST = 16

#: BLAKE2b with a 128-bit digest, nothing hashed yet: copying it is cheaper than
#: building a new hash object for every block (same digests as ``blake2b(x, digest_size=16)``).
_EMPTY_BLAKE = hashlib.blake2b(digest_size=DIGEST)


#: how deep tuples may nest in a salt
MAX_SALT_DEPTH = 32
_NO_SALT = b"\x00" * DIGEST


def root_key(salt: Hashable | None) -> BlockKey:
    """The parent key of a request's first block: zeros without a salt, else the
    BLAKE2b-128 digest of the salt's canonical encoding (:func:`encode_salt`).
    Raises :class:`~kvforge.errors.SequenceError` for a salt of any other type."""
    if salt is None:
        return _NO_SALT
    return hashlib.blake2b(encode_salt(salt), digest_size=DIGEST, person=b"kvforge-salt").digest()


def encode_salt(salt: object) -> bytes:
    """The canonical, type-tagged encoding of a salt (see the module docstring)."""
    out: list[bytes] = []
    _encode(salt, out, "salt", 0)
    return b"".join(out)


def _encode(value: object, out: list[bytes], where: str, depth: int) -> None:
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:
            raise SequenceError(f"{where} must be valid unicode (it holds a lone surrogate): {value!r}") from None
        out += (b"s", len(data).to_bytes(8, "big"), data)
    elif isinstance(value, bytes):
        out += (b"b", len(value).to_bytes(8, "big"), bytes(value))
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        v = int(value)
        data = v.to_bytes((v + (v < 0)).bit_length() // 8 + 1, "big", signed=True)
        out += (b"i", len(data).to_bytes(8, "big"), data)
    elif isinstance(value, tuple):
        if depth >= MAX_SALT_DEPTH:
            raise SequenceError(f"{where} nests tuples deeper than {MAX_SALT_DEPTH}")
        out += (b"t", len(value).to_bytes(8, "big"))
        for i, item in enumerate(value):
            _encode(item, out, f"{where}[{i}]", depth + 1)
    else:
        raise SequenceError(f"{where} must be a str, bytes, int or a tuple of those (or None for no salt), "
                            f"got {type(value).__name__} {value!r}")


def chain_keys(data: bytes, block_size: int, parent: BlockKey, extra: bytes = b"") -> list[BlockKey]:
    """Keys of the full blocks whose int64 token ids are ``data`` (block after block),
    chained after ``parent`` (a key, or a salt's :func:`root_key`)."""
    step = block_size * 8
    key = parent
    keys = []
    new_hash = _EMPTY_BLAKE.copy
    for start in range(0, len(data) - step + 1, step):
        h = new_hash()
        h.update(key + extra + data[start:start + step])
        key = h.digest()
        keys.append(key)
    return keys


def next_keys(parents: Sequence[BlockKey], data: bytes, block_size: int) -> list[BlockKey]:
    """One key each: block ``i`` of ``data`` after ``parents[i]`` (a decode step's filled blocks)."""
    step = block_size * 8
    new_hash = _EMPTY_BLAKE.copy
    keys = []
    for i, parent in enumerate(parents):
        h = new_hash()
        h.update(parent + data[i * step:(i + 1) * step])
        keys.append(h.digest())
    return keys


# ----------------------------------------------------------------- checks
def check_key(key: object, what: str) -> BlockKey:
    """``key`` if it is a key (``DIGEST`` bytes); :class:`InvalidBlockError` naming ``what`` otherwise."""
    if type(key) is not bytes or len(key) != DIGEST:
        raise InvalidBlockError(f"{what} must be a {DIGEST}-byte block key, got {key!r}")
    return key


def check_keys(keys: object, what: str = "keys") -> Sequence[BlockKey]:
    """A sequence of keys, each checked (:func:`check_key`)."""
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
        raise InvalidBlockError(f"{what} must be a sequence of block keys, got {type(keys).__name__}")
    for i, k in enumerate(keys):  # type: ignore[arg-type]
        if type(k) is not bytes or len(k) != DIGEST:
            check_key(k, f"{what}[{i}]")
    return keys  # type: ignore[return-value]


def check_parent(parent: object) -> BlockKey | None:
    """A chain's parent key, or None (the chain starts at the salt's root)."""
    return None if parent is None else check_key(parent, "parent")


def check_extra(extra: object) -> bytes:
    """The ``extra`` bytes hashed into every key."""
    if type(extra) is not bytes:
        raise InvalidBlockError(f"extra must be bytes, got {type(extra).__name__}")
    return extra


def chain_start(salt: Hashable | None, parent: BlockKey | None) -> BlockKey:
    """Where a chain starts: ``parent``, or the salt's root key (the salt is checked either way)."""
    root = root_key(salt)
    return root if parent is None else parent


def chain_end(keys: object, what: str) -> BlockKey | None:
    """The last key of a chain (a list of keys), None when it is empty."""
    if type(keys) is not list:
        raise InvalidBlockError(f"{what} must be a list of block keys, got {type(keys).__name__}")
    return check_key(keys[-1], f"{what}[-1]") if keys else None
