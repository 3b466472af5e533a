"""Prefix caching: shared prompt blocks, salts (by value), LRU eviction, stats, callbacks, the null index.

Block size 4 throughout; ids, reference counts and the eviction queue are
asserted after every step. Eviction order (pool.py): least recently released
first; within one free_sequence the sequence's tail block goes first.
"""
from __future__ import annotations

import os
import subprocess
import sys
from array import array
from enum import IntEnum

import numpy as np
import pytest

from kvforge.core.keys import MAX_SALT_DEPTH, encode_salt, root_key
from kvforge.core.manager import BlockManager
from kvforge.errors import OutOfBlocksError, SequenceError
from kvforge.core.prefix import NullPrefixIndex, PrefixIndex, PrefixStats

SYS = [1, 2, 3, 4, 5, 6, 7, 8]                 # a two-block system prompt


def ok(m: BlockManager) -> BlockManager:
    m.check_invariants()
    return m


def refs(m: BlockManager, ids) -> list[int]:
    return [m.pool.ref_count(b) for b in ids]


def cached(m: BlockManager) -> list[int]:
    """Block ids registered in the prefix index, sorted."""
    return sorted(b for b in range(m.pool.num_blocks) if m.prefix.key_of(b) is not None)


# -------------------------------------------------------------- sharing
def test_same_system_prompt_shares_its_blocks():
    m = BlockManager(16, 4)
    a = m.add_sequence("A", SYS + [100, 101, 102])
    assert (a.num_cached_tokens, a.block_ids) == (0, [0, 1, 2])
    np.testing.assert_array_equal(a.slots, np.arange(11))
    assert cached(m) == [0, 1]                 # the partial tail is not registered
    keys = m.prefix.block_keys(SYS)
    assert [m.prefix.key_of(0), m.prefix.key_of(1)] == keys
    ok(m)
    b = m.add_sequence("B", SYS + [200, 201, 202])
    assert (b.num_cached_tokens, b.block_ids) == (8, [0, 1, 3])
    np.testing.assert_array_equal(b.slots, [12, 13, 14])   # only the suffix is computed
    assert refs(m, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert m.pool.num_allocated_blocks == 4
    ok(m)
    m.free_sequence("A")
    assert refs(m, [0, 1, 2, 3]) == [1, 1, 0, 1]
    assert m.pool.evictable_blocks() == [] and m.pool.free_blocks()[0] == 2
    ok(m)
    m.free_sequence("B")                       # shared blocks now unreferenced: evictable, tail first
    assert m.pool.evictable_blocks() == [1, 0]
    assert m.pool.free_blocks()[:2] == [3, 2]
    assert cached(m) == [0, 1]
    ok(m)
    c = m.add_sequence("C", SYS + [300])       # revives both cached blocks
    assert (c.num_cached_tokens, c.block_ids) == (8, [0, 1, 3])
    assert m.pool.evictable_blocks() == []
    assert refs(m, [0, 1, 3]) == [1, 1, 1]
    ok(m)


def test_last_prompt_token_is_always_computed():
    m = BlockManager(16, 4)
    a = m.add_sequence("A", SYS)               # exactly two full blocks, both registered
    assert a.block_ids == [0, 1] and cached(m) == [0, 1]
    b = m.add_sequence("B", SYS)               # reuses only the first: the last token needs logits
    assert (b.num_cached_tokens, b.block_ids) == (4, [0, 2])
    np.testing.assert_array_equal(b.slots, [8, 9, 10, 11])
    assert refs(m, [0, 1, 2]) == [2, 1, 1]
    assert m.prefix.key_of(2) is None          # same content as block 1, already cached
    one = m.add_sequence("one", [1, 2, 3, 4])  # a one-block prompt reuses nothing
    assert one.num_cached_tokens == 0 and one.block_ids == [3]
    tiny = m.add_sequence("tiny", [1])
    assert tiny.num_cached_tokens == 0
    empty = m.add_sequence("empty", [])
    assert empty.num_cached_tokens == 0 and empty.block_ids == []
    ok(m)


def test_different_salt_shares_nothing():
    m = BlockManager(32, 4)
    a = m.add_sequence("A", SYS + [9], salt="tenant-a")
    b = m.add_sequence("B", SYS + [9], salt="tenant-b")
    c = m.add_sequence("C", SYS + [9])
    assert [r.num_cached_tokens for r in (a, b, c)] == [0, 0, 0]
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1, 2], [3, 4, 5], [6, 7, 8])
    assert cached(m) == [0, 1, 3, 4, 6, 7]
    assert refs(m, range(9)) == [1] * 9
    d = m.add_sequence("D", SYS + [9], salt="tenant-a")
    assert (d.num_cached_tokens, d.block_ids[:2]) == (8, [0, 1])
    e = m.add_sequence("E", SYS + [9])
    assert (e.num_cached_tokens, e.block_ids[:2]) == (8, [6, 7])
    ok(m)


def test_block_keys():
    idx = PrefixIndex.__new__(PrefixIndex)     # keys need no pool
    idx.block_size = 4
    tokens = list(range(10))
    keys = idx.block_keys(tokens)
    assert len(keys) == 2 and all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert keys == idx.block_keys(np.array(tokens)) == idx.block_keys(tokens[:8])
    assert idx.block_keys(tokens[:4]) == keys[:1]
    assert idx.block_keys(tokens[:3]) == []
    assert idx.block_keys(tokens[4:8], parent=keys[0]) == keys[1:]
    assert idx.block_keys([0, 1, 2, 3, 4, 5, 6, 7]) == keys
    # a different first block changes every later key (the chain names the whole prefix)
    other = idx.block_keys([9, 1, 2, 3, 4, 5, 6, 7])
    assert other[0] != keys[0] and other[1] != keys[1]
    salted = idx.block_keys(tokens, salt="x")
    assert not set(salted) & set(keys)
    assert idx.block_keys(tokens, salt="x") == salted
    assert not set(idx.block_keys(tokens, salt="y")) & set(salted)
    assert not set(idx.block_keys(tokens, extra=b"lora-1")) & set(keys)
    # every input type hashes the same ids to the same keys
    assert idx.block_keys(array("q", tokens)) == keys
    assert idx.block_keys(np.array(tokens, dtype=np.int32)) == keys
    assert idx.block_keys([np.int64(t) for t in tokens]) == keys
    assert idx.block_keys(tuple(tokens)) == keys
    # next_key: one block of the chain
    assert idx.next_key(None, tokens[:4]) == keys[0]
    assert idx.next_key(keys[0], array("q", tokens[4:8])) == keys[1]
    assert idx.next_key(None, tokens[:4], salt="x") == salted[0]
    with pytest.raises(ValueError):
        idx.next_key(None, tokens[:3])


# ------------------------------------------------------------ eviction
def test_eviction_order_and_index_cleanup():
    m = BlockManager(6, 4)
    removed: list[int] = []
    m.prefix.on_removed = lambda b, k: removed.append(b)
    X = list(range(10, 22))                    # 12 tokens: 3 full blocks
    Y = list(range(30, 38))                    # 8 tokens: 2 full blocks
    x_keys, y_keys = m.prefix.block_keys(X), m.prefix.block_keys(Y)
    assert m.add_sequence("X", X).block_ids == [0, 1, 2]
    assert m.add_sequence("Y", Y).block_ids == [3, 4]
    assert cached(m) == [0, 1, 2, 3, 4]
    m.free_sequence("X")
    assert m.pool.evictable_blocks() == [2, 1, 0]
    m.free_sequence("Y")
    assert m.pool.evictable_blocks() == [2, 1, 0, 4, 3]
    assert m.pool.free_blocks() == [5]
    ok(m)
    z = m.add_sequence("Z", num_tokens=8)      # free block 5, then evicts X's tail block 2
    assert sorted(z.block_ids) == [2, 5]
    assert removed == [2]
    assert m.pool.evictable_blocks() == [1, 0, 4, 3]
    assert cached(m) == [0, 1, 3, 4] and m.prefix.key_of(2) is None
    ok(m)
    x2 = m.add_sequence("X2", X)               # X's first two blocks still cached: revived
    assert (x2.num_cached_tokens, x2.block_ids) == (8, [0, 1, 4])   # and Y's tail (4) evicted
    assert removed == [2, 4]
    assert m.pool.evictable_blocks() == [3]
    assert m.prefix.key_of(4) == x_keys[2]     # block 4 now holds X's third block
    ok(m)
    before = (m.pool.evictable_blocks(), cached(m), m.prefix.stats().cached_blocks)
    with pytest.raises(OutOfBlocksError):
        m.add_sequence("Y2", Y)                # 1 revived + 1 new > 1 available
    assert (m.pool.evictable_blocks(), cached(m), m.prefix.stats().cached_blocks) == before
    assert "Y2" not in m
    ok(m)
    m.free_sequence("Z")
    y2 = m.add_sequence("Y2", Y)
    assert (y2.num_cached_tokens, y2.block_ids) == (4, [3, 2])
    assert m.prefix.key_of(3) == y_keys[0]
    assert m.prefix.key_of(2) == y_keys[1]     # Y's second block computed again, cached again
    assert m.pool.evictable_blocks() == []
    assert m.prefix.stats().evictions == 2
    ok(m)


def test_revived_blocks_move_to_the_back_of_the_queue():
    m = BlockManager(16, 4)
    m.add_sequence("A", SYS + [50])            # [0, 1, 2]
    m.add_sequence("B", [60, 61, 62, 63, 64])  # [3, 4]
    m.free_sequence("A")
    m.free_sequence("B")
    assert m.pool.evictable_blocks() == [1, 0, 3]
    m.add_sequence("A2", SYS + [51])           # revives 0 and 1
    assert m.pool.evictable_blocks() == [3]
    m.free_sequence("A2")
    assert m.pool.evictable_blocks() == [3, 1, 0]
    assert m.pool.reclaim_unused_blocks() == 3
    assert cached(m) == []
    ok(m)


def test_evicted_prefix_misses_later():
    m = BlockManager(8, 4)
    m.add_sequence("A", SYS + [9])
    m.free_sequence("A")
    assert m.num_blocks_needed(9, SYS + [9]) == 3   # 2 cached to revive + 1 new
    assert m.pool.reclaim_unused_blocks() == 2
    assert m.prefix.num_cached_blocks == 0
    r = m.add_sequence("B", SYS + [9])
    assert r.num_cached_tokens == 0
    assert m.prefix.stats().hit_tokens == 0
    ok(m)


def test_num_blocks_needed_counts_hits_and_revivals():
    m = BlockManager(16, 4)
    m.add_sequence("A", SYS + [9, 9, 9])
    assert m.num_blocks_needed(11, SYS + [8, 8, 8]) == 1    # 2 held hits cost nothing
    assert m.num_blocks_needed(11, SYS + [8, 8, 8], salt="s") == 3
    assert m.num_blocks_needed(11) == 3
    m.free_sequence("A")
    assert m.num_blocks_needed(11, SYS + [8, 8, 8]) == 3    # hits must be revived
    assert m.can_add_sequence(11, SYS + [8, 8, 8])
    ok(m)


# ------------------------------------------------------- registration on fill
def test_blocks_filled_by_decode_are_registered():
    m = BlockManager(16, 4)
    m.add_sequence("A", [1, 2, 3])             # [0]
    assert cached(m) == []
    assert m.append_token("A", 4) == 3         # block 0 fills with known ids
    assert m.prefix.key_of(0) == m.prefix.block_keys([1, 2, 3, 4])[0]
    m.add_sequence("B", [7, 7, 7])             # [1]
    np.testing.assert_array_equal(m.append_tokens_batch(["A", "B"], 1, token_ids=[5, 7]), [8, 7])
    assert cached(m) == [0, 1]                 # B's block filled in the batch
    assert m.prefix.key_of(1) == m.prefix.block_keys([7, 7, 7, 7])[0]
    m.append_tokens_batch(["A", "B"], 1, token_ids=np.array([6, 7]))
    m.append_tokens_batch(["A"], 1, token_ids=[7])
    assert cached(m) == [0, 1]
    m.append_tokens_batch(["A"], 1, token_ids=[8])
    assert cached(m) == [0, 1, 2]
    assert m.prefix.key_of(2) == m.prefix.block_keys([1, 2, 3, 4, 5, 6, 7, 8])[1]
    r = m.add_sequence("C", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (r.num_cached_tokens, r.block_ids[:2]) == (8, [0, 2])
    ok(m)


def test_tokens_without_ids_are_never_registered():
    m = BlockManager(16, 4)
    m.add_sequence("A", [1, 2, 3])
    m.append_token("A")                        # id unknown
    m.append_tokens("A", 4, token_ids=[1, 1, 1, 1])
    m.append_tokens_batch(["A"], 4)
    assert cached(m) == []
    assert m.token_ids("A") is None
    m.add_sequence("N", num_tokens=8)          # no prompt: nothing to hash
    assert cached(m) == []
    ok(m)


def test_fork_child_inherits_keys():
    m = BlockManager(16, 4)
    m.add_sequence("P", [1, 2, 3, 4, 5, 6])
    m.fork("P", "C")
    m.append_tokens("C", 2, token_ids=[7, 8])  # copy-on-write, then the copy fills
    assert m.pending_copies == [(1, 2)]
    assert m.prefix.key_of(2) == m.prefix.block_keys([1, 2, 3, 4, 5, 6, 7, 8])[1]
    m.append_tokens("P", 2, token_ids=[7, 8])  # same content: the key is taken, no new entry
    assert m.prefix.key_of(1) is None
    assert m.prefix.stats().registered_blocks == 2
    ok(m)


# ---------------------------------------------------------- stats and callbacks
def test_hit_rate_stats_exact():
    m = BlockManager(32, 4)
    assert m.prefix.stats() == PrefixStats(0, 0, 0, 0.0, 0, 0, 0, 0)
    m.add_sequence("A", SYS + [1, 2, 3])       # 11 tokens, miss
    m.add_sequence("B", SYS + [4, 5])          # 10 tokens, 8 hit
    m.add_sequence("C", SYS[:4] + [0, 0, 0, 0, 1])  # 9 tokens, 4 hit
    m.add_sequence("D", [9] * 5)               # 5 tokens, miss
    m.free_sequence("D")                       # D's one full block becomes evictable
    s = m.prefix.stats()
    assert isinstance(s, PrefixStats)
    assert (s.queries, s.query_tokens, s.hit_tokens) == (4, 35, 12)
    assert s.hit_rate == 12 / 35
    # registered: A's 2, C's second block, D's first
    assert (s.cached_blocks, s.evictable_blocks, s.evictions, s.registered_blocks) == (4, 1, 0, 4)
    m.pool.reclaim_unused_blocks()
    s = m.prefix.stats()
    assert (s.cached_blocks, s.evictable_blocks, s.evictions) == (3, 0, 1)
    assert s.to_dict()["hit_tokens"] == 12
    ok(m)


def test_callbacks_on_stored_and_on_removed():
    m = BlockManager(8, 4)
    stored, removed = [], []
    m.prefix.on_stored = lambda b, k: stored.append((b, k))
    m.prefix.on_removed = lambda b, k: removed.append((b, k))
    m.add_sequence("A", SYS + [9])
    k0, k1 = m.prefix.block_keys(SYS)
    assert stored == [(0, k0), (1, k1)]
    m.add_sequence("B", SYS + [9])             # hits: nothing new stored
    assert stored == [(0, k0), (1, k1)]
    m.free_sequence("A"), m.free_sequence("B")
    assert removed == []
    m.pool.reclaim_unused_blocks()
    assert removed == [(1, k1), (0, k0)]       # tail first
    ok(m)


# ---------------------------------------------------------- the null index
def test_null_prefix_index_never_shares():
    m = BlockManager(16, 4, enable_prefix_caching=False)
    assert isinstance(m.prefix, NullPrefixIndex) and not m.prefix.enabled
    assert m.pool.on_evict is None
    a = m.add_sequence("A", SYS + [9])
    b = m.add_sequence("B", SYS + [9])
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3, 4, 5])
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 0)
    assert refs(m, range(6)) == [1] * 6
    assert not any(m.pool.is_cached(x) for x in range(16))
    assert m.prefix.block_keys(SYS) == [] and m.prefix.register(0, b"k" * 16) is False
    assert m.num_blocks_needed(9, SYS + [9]) == 3
    m.append_tokens("A", 3, token_ids=[1, 2, 3])
    m.append_tokens_batch(["A", "B"], 1, token_ids=[1, 2])
    s = m.prefix.stats()
    assert (s.queries, s.query_tokens, s.hit_tokens, s.cached_blocks, s.registered_blocks) == (2, 18, 0, 0, 0)
    m.free_sequence("A"), m.free_sequence("B")
    assert m.pool.evictable_blocks() == [] and m.pool.num_free_blocks == 16
    ok(m)


def test_refused_request_does_not_count_as_a_query():
    from kvforge import BlockManager, OutOfBlocksError

    m = BlockManager(4, 4)
    m.add_sequence("a", list(range(12)))
    before = m.prefix.stats()
    with pytest.raises(OutOfBlocksError):
        m.add_sequence("b", list(range(100, 120)))
    assert m.prefix.stats() == before
    m.check_invariants()


def test_allocate_rejects_bools_and_floats():
    from kvforge import BlockPool, InvalidBlockError

    pool = BlockPool(4)
    for bad in (True, 1.0):
        with pytest.raises(InvalidBlockError):
            pool.allocate(bad)
    assert pool.num_free_blocks == 4


def test_register_many_in_order_first_wins():
    m = BlockManager(16, 4)
    ids = m.pool.allocate(4)
    k = m.prefix.block_keys(list(range(12)))  # three distinct keys
    stored = []
    m.prefix.on_stored = lambda b, key: stored.append((b, key))
    # block 1 twice and key k[0] twice in one call: the first of each wins, as register() would
    assert m.prefix.register_many([ids[0], ids[1], ids[1], ids[2]], [k[0], k[1], k[2], k[0]]) == 2
    assert [m.prefix.key_of(b) for b in ids] == [k[0], k[1], None, None]
    assert stored == [(ids[0], k[0]), (ids[1], k[1])]
    assert m.prefix.register_many([ids[3]], [k[1]]) == 0   # key taken
    assert m.prefix.register_many([], []) == 0
    assert m.prefix.stats().registered_blocks == 2
    m.prefix.check_invariants()


def test_extend_chain_keys_follow_the_tokens():
    m = BlockManager(16, 4)
    idx = m.prefix
    tokens = np.arange(12, dtype=np.int64)
    blocks = m.pool.allocate(3)
    keys: list[bytes] = []
    idx.extend_chain(keys, "s", tokens[:8].tobytes(), blocks[:2])
    idx.extend_chains([keys], ["s"], tokens[8:].tobytes(), blocks[2:])
    assert keys == idx.block_keys(tokens, salt="s")
    assert [idx.key_of(b) for b in blocks] == keys
    other: list[bytes] = []                     # a second chain from the root, in the same call
    more = m.pool.allocate(2)
    idx.extend_chains([other, []], [None, "s"], np.r_[tokens[4:8], tokens[:4]].tobytes(), more)
    assert other == idx.block_keys(tokens[4:8]) and idx.key_of(more[1]) is None   # key of block 0 is taken
    idx.check_invariants()


def test_null_index_metadata_and_chains():
    m = BlockManager(8, 4, enable_prefix_caching=False)
    keys: list[bytes] = []
    m.prefix.extend_chain(keys, None, np.arange(4).tobytes(), [0])
    m.prefix.extend_chains([keys], [None], np.arange(4).tobytes(), [0])
    assert keys == [] and m.prefix.register_many([0], [b"k" * 16]) == 0
    assert m.prefix.metadata_bytes() > 0


# ------------------------------------------------------------- salts by value
def _state(m: BlockManager):
    seqs = {s: (m.block_table(s), m.num_tokens(s), m.token_ids(s)) for s in m.seq_ids}
    return (seqs, m.pool.free_blocks(), m.pool.evictable_blocks(), m.pool.stats, m.prefix.stats(),
            [m.prefix.key_of(b) for b in range(m.pool.num_blocks)])


class _Tenant(IntEnum):
    A = 1


DISTINCT_SALTS = [
    "1", b"1", 1, (1,), ("1",), (b"1",), ((1,),), (1, 1), ((1, 1),), ((1,), 1), (1, (1,)),
    "", b"", 0, (), ((),), ("",), (b"",), (0,),
    -1, 255, 256, -128, -129, 2**64, -2**64, 2**64 - 1,
    "a", "ab", ("a", "b"), ("ab",), ("a", ("b",)), (("a",), "b"), ("a", "b", ""),
    "é", "e\u0301", "\x00", b"\x00", "None", "1.0", "(1,)", "b'1'",
    b"s\x00\x00\x00\x00\x00\x00\x00\x011",    # the bytes of the encoding of "1"
]


def test_distinct_salts_give_distinct_keys():
    roots = [root_key(s) for s in DISTINCT_SALTS]
    assert len(set(roots)) == len(roots)
    assert root_key(None) not in roots
    idx = BlockManager(8, 4).prefix
    firsts = [idx.block_keys([1, 2, 3, 4], salt=s)[0] for s in DISTINCT_SALTS + [None]]
    assert len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("a, b", [
    (1, np.int64(1)), (1, np.uint8(1)), (1, _Tenant.A), (-5, np.int32(-5)), (2**64, 2**64),
    ("tenant", "ten" + "ant"), ("x", np.str_("x")), (b"x", bytes([120])),
    ((1, "a", b"b"), (np.int64(1), "a", b"b")), ((("n",),), (("n",),)),
], ids=repr)
def test_equal_salts_share_keys(a, b):
    assert root_key(a) == root_key(b) and encode_salt(a) == encode_salt(b)
    m = BlockManager(16, 4)
    m.add_sequence("A", SYS + [9], salt=a)
    r = m.add_sequence("B", SYS + [9], salt=b)
    assert r.num_cached_tokens == 8             # equal salts share the cached prefix
    ok(m)


def test_salt_keys_are_fixed_digests():
    # the same in every process, under every PYTHONHASHSEED: the encoding, not repr or hash()
    assert root_key(None) == bytes(16)
    assert encode_salt("tenant-a") == b"s" + (8).to_bytes(8, "big") + b"tenant-a"
    assert encode_salt((1, b"x")) == b"t" + (2).to_bytes(8, "big") + b"i" + (1).to_bytes(8, "big") + b"\x01" \
        + b"b" + (1).to_bytes(8, "big") + b"x"
    assert encode_salt(-129) == b"i" + (2).to_bytes(8, "big") + b"\xff\x7f"
    assert root_key("tenant-a").hex() == "4c902c0157cccf94e6a7434b226d67e4"
    assert root_key(("tenant", 7, b"\x00")).hex() == "99f3925b387236ebd0e30ce5e036c7ff"
    assert BlockManager(8, 4).prefix.block_keys([1, 2, 3, 4], salt="tenant-a")[0].hex() == \
        "3ad9e10f4c2ab53370a5031a3cb07a58"
    code = ("from kvforge.core.keys import root_key; "
            "print(root_key('tenant-a').hex(), root_key(('tenant', 7, b'\\x00')).hex())")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
        assert out == ["4c902c0157cccf94e6a7434b226d67e4", "99f3925b387236ebd0e30ce5e036c7ff"]


BAD_SALTS = [
    (1.5, "float"), (1.0, "float"), (np.float64(2.0), "float64"), (True, "bool"), (np.True_, "bool"),
    ([1], "list"), ({"a": 1}, "dict"), ({1}, "set"), (frozenset({1}), "frozenset"), (object(), "object"),
    (bytearray(b"x"), "bytearray"), ((1, None), "NoneType"), (("a", 1.5), "float"), ((("a",), [1]), "list"),
    ((True,), "bool"), ("\ud800", "surrogate"),
]


@pytest.mark.parametrize("salt, needle", BAD_SALTS, ids=[repr(s) for s, _ in BAD_SALTS])
@pytest.mark.parametrize("prefix", [True, False])
def test_bad_salts_are_refused_and_change_nothing(salt, needle, prefix):
    m = BlockManager(16, 4, enable_prefix_caching=prefix)
    m.add_sequence("a", SYS + [9], salt="t")
    m.add_sequence("gone", [5, 5, 5, 5, 5])
    m.free_sequence("gone")
    before = _state(m)
    calls = [lambda: m.add_sequence("b", SYS + [9], salt=salt),
             lambda: m.add_sequence("c", salt=salt),                       # no prompt: the salt is still checked
             lambda: m.add_sequence("d", SYS, salt=salt, num_tokens=2),
             lambda: m.num_blocks_needed(9, SYS + [9], salt=salt),
             lambda: m.can_add_sequence(9, SYS + [9], salt),
             lambda: m.prefix.block_keys(SYS, salt=salt),
             lambda: m.prefix.next_key(None, SYS[:4], salt=salt)]
    for call in calls:
        with pytest.raises(SequenceError) as exc:
            call()
        assert type(exc.value) is SequenceError and needle in str(exc.value), str(exc.value)
        assert _state(m) == before
        ok(m)
    assert "b" not in m and "c" not in m and "d" not in m


def test_too_deep_salts_are_refused():
    salt: object = "x"
    for _ in range(MAX_SALT_DEPTH):
        salt = (salt,)
    root_key(salt)                              # 32 levels: fine
    with pytest.raises(SequenceError, match="deeper than 32"):
        root_key((salt,))


def test_salt_of_a_fork_and_of_decode_filled_blocks():
    m = BlockManager(16, 4)
    m.add_sequence("a", [1, 2, 3], salt=("t", 1))
    m.fork("a", "b")
    m.append_tokens_batch(["a", "b"], 1, [4, 4])              # both fill block 0 (b copies it first)
    assert m.prefix.key_of(m.block_table("a")[0]) == m.prefix.block_keys([1, 2, 3, 4], salt=("t", 1))[0]
    r = m.add_sequence("c", [1, 2, 3, 4, 5], salt=("t", np.int64(1)))   # equal to ("t", 1)
    assert r.num_cached_tokens == 4
    ok(m)
