"""Prefix index: full blocks keyed by a chained hash of their tokens.

A full block's key is ``BLAKE2b(parent_key || extra || token_ids)``, where the
first block's parent key is derived from the request's salt. The chain makes a
key name the whole prefix, not just one block, and BLAKE2b (128-bit digest)
makes a collision that would let one tenant read another's keys/values
infeasible; a per-request salt isolates tenants completely because every key
of a salted request differs from every unsalted or differently salted key.

Pure bookkeeping: blocks are ids of a :class:`~kvforge.core.pool.BlockPool`. The
pool keeps cached blocks with zero references as *evictable* (LRU); when it
evicts one it calls back :meth:`PrefixIndex.on_evict`, which forgets the key.

:class:`NullPrefixIndex` has the same interface and caches nothing, so callers
never branch on whether prefix caching is on.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

from kvforge.core.pool import BlockPool

__all__ = ["BlockKey", "NullPrefixIndex", "PrefixIndex", "PrefixStats"]

BlockKey = bytes
_DIGEST = 16


@dataclass(frozen=True, slots=True)
class PrefixStats:
    """Counters of a prefix index. ``hit_rate`` = hit tokens / queried tokens."""

    queries: int
    query_tokens: int
    hit_tokens: int
    hit_rate: float
    cached_blocks: int
    evictable_blocks: int
    evictions: int
    registered_blocks: int

    def to_dict(self) -> dict[str, float]:
        """The snapshot as a plain dict."""
        return asdict(self)


#: BLAKE2b with a 128-bit digest, nothing hashed yet: copying it is cheaper than
#: building a new hash object for every block (same digests as ``blake2b(x, digest_size=16)``).
_EMPTY_BLAKE = hashlib.blake2b(digest_size=_DIGEST)


def _int64_bytes(token_ids: Sequence[int] | np.ndarray, count: int) -> bytes:
    """The first ``count`` token ids as native int64 bytes (the hashed representation)."""
    if isinstance(token_ids, array) and token_ids.typecode == "q":  # prompts reach the manager so
        return (token_ids if len(token_ids) == count else token_ids[:count]).tobytes()
    if not isinstance(token_ids, np.ndarray):
        try:  # array() converts a list of ints without numpy's per-call overhead
            return array("q", token_ids if len(token_ids) == count else token_ids[:count]).tobytes()
        except (TypeError, OverflowError):
            pass
    return np.ascontiguousarray(np.asarray(token_ids[:count], dtype=np.int64)).tobytes()


def _root_key(salt: Hashable | None) -> BlockKey:
    if salt is None:
        return b"\x00" * _DIGEST
    return hashlib.blake2b(repr(salt).encode(), digest_size=_DIGEST, person=b"kvforge-salt").digest()



class PrefixIndex:
    """Maps chained block keys to cached block ids of one pool.

    Invariants: every mapped block is marked cached in the pool, and maps back
    to its key (``_block_key``); a block is mapped under at most one key.
    """

    enabled = True

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[BlockKey, int] = {}
        self._block_key: dict[int, BlockKey] = {}
        self._queries = 0
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0
        self._registered = 0
        #: optional callbacks for an external index (router, offload tier)
        self.on_stored: Callable[[int, BlockKey], None] | None = None
        self.on_removed: Callable[[int, BlockKey], None] | None = None
        pool.on_evict = self.on_evict

    # ---------------------------------------------------------------- keys
    def block_keys(self, token_ids: Sequence[int] | np.ndarray, salt: Hashable | None = None,
                   parent: BlockKey | None = None, extra: bytes = b"") -> list[BlockKey]:
        """Keys of every full block of ``token_ids`` (a partial tail gets none).

        ``parent`` continues a chain (the key of the block before the first).
        """
        n = len(token_ids) // self.block_size
        if n == 0:
            return []
        return self._chain(_int64_bytes(token_ids, n * self.block_size), salt, parent, extra)

    def _chain(self, data: bytes, salt: Hashable | None, parent: BlockKey | None, extra: bytes = b"") -> list[BlockKey]:
        """Keys of the full blocks whose int64 token ids are ``data``, chained after ``parent``."""
        step = self.block_size * 8
        key = _root_key(salt) if parent is None else parent
        keys = []
        new_hash = _EMPTY_BLAKE.copy
        for start in range(0, len(data) - step + 1, step):
            h = new_hash()
            h.update(key + extra + data[start:start + step])
            key = h.digest()
            keys.append(key)
        return keys

    def next_key(self, parent: BlockKey | None, token_ids: Sequence[int] | np.ndarray,
                 salt: Hashable | None = None, extra: bytes = b"") -> BlockKey:
        """The key of one full block (exactly ``block_size`` ids) after ``parent``:
        ``block_keys(token_ids, salt, parent, extra)[0]``, for an external index (a
        router, an offload tier) that follows a sequence one block at a time."""
        if len(token_ids) != self.block_size:
            raise ValueError(f"next_key() needs {self.block_size} token ids, got {len(token_ids)}")
        return self._chain(_int64_bytes(token_ids, self.block_size), salt, parent, extra)[0]

    def extend_chain(self, keys: list[BlockKey], salt: Hashable | None, data: bytes,
                     block_ids: Sequence[int]) -> None:
        """Continue a sequence's chain of block ``keys`` over its next full blocks, held in
        ``block_ids`` with token ids ``data`` (int64 bytes, block after block), and register them."""
        new_keys = self._chain(data, salt, keys[-1] if keys else None)
        keys.extend(new_keys)
        self.register_many(block_ids, new_keys)

    def extend_chains(self, chains: Sequence[list[BlockKey]], salts: Sequence[Hashable | None], data: bytes,
                      block_ids: Sequence[int]) -> None:
        """:meth:`extend_chain` of one block each (a decode step's filled blocks): ``chains[i]``
        gains the key of ``block_ids[i]``, whose ids are block ``i`` of ``data``."""
        step = self.block_size * 8
        new_hash = _EMPTY_BLAKE.copy
        new_keys = []
        for i, (keys, salt) in enumerate(zip(chains, salts)):
            h = new_hash()
            h.update((keys[-1] if keys else _root_key(salt)) + data[i * step:(i + 1) * step])
            key = h.digest()
            keys.append(key)
            new_keys.append(key)
        self.register_many(block_ids, new_keys)

    # -------------------------------------------------------------- lookup
    def lookup(self, keys: Sequence[BlockKey], num_tokens: int, *, record: bool = True) -> list[int]:
        """Cached blocks for the longest prefix of ``keys`` (a query of ``num_tokens``).

        Counts the query unless ``record`` is false (then the caller calls
        :meth:`record_query` once the request really went ahead); the caller
        takes references on the result.
        """
        hits = []
        get = self._blocks.get
        for k in keys:
            b = get(k)
            if b is None:
                break
            hits.append(b)
        if record:
            self.record_query(num_tokens, len(hits))
        return hits

    def record_query(self, num_tokens: int, num_hit_blocks: int) -> None:
        """Count a query of ``num_tokens`` that found ``num_hit_blocks`` cached blocks."""
        self._queries += 1
        self._query_tokens += num_tokens
        self._hit_tokens += num_hit_blocks * self.block_size

    def register(self, block_id: int, key: BlockKey) -> bool:
        """Cache a held, full block under ``key``; False when the key is taken
        by another block (the content is already cached) or the block has a key."""
        if key in self._blocks or block_id in self._block_key:
            return False
        self.pool.mark_cached(block_id)
        self._blocks[key] = block_id
        self._block_key[block_id] = key
        self._registered += 1
        if self.on_stored is not None:
            self.on_stored(block_id, key)
        return True

    def register_many(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int:
        """:meth:`register` each ``(block_ids[i], keys[i])`` in order (one pool call);
        return how many were registered."""
        blocks, block_key = self._blocks, self._block_key
        fresh: dict[BlockKey, int] = {}
        taken: set[int] = set()
        for block_id, key in zip(block_ids, keys):
            if key in blocks or key in fresh or block_id in block_key or block_id in taken:
                continue
            fresh[key] = block_id
            taken.add(block_id)
        if not fresh:
            return 0
        self.pool.mark_cached_many(list(fresh.values()))
        for key, block_id in fresh.items():
            blocks[key] = block_id
            block_key[block_id] = key
        self._registered += len(fresh)
        if self.on_stored is not None:
            for key, block_id in fresh.items():
                self.on_stored(block_id, key)
        return len(fresh)

    def on_evict(self, block_id: int) -> None:
        """Forget an evicted block (called by the pool)."""
        key = self._block_key.pop(block_id, None)
        if key is not None:
            del self._blocks[key]
            self._evictions += 1
            if self.on_removed is not None:
                self.on_removed(block_id, key)

    def key_of(self, block_id: int) -> BlockKey | None:
        """The key a block is cached under, if any."""
        return self._block_key.get(block_id)

    def relocate(self, mapping: dict[int, int]) -> None:
        """Follow compaction moves ``old id -> new id`` (the keys stay; an external
        index fed by ``on_stored``/``on_removed`` learns of moves through
        :meth:`kvforge.storage.cache.KVCache.add_relocation_listener`)."""
        moved = {old: new for old, new in mapping.items() if old in self._block_key}
        keys = {old: self._block_key.pop(old) for old in moved}
        for old, new in moved.items():
            self._block_key[new] = keys[old]
            self._blocks[keys[old]] = new

    def metadata_bytes(self) -> int:
        """Host bytes of the two maps (keys are 16-byte digests shared by both)."""
        return sys.getsizeof(self._blocks) + sys.getsizeof(self._block_key) + 33 * len(self._blocks)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the index now."""
        return len(self._blocks)

    def stats(self) -> PrefixStats:
        """A snapshot of the counters."""
        q = self._query_tokens
        return PrefixStats(self._queries, q, self._hit_tokens, self._hit_tokens / q if q else 0.0,
                           len(self._blocks), self.pool.num_evictable_blocks, self._evictions,
                           self._registered)

    def check_invariants(self) -> None:
        """Assert index/pool consistency."""
        assert len(self._blocks) == len(self._block_key)
        for key, b in self._blocks.items():
            assert self._block_key[b] == key
            assert self.pool.is_cached(b), f"indexed block {b} not marked cached"


class NullPrefixIndex(PrefixIndex):
    """Caches nothing: keys are not computed, lookups miss, registration is refused."""

    enabled = False

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(pool, block_size)
        pool.on_evict = None

    def block_keys(self, token_ids: Sequence[int] | np.ndarray, salt: Hashable | None = None,
                   parent: BlockKey | None = None, extra: bytes = b"") -> list[BlockKey]:
        return []

    def lookup(self, keys: Sequence[BlockKey], num_tokens: int, *, record: bool = True) -> list[int]:
        if record:
            self.record_query(num_tokens, 0)
        return []

    def register(self, block_id: int, key: BlockKey) -> bool:
        return False

    def register_many(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int:
        return 0

    def extend_chain(self, keys: list[BlockKey], salt: Hashable | None, data: bytes,
                     block_ids: Sequence[int]) -> None:
        return None

    def extend_chains(self, chains: Sequence[list[BlockKey]], salts: Sequence[Hashable | None], data: bytes,
                      block_ids: Sequence[int]) -> None:
        return None
