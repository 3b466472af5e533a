"""Prefix index: full blocks keyed by a chained hash of their tokens.

A full block's key is ``BLAKE2b(parent_key || extra || token_ids)``
(:mod:`~kvforge.core.keys`), where the first block's parent key is derived
from the request's salt. The chain makes a key name the whole prefix, not
just one block, and BLAKE2b (128-bit digest) makes a collision that would let
one tenant read another's keys/values infeasible; a per-request salt isolates
tenants completely because every key of a salted request differs from every
unsalted or differently salted key.

Salts are compared by value. A salt is None (no salt), a ``str``, ``bytes``
or ``int`` (numpy integers too, never ``bool``), or a tuple of salts (nested
up to 32 deep). Its root key is ``BLAKE2b-128(encode(salt),
person=b"kvforge-salt")`` over a type-tagged, length-prefixed encoding
(``len``: 8 bytes, big-endian)::

    str    b"s" + len(utf8) + utf8        utf8 = salt.encode("utf-8"), strict
    bytes  b"b" + len(salt) + salt
    int    b"i" + len(data) + data        data: two's complement, big-endian, fewest bytes
    tuple  b"t" + len(salt) + encode(salt[0]) + encode(salt[1]) + ...

so equal salts share cached blocks in every process and distinct ones
(``"1"``, ``b"1"``, ``1``, ``(1,)``) never do, whatever their ``repr``. Any
other salt (a float, a list, None inside a tuple, a bool, an object) raises
:class:`~kvforge.errors.SequenceError` naming its type, before anything
changes (:func:`kvforge.core.keys.encode_salt`).

Pure bookkeeping: blocks are ids of a :class:`~kvforge.core.pool.BlockPool`. The
pool keeps cached blocks with zero references as *evictable* (LRU); when it
evicts one it calls back :meth:`PrefixIndex.on_evict`, which forgets the key.
Every call checks its arguments (token ids, keys, block ids, counts) before
it changes anything and raises :class:`~kvforge.errors.InvalidBlockError` or
:class:`~kvforge.errors.SequenceError` naming the bad one.

:class:`NullPrefixIndex` has the same interface and caches nothing, so callers
never branch on whether prefix caching is on.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

from kvforge.core.ids import as_block_id, as_flag, as_int, block_id_list, move_list, token_array
from kvforge.core.keys import (BlockKey, chain_end, chain_keys, chain_start, check_extra, check_key, check_keys,
                               check_parent, next_keys, root_key)
from kvforge.core.pool import BlockPool
from kvforge.core.usage import PrefixStats
from kvforge.errors import InvalidBlockError

if TYPE_CHECKING:
    from kvforge.core.host_tier import HostTier

__all__ = ["BlockKey", "NullPrefixIndex", "PrefixIndex", "PrefixStats"]


class PrefixIndex:
    """Maps chained block keys to cached block ids of one pool.

    Invariants: every mapped block is marked cached in the pool, and maps back
    to its key (``_block_key``); a block is mapped under at most one key.
    """

    enabled = True

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if not isinstance(pool, BlockPool):
            raise InvalidBlockError(f"pool must be a BlockPool, got {type(pool).__name__}")
        self.pool = pool
        self.block_size = as_int(block_size, "block_size", InvalidBlockError, low=1)
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
        #: the host tier (:class:`kvforge.core.host_tier.HostTier`), told of every device
        #: eviction (it spills) and registration (a host-only key moves to the device)
        self.tier: HostTier | None = None
        self._host_hit_tokens = 0
        self._remote_hit_tokens = 0
        pool.on_evict = self.on_evict

    # ---------------------------------------------------------------- keys
    def block_keys(self, token_ids: Sequence[int] | np.ndarray, salt: Hashable | None = None,
                   parent: BlockKey | None = None, extra: bytes = b"") -> list[BlockKey]:
        """Keys of every full block of ``token_ids`` (a partial tail gets none).

        ``parent`` continues a chain (the key of the block before the first);
        ``extra`` (bytes) is hashed into every key (e.g. an adapter's name).
        """
        tokens = token_array(token_ids, "token_ids")
        root = chain_start(salt, check_parent(parent))
        extra = check_extra(extra)
        n = len(tokens) // self.block_size
        return self._keys(tokens[: n * self.block_size].tobytes(), root, extra) if n else []

    def next_key(self, parent: BlockKey | None, token_ids: Sequence[int] | np.ndarray,
                 salt: Hashable | None = None, extra: bytes = b"") -> BlockKey:
        """The key of one full block (exactly ``block_size`` ids) after ``parent``:
        ``block_keys(token_ids, salt, parent, extra)[0]``, for an external index (a
        router, an offload tier) that follows a sequence one block at a time. It is
        computed even when this index caches nothing."""
        tokens = token_array(token_ids, "token_ids")
        root = chain_start(salt, check_parent(parent))
        extra = check_extra(extra)
        if len(tokens) != self.block_size:
            raise InvalidBlockError(f"next_key() needs one full block of token_ids ({self.block_size}), "
                                    f"got {len(tokens)}")
        return chain_keys(tokens.tobytes(), self.block_size, root, extra)[0]

    def extend_chain(self, keys: list[BlockKey], salt: Hashable | None, data: bytes,
                     block_ids: Sequence[int]) -> None:
        """Continue a sequence's chain of block ``keys`` over its next full blocks, held in
        ``block_ids`` with token ids ``data`` (int64 bytes, block after block), and register them.
        Checks everything first: a refused call leaves ``keys`` and the index as they were."""
        block_ids = self._check_blocks_data(block_ids, data)
        chain_start(salt, chain_end(keys, "keys"))
        self._extend_chain(keys, salt, data, block_ids)

    def extend_chains(self, chains: Sequence[list[BlockKey]], salts: Sequence[Hashable | None], data: bytes,
                      block_ids: Sequence[int]) -> None:
        """:meth:`extend_chain` of one block each (a decode step's filled blocks): ``chains[i]``
        gains the key of ``block_ids[i]``, whose ids are block ``i`` of ``data``. Checks
        everything first: a refused call leaves the chains and the index as they were."""
        block_ids = self._check_blocks_data(block_ids, data)
        if len(chains) != len(block_ids) or len(salts) != len(block_ids):
            raise InvalidBlockError(f"extend_chains() needs one chain and one salt per block: {len(chains)} "
                                    f"chains, {len(salts)} salts, {len(block_ids)} block_ids")
        for i, (keys, salt) in enumerate(zip(chains, salts)):
            chain_start(salt, chain_end(keys, f"chains[{i}]"))
        self._extend_chains(chains, salts, data, block_ids)

    def _check_blocks_data(self, block_ids: Sequence[int], data: bytes) -> list[int]:
        """Block ids of the pool (as Python ints) and ``data`` holding exactly their token ids."""
        ids = block_id_list(block_ids, "block_ids", self.pool.num_blocks)
        if type(data) is not bytes or len(data) != len(ids) * self.block_size * 8:
            size = f"{len(data)} bytes" if type(data) is bytes else type(data).__name__
            raise InvalidBlockError(f"data must be the int64 token ids of the {len(ids)} block(s), "
                                    f"{len(ids) * self.block_size * 8} bytes, got {size}")
        return ids

    # --- unchecked: the manager's calls, whose arguments it has checked (or made) itself
    def _keys(self, data: bytes, root: BlockKey, extra: bytes = b"") -> list[BlockKey]:
        """Keys of the full blocks whose int64 token ids are ``data``, chained after ``root``."""
        return chain_keys(data, self.block_size, root, extra)

    def _lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Cached blocks for the longest prefix of ``keys`` (nothing recorded)."""
        hits = []
        get = self._blocks.get
        for k in keys:
            b = get(k)
            if b is None:
                break
            hits.append(b)
        return hits

    def _extend_chain(self, keys: list[BlockKey], salt: Hashable | None, data: bytes, block_ids: list[int]) -> None:
        new_keys = chain_keys(data, self.block_size, keys[-1] if keys else root_key(salt))
        self._register_many(block_ids, new_keys)
        keys.extend(new_keys)

    def _extend_chains(self, chains: Sequence[list[BlockKey]], salts: Sequence[Hashable | None], data: bytes,
                       block_ids: list[int]) -> None:
        parents = [keys[-1] if keys else root_key(salt) for keys, salt in zip(chains, salts)]
        new_keys = next_keys(parents, data, self.block_size)
        self._register_many(block_ids, new_keys)
        for keys, key in zip(chains, new_keys):
            keys.append(key)

    def _register_many(self, block_ids: list[int], keys: Sequence[BlockKey]) -> int:
        """:meth:`register_many` of checked ids (Python ints of the pool) and keys."""
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
        if self.tier is not None:
            for key, block_id in fresh.items():
                self.tier.on_device_register(block_id, key)
        if self.on_stored is not None:
            for key, block_id in fresh.items():
                self.on_stored(block_id, key)
        return len(fresh)

    # -------------------------------------------------------------- lookup
    def lookup(self, keys: Sequence[BlockKey], num_tokens: int, *, record: bool = True) -> list[int]:
        """Cached blocks for the longest prefix of ``keys`` (a query of ``num_tokens``).

        Counts the query unless ``record`` is false (then the caller calls
        :meth:`record_query` once the request really went ahead); the caller
        takes references on the result.
        """
        keys = check_keys(keys)
        num_tokens = as_int(num_tokens, "num_tokens", InvalidBlockError)
        hits = self._lookup(keys)
        if as_flag(record, "record", InvalidBlockError):
            self.record_query(num_tokens, len(hits))
        return hits

    def record_query(self, num_tokens: int, num_hit_blocks: int) -> None:
        """Count a query of ``num_tokens`` that found ``num_hit_blocks`` cached blocks."""
        self._record_query(as_int(num_tokens, "num_tokens", InvalidBlockError),
                           as_int(num_hit_blocks, "num_hit_blocks", InvalidBlockError))

    def _record_query(self, num_tokens: int, num_hit_blocks: int, num_host_blocks: int = 0,
                      num_remote_blocks: int = 0) -> None:
        self._queries += 1
        self._query_tokens += num_tokens
        self._hit_tokens += num_hit_blocks * self.block_size
        self._host_hit_tokens += num_host_blocks * self.block_size
        self._remote_hit_tokens += num_remote_blocks * self.block_size

    def register(self, block_id: int, key: BlockKey) -> bool:
        """Cache a held, full block under ``key``; False when the key is taken
        by another block (the content is already cached) or the block has a key."""
        block_id = as_block_id(block_id, self.pool.num_blocks)
        key = check_key(key, "key")
        return self._register_many([block_id], [key]) == 1

    def register_many(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int:
        """:meth:`register` each ``(block_ids[i], keys[i])`` in order (one pool call);
        return how many were registered (all or nothing when an id or key is bad)."""
        block_ids = block_id_list(block_ids, "block_ids", self.pool.num_blocks)
        keys = check_keys(keys)
        if len(block_ids) != len(keys):
            raise InvalidBlockError(f"register_many() needs one key per block: {len(block_ids)} block_ids, "
                                    f"{len(keys)} keys")
        return self._register_many(block_ids, keys)

    def on_evict(self, block_id: int) -> None:
        """Forget an evicted block (called by the pool)."""
        key = self._block_key.pop(as_block_id(block_id, self.pool.num_blocks), None)
        if key is not None:
            del self._blocks[key]
            self._evictions += 1
            if self.tier is not None:
                self.tier.on_device_evict(block_id, key)
            if self.on_removed is not None:
                self.on_removed(block_id, key)

    def _unregister(self, block_id: int) -> None:
        """Forget the key of a held block (checked by the caller) that is about to be written
        again: a truncation took its only owner back below its end. A host copy of it keeps
        the key on the host tier (its data is the block's, as it was when keyed)."""
        key = self._block_key.pop(block_id, None)
        if key is None:
            return
        del self._blocks[key]
        self.pool.unmark_cached(block_id)
        if self.tier is not None:
            self.tier.on_device_unregister(block_id, key)
        if self.on_removed is not None:
            self.on_removed(block_id, key)

    def key_of(self, block_id: int) -> BlockKey | None:
        """The key a block is cached under, if any."""
        return self._block_key.get(as_block_id(block_id, self.pool.num_blocks))

    def relocate(self, mapping: dict[int, int]) -> None:
        """Follow compaction moves ``old id -> new id`` (the keys stay; an external
        index fed by ``on_stored``/``on_removed`` learns of moves through
        :meth:`kvforge.storage.cache.KVCache.add_relocation_listener`)."""
        if not isinstance(mapping, dict):
            raise InvalidBlockError(f"mapping must be a dict of old -> new block ids, got {type(mapping).__name__}")
        pairs = move_list(list(mapping.items()), self.pool.num_blocks, "mapping")
        mapping = dict(pairs)
        if len(set(mapping.values())) != len(mapping):
            raise InvalidBlockError(f"mapping moves two blocks to one id: {mapping!r}")
        clash = next((new for new in mapping.values() if new in self._block_key and new not in mapping), None)
        if clash is not None:
            raise InvalidBlockError(f"mapping moves a block onto block {clash}, which holds a key and stays")
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
                           self._registered, self._host_hit_tokens, self._remote_hit_tokens)

    def check_invariants(self) -> None:
        """Assert index/pool consistency."""
        assert len(self._blocks) == len(self._block_key)
        for key, b in self._blocks.items():
            assert self._block_key[b] == key
            assert self.pool.is_cached(b), f"indexed block {b} not marked cached"


class NullPrefixIndex(PrefixIndex):
    """Caches nothing: keys are not computed, lookups miss, registration is refused
    (every argument is still checked, as :class:`PrefixIndex` checks it)."""

    enabled = False

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(pool, block_size)
        pool.on_evict = None

    def _keys(self, data: bytes, root: BlockKey, extra: bytes = b"") -> list[BlockKey]:
        return []

    def _lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        return []

    def _extend_chain(self, keys: list[BlockKey], salt: Hashable | None, data: bytes, block_ids: list[int]) -> None:
        return None

    def _extend_chains(self, chains: Sequence[list[BlockKey]], salts: Sequence[Hashable | None], data: bytes,
                       block_ids: list[int]) -> None:
        return None

    def _register_many(self, block_ids: list[int], keys: Sequence[BlockKey]) -> int:
        return 0
