"""Prefix keys: the chained hash that names a full block and every token before it.

A full block's key is ``BLAKE2b-128(parent_key || extra || token_ids)``, the
token ids as native int64 bytes, where the first block's parent key is the
*root key* of the request's salt (:func:`root_key`). The chain makes a key
name the whole prefix, not just one block, and the 128-bit digest makes a
collision that would let one tenant read another's keys/values infeasible.
:class:`~kvforge.core.prefix.PrefixIndex` maps keys to cached blocks; this
module only computes and checks them.
"""
from __future__ import annotations

import hashlib
from typing import Hashable, Sequence

from kvforge.errors import InvalidBlockError

__all__ = ["DIGEST", "BlockKey", "chain_end", "chain_keys", "chain_start", "check_extra", "check_key", "check_keys",
           "check_parent", "next_keys", "root_key"]

BlockKey = bytes
#: bytes of a key (BLAKE2b digest size)
DIGEST = 16

#: BLAKE2b with a 128-bit digest, nothing hashed yet: copying it is cheaper than
#: building a new hash object for every block (same digests as ``blake2b(x, digest_size=16)``).
_EMPTY_BLAKE = hashlib.blake2b(digest_size=DIGEST)


def root_key(salt: Hashable | None) -> BlockKey:
    """The parent key of a request's first block: zeros without a salt."""
    if salt is None:
        return b"\x00" * DIGEST
    return hashlib.blake2b(repr(salt).encode(), digest_size=DIGEST, person=b"kvforge-salt").digest()


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
