"""BlockManager: sequence block tables, slots, batched views, fork and copy-on-write.

Tiny pools (block size 4 unless the test says otherwise) and exact ids, slots
and reference counts; invariants are checked after every step.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvforge.core import BlockUsage, StepView, blocks_for_tokens
from kvforge.core.manager import AddSequenceResult, BlockManager, SequenceBlockTable
from kvforge.core.slots import UNKNOWN, SlotTokens
from kvforge.errors import KVForgeError, OutOfBlocksError, SequenceError


def ok(m: BlockManager) -> BlockManager:
    m.check_invariants()
    return m


def refs(m: BlockManager, ids) -> list[int]:
    return [m.pool.ref_count(b) for b in ids]


def state(m: BlockManager):
    """Everything a failed call must leave alone."""
    pool = m.pool
    s = pool.stats.to_dict()
    s.pop("failed_allocations")
    seqs = {sid: (m.block_table(sid), m.num_tokens(sid), m.num_pending_tokens(sid), m.token_ids(sid))
            for sid in m.seq_ids}
    return (m.seq_ids, seqs, s, pool.free_blocks(), pool.evictable_blocks(),
            [pool.ref_count(b) for b in range(pool.num_blocks)], m.prefix.num_cached_blocks,
            list(m.pending_copies), m.num_cow_copies)


def eq(a, b) -> None:
    np.testing.assert_array_equal(a, np.asarray(b))


# -------------------------------------------------------- ROCmForge's behaviours
def test_allocate_sequence():
    m = BlockManager(8, 4, enable_prefix_caching=False)
    r = m.add_sequence("s", num_tokens=10)
    assert isinstance(r, AddSequenceResult)
    assert (r.seq_id, r.num_cached_tokens, r.block_ids) == ("s", 0, [0, 1, 2])
    assert r.slots.dtype == np.int64
    eq(r.slots, np.arange(10))
    assert (m.num_tokens("s"), m.seq_len("s"), m.block_table("s")) == (10, 10, [0, 1, 2])
    assert m.pool.num_allocated_blocks == 3
    r = m.add_sequence("p", [5, 5, 5, 5, 5, 5])
    assert r.block_ids == [3, 4]
    eq(r.slots, np.arange(12, 18))
    assert m.token_ids("p") == [5] * 6
    assert len(m) == 2 and "p" in m and "q" not in m
    ok(m)


def test_append_initial_allocation():
    m = BlockManager(8, 4)
    r = m.add_sequence("s")
    assert r.block_ids == [] and len(r.slots) == 0
    assert m.pool.num_allocated_blocks == 0 and m.block_table("s") == []
    ok(m)
    assert m.append_token("s") == 0
    assert m.block_table("s") == [0] and m.num_tokens("s") == 1
    assert m.pool.num_allocated_blocks == 1
    ok(m)


def test_append_across_several_blocks():
    m = BlockManager(8, 4)
    m.add_sequence("s")
    slots = m.append_tokens("s", 9)            # 9 tokens with block size 4 take 3 blocks
    eq(slots, np.arange(9))
    assert m.block_table("s") == [0, 1, 2]
    assert m.pool.num_allocated_blocks == 3
    ok(m)
    assert [m.append_token("s") for _ in range(3)] == [9, 10, 11]   # still block 2
    assert m.pool.num_allocated_blocks == 3
    assert m.append_token("s") == 12           # 13th token opens block 3
    assert m.block_table("s") == [0, 1, 2, 3]
    assert len(m.append_tokens("s", 0)) == 0
    ok(m)


def test_append_token_slots_interleaved():
    m = BlockManager(8, 4)
    m.add_sequence("a"), m.add_sequence("b")
    got = []
    for _ in range(5):
        got.append(m.append_token("a"))
        got.append(m.append_token("b"))
        ok(m)
    # a: block 0 then 2; b: block 1 then 3
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12]
    assert (m.block_table("a"), m.block_table("b")) == ([0, 2], [1, 3])
    assert m.slot_of("a", 4) == 8 and m.slot_of("b", 3) == 7


@pytest.mark.parametrize("bs, last", [(4, (18, 1)), (8, (9, 5)), (32, (3, 5))])
def test_get_block_for_position(bs, last):
    m = BlockManager(64, bs)
    m.add_sequence("x", num_tokens=3)          # takes block 0
    m.add_sequence("s", num_tokens=70)
    table = m.block_table("s")
    assert table == list(range(1, 1 + blocks_for_tokens(70, bs)))
    for pos in range(70):
        assert m.get_block_for_position("s", pos) == (table[pos // bs], pos % bs)
        assert m.slot_of("s", pos) == table[pos // bs] * bs + pos % bs
    assert m.get_block_for_position("s", 0) == (1, 0)
    assert m.get_block_for_position("s", 69) == last
    assert m.get_block_for_position("x", 2) == (0, 2)
    for bad in (70, 71, -1, True, 1.5, "0", None):
        with pytest.raises(SequenceError, match="outside sequence 's' of 70 tokens"):
            m.get_block_for_position("s", bad)
    with pytest.raises(SequenceError, match="position 3 is outside sequence 'x'"):
        m.get_block_for_position("x", 3)
    with pytest.raises(SequenceError, match="unknown sequence 'nope'"):
        m.get_block_for_position("nope", 0)
    if bs == 32:
        assert m.get_block_for_position("s", 31) == (1, 31)
        assert m.get_block_for_position("s", 32) == (2, 0)


def test_several_sequences_and_block_reuse():
    m = BlockManager(8, 4, enable_prefix_caching=False)
    assert m.add_sequence("a", num_tokens=5).block_ids == [0, 1]
    assert m.add_sequence("b", num_tokens=6).block_ids == [2, 3]
    assert m.add_sequence("c", num_tokens=1).block_ids == [4]
    assert m.seq_ids == ["a", "b", "c"]
    ok(m)
    m.free_sequence("b")                       # freed tail first: the head block is on top
    assert m.pool.free_blocks()[:2] == [2, 3]
    assert refs(m, [0, 1, 2, 3, 4]) == [1, 1, 0, 0, 1]
    assert m.seq_ids == ["a", "c"]
    ok(m)
    assert m.add_sequence("d", num_tokens=8).block_ids == [2, 3]
    assert m.append_tokens("a", 4).tolist() == [5, 6, 7, 20]   # block 1 then new block 5
    assert m.block_table("a") == [0, 1, 5]
    eq(m.block_table_array(["a", "c", "d"]), [[0, 1, 5], [4, -1, -1], [2, 3, -1]])
    ok(m)
    for sid in ("a", "c", "d"):
        m.free_sequence(sid)
    assert len(m) == 0 and m.pool.num_free_blocks == 8
    ok(m)


def test_reused_row_has_no_stale_ids():
    m = BlockManager(8, 4)
    m.add_sequence("long", num_tokens=12)
    m.free_sequence("long")
    m.add_sequence("short", num_tokens=1)
    t = m.block_table_array(["short"], width=4)
    assert t.dtype == np.int32
    eq(t, [[0, -1, -1, -1]])
    ok(m)


# ------------------------------------------------------------- batched views
def test_append_tokens_batch_and_views_exact():
    m = BlockManager(16, 4, enable_prefix_caching=False)
    m.add_sequence("a", num_tokens=3)          # [0]
    m.add_sequence("b", num_tokens=4)          # [1]
    m.add_sequence("c")                        # []
    s = m.append_tokens_batch(["a", "b", "c"])
    assert s.dtype == np.int64
    eq(s, [3, 8, 12])                          # b opens block 2, c opens block 3 (row order)
    ok(m)
    s = m.append_tokens_batch(["a", "b", "c"], [2, 0, 5])
    eq(s, [16, 17, 13, 14, 15, 20, 21])        # a opens 4; c fills 3 then opens 5
    s = m.append_tokens_batch(["b"], np.array([4]))
    eq(s, [9, 10, 11, 24])                     # b fills 2 then opens 6
    ok(m)
    assert [m.block_table(x) for x in "abc"] == [[0, 4], [1, 2, 6], [3, 5]]
    t = m.block_table_array(["a", "b", "c"])
    assert t.dtype == np.int32 and t.shape == (3, 3)
    eq(t, [[0, 4, -1], [1, 2, 6], [3, 5, -1]])
    eq(m.block_table_array(["c", "a"]), [[3, 5], [0, 4]])
    eq(m.block_table_array(["c"], width=5), [[3, 5, -1, -1, -1]])
    assert m.block_table_array([]).shape[0] == 0
    cl = m.context_lens(["a", "b", "c"])
    assert cl.dtype == np.int32
    eq(cl, [6, 9, 6])
    eq(m.slot_mapping(["a", "b", "c"]), [17, 24, 21])
    eq(m.slot_mapping(["a", "b", "c"], [2, 1, 0]), [16, 17, 24])
    eq(m.slot_mapping(["b"], 9), [4, 5, 6, 7, 8, 9, 10, 11, 24])
    with pytest.raises(SequenceError):
        m.slot_mapping(["a"], 7)
    with pytest.raises(SequenceError):
        m.slot_mapping(["a", "b"], [1])
    ok(m)


def test_batch_equals_per_call_path():
    rng = np.random.default_rng(0)
    batched = BlockManager(64, 4, enable_prefix_caching=False)
    per_call = BlockManager(64, 4, enable_prefix_caching=False)
    ids = list(range(6))
    for i, n in zip(ids, rng.integers(0, 9, size=len(ids)).tolist()):
        assert batched.add_sequence(i, num_tokens=n).block_ids == per_call.add_sequence(i, num_tokens=n).block_ids
    for _ in range(10):
        n = rng.integers(0, 4, size=len(ids))
        a = batched.append_tokens_batch(ids, n)
        b = np.concatenate([per_call.append_tokens(i, int(k)) for i, k in zip(ids, n)])
        eq(a, b)                               # same slots, blocks handed out in the same order
        eq(batched.block_table_array(ids), per_call.block_table_array(ids))
        eq(batched.context_lens(ids), per_call.context_lens(ids))
        ok(batched), ok(per_call)


def test_batch_with_token_ids():
    m = BlockManager(16, 4, enable_prefix_caching=False)
    m.add_sequence("a", [1, 2, 3])
    m.add_sequence("b", [4])
    eq(m.append_tokens_batch(["a", "b"], 1, token_ids=np.array([7, 8])), [3, 5])
    assert (m.token_ids("a"), m.token_ids("b")) == ([1, 2, 3, 7], [4, 8])
    with pytest.raises(SequenceError):
        m.append_tokens_batch(["a", "b"], 2, token_ids=[1, 2])
    with pytest.raises(SequenceError):
        m.append_tokens_batch(["a", "b"], 1, token_ids=[1])
    ok(m)


# ----------------------------------------------------------- all or nothing
def full_manager() -> BlockManager:
    m = BlockManager(4, 4, enable_prefix_caching=False)
    m.add_sequence("a", num_tokens=4)          # [0]
    m.add_sequence("b", num_tokens=4)          # [1]
    m.add_sequence("c", num_tokens=3)          # [2]; block 3 free
    return ok(m)


def test_batch_exhaustion_changes_nothing():
    m = full_manager()
    before = state(m)
    with pytest.raises(OutOfBlocksError) as exc:
        m.append_tokens_batch(["a", "b", "c"])  # a and b each need a block, 1 is free
    assert (exc.value.requested, exc.value.available) == (2, 1)
    assert state(ok(m)) == before
    eq(m.append_tokens_batch(["c", "a"]), [11, 12])
    assert m.pool.num_free_blocks == 0
    ok(m)


def test_append_and_add_exhaustion_change_nothing():
    m = full_manager()
    before = state(m)
    with pytest.raises(OutOfBlocksError) as exc:
        m.append_tokens("a", 5)                 # needs 2 blocks
    assert (exc.value.requested, exc.value.available) == (2, 1)
    assert "'a'" in str(exc.value)
    with pytest.raises(OutOfBlocksError):
        m.add_sequence("d", num_tokens=5)
    with pytest.raises(OutOfBlocksError):
        m.add_sequence("d", list(range(8)))
    assert "d" not in m
    assert state(ok(m)) == before
    assert not m.can_add_sequence(5) and m.can_add_sequence(4)
    assert m.num_blocks_needed(5) == 2
    assert m.append_tokens("c", 1).tolist() == [11]
    assert m.append_tokens("a", 4).tolist() == [12, 13, 14, 15]
    ok(m)


# --------------------------------------------------------------- bad ids
def test_sequence_errors():
    m = BlockManager(8, 4)
    m.add_sequence("a", num_tokens=2)
    m.add_sequence("b", num_tokens=1)
    before = state(m)
    calls = [
        lambda: m.add_sequence("a"),
        lambda: m.add_sequence(["unhashable"]),
        lambda: m.append_tokens("zz", 1),
        lambda: m.append_token("zz"),
        lambda: m.append_tokens("a", -1),
        lambda: m.append_tokens("a", 1.5),
        lambda: m.append_tokens("a", 2, token_ids=[1]),
        lambda: m.free_sequence("zz"),
        lambda: m.block_table("zz"),
        lambda: m.num_tokens("zz"),
        lambda: m.fork("zz", "c"),
        lambda: m.fork("a", "b"),
        lambda: m.block_table_array(["a", "zz"]),
        lambda: m.context_lens(["zz"]),
        lambda: m.slot_mapping(["zz"]),
        lambda: m.append_tokens_batch(["a", "zz", "b"]),
        lambda: m.append_tokens_batch(["a", "b", "a"]),
        lambda: m.append_tokens_batch(["a", "b"], [1, -1]),
        lambda: m.append_tokens_batch(["a", "b"], [1, 1, 1]),
        lambda: m.add_sequence("c", [1, 2], num_tokens=3),
        lambda: m.add_sequence("c", num_tokens=-1),
    ]
    for call in calls:
        with pytest.raises(SequenceError) as exc:
            call()
        assert isinstance(exc.value, KVForgeError)
        assert state(m) == before
    with pytest.raises(SequenceError) as exc:
        m.append_tokens("missing", 1)
    assert str(exc.value) == "unknown sequence 'missing'"   # readable, not KeyError-quoted
    with pytest.raises(SequenceError, match="'a' already exists"):
        m.add_sequence("a")
    ok(m)


# ------------------------------------------------------- fork and copy-on-write
def test_fork_shares_blocks_and_child_write_copies_once():
    m = BlockManager(16, 4)
    m.add_sequence("p", num_tokens=6)          # [0, 1], block 1 half full
    m.fork("p", "c")
    assert m.block_table("c") == [0, 1] and m.num_tokens("c") == 6
    assert refs(m, [0, 1]) == [2, 2]
    assert m.pool.num_allocated_blocks == 2
    ok(m)
    assert m.append_token("c") == 2 * 4 + 2    # copy of block 1 into block 2
    assert m.pending_copies == [(1, 2)]
    assert (m.block_table("p"), m.block_table("c")) == ([0, 1], [0, 2])
    assert refs(m, [0, 1, 2]) == [2, 1, 1]
    ok(m)
    assert m.append_token("p") == 1 * 4 + 2    # the parent keeps block 1, no second copy
    assert m.append_token("c") == 2 * 4 + 3
    assert m.pending_copies == [(1, 2)] and m.num_cow_copies == 1
    assert m.take_pending_copies() == [(1, 2)]
    assert m.pending_copies == [] and m.take_pending_copies() == []
    ok(m)


def test_fork_parent_write_copies_once():
    m = BlockManager(16, 4)
    m.add_sequence("p", num_tokens=6)
    m.fork("p", "c")
    assert m.append_token("p") == 2 * 4 + 2
    assert m.append_token("c") == 1 * 4 + 2
    assert m.pending_copies == [(1, 2)]
    assert (m.block_table("p"), m.block_table("c")) == ([0, 2], [0, 1])
    ok(m)


def test_fork_batched_append_copies_once():
    m = BlockManager(16, 4)
    m.add_sequence("p", num_tokens=6)
    m.fork("p", "c")
    eq(m.append_tokens_batch(["p", "c"]), [10, 6])   # p copies (first in the batch), c keeps block 1
    assert m.pending_copies == [(1, 2)]
    assert refs(m, [0, 1, 2]) == [2, 1, 1]
    eq(m.append_tokens_batch(["p", "c"]), [11, 7])
    assert m.pending_copies == [(1, 2)]
    ok(m)


def test_full_shared_blocks_are_never_copied():
    m = BlockManager(16, 4)
    m.add_sequence("p", num_tokens=8)          # [0, 1], both full
    m.fork("p", "c")
    assert m.append_token("c") == 8            # opens block 2
    assert m.append_token("p") == 12           # opens block 3
    eq(m.append_tokens_batch(["p", "c"], 4), [13, 14, 15, 16, 9, 10, 11, 20])
    assert m.pending_copies == [] and m.num_cow_copies == 0
    assert refs(m, [0, 1, 2, 3, 4, 5]) == [2, 2, 1, 1, 1, 1]
    ok(m)


def test_three_way_share_with_idle_rows_in_a_batch():
    # rows that gain no token in a batch must keep their copy-on-write duty
    m = BlockManager(16, 4, enable_prefix_caching=False)
    m.add_sequence("A", num_tokens=2)          # [0]
    for child in "BCD":
        m.fork("A", child)
    assert refs(m, [0]) == [4]
    eq(m.append_tokens_batch(["A", "B", "C"], [1, 0, 0]), [6])
    assert m.pending_copies == [(0, 1)]
    assert m.append_token("B") == 10
    assert m.append_token("C") == 14
    assert m.append_token("D") == 2            # the last holder writes in place
    assert m.pending_copies == [(0, 1), (0, 2), (0, 3)]
    assert refs(m, [0, 1, 2, 3]) == [1, 1, 1, 1]
    ok(m)


def test_copy_on_write_counts_toward_exhaustion():
    m = BlockManager(2, 4)
    m.add_sequence("p", num_tokens=2)
    m.fork("p", "c")
    m.add_sequence("x", num_tokens=1)          # the last block
    before = state(m)
    with pytest.raises(OutOfBlocksError):
        m.append_token("c")
    with pytest.raises(OutOfBlocksError):
        m.append_tokens_batch(["p", "c"])
    assert state(ok(m)) == before
    m.free_sequence("x")
    assert m.append_token("c") == 1 * 4 + 2
    assert m.pending_copies == [(0, 1)]
    ok(m)


def test_fork_then_free():
    m = BlockManager(8, 4)
    m.add_sequence("p", num_tokens=5)
    m.fork("p", "c")
    m.free_sequence("p")
    assert refs(m, [0, 1]) == [1, 1] and m.block_table("c") == [0, 1]
    assert m.append_token("c") == 5            # the sole holder writes in place
    assert m.pending_copies == []
    m.fork("c", "g")
    m.free_sequence("c")
    m.free_sequence("g")
    assert m.pool.num_allocated_blocks == 0
    ok(m)


def test_fork_of_an_empty_sequence():
    m = BlockManager(8, 4)
    m.add_sequence("p")
    m.fork("p", "c")
    assert m.append_token("c") == 0 and m.append_token("p") == 4
    assert m.pending_copies == []
    ok(m)


# --------------------------------------------------------------- chunked prompt
def test_chunked_prompt():
    prompt = list(range(100, 110))             # 10 tokens
    m = BlockManager(16, 4)
    r = m.add_sequence("s", prompt, num_tokens=4)
    assert (r.num_cached_tokens, r.block_ids) == (0, [0])
    eq(r.slots, [0, 1, 2, 3])
    assert (m.num_tokens("s"), m.num_pending_tokens("s")) == (4, 6)
    assert m.prefix.key_of(0) is not None      # the full first chunk is registered
    ok(m)
    before = state(m)
    with pytest.raises(SequenceError, match="6 prompt tokens pending"):
        m.append_tokens("s", 1, token_ids=[5])
    assert state(m) == before
    eq(m.append_tokens("s", 4), [4, 5, 6, 7])
    assert (m.num_tokens("s"), m.num_pending_tokens("s"), m.block_table("s")) == (8, 2, [0, 1])
    assert m.prefix.key_of(1) is not None
    eq(m.append_tokens_batch(["s"], [2]), [8, 9])
    assert m.num_pending_tokens("s") == 0 and m.token_ids("s") == prompt
    eq(m.append_tokens("s", 2, token_ids=[7, 8]), [10, 11])
    assert m.token_ids("s") == prompt + [7, 8]
    assert m.prefix.key_of(2) is not None      # [108, 109, 7, 8] filled and registered
    ok(m)
    r = m.add_sequence("t", prompt + [7, 8, 9])
    assert r.num_cached_tokens == 12 and r.block_ids == [0, 1, 2, 3]
    eq(r.slots, [12])
    ok(m)


def test_chunked_prompt_zero_first_chunk_and_overrun():
    m = BlockManager(16, 4)
    r = m.add_sequence("s", [1, 2, 3, 4, 5], num_tokens=0)
    assert r.block_ids == [] and m.num_pending_tokens("s") == 5
    eq(m.append_tokens("s", 7), np.arange(7))  # 5 pending + 2 without ids
    assert m.num_pending_tokens("s") == 0
    assert m.token_ids("s") is None            # ids past the prompt are unknown now
    m.append_tokens("s", 1)                    # fills block 1, which holds tokens without ids:
    assert m.prefix.key_of(1) is None          # it must never be registered
    assert m.add_sequence("t", [1, 2, 3, 4, 5, 0, 0, 0, 9]).num_cached_tokens <= 4
    ok(m)


# ------------------------------------------------------------------- metrics
def test_internal_fragmentation_and_live_tokens():
    m = BlockManager(8, 4)
    assert m.internal_fragmentation() == 0.0 and m.num_live_tokens() == 0
    m.add_sequence("a", num_tokens=5)          # 5 of 8 slots used
    assert m.internal_fragmentation() == 3 / 8
    m.fork("a", "b")                           # shared blocks count once
    assert m.internal_fragmentation() == 3 / 8
    assert m.num_live_tokens() == 10
    assert m.live_token_slots() == 5
    m.append_token("b")                        # b copies block 1: 4 + 1 + 2 used of 12
    assert m.internal_fragmentation() == 1 - 7 / 12
    ok(m)


def test_relocate_rewrites_tables():
    m = BlockManager(8, 4)
    m.add_sequence("a", num_tokens=4)          # [0]
    m.add_sequence("b", num_tokens=4)          # [1]
    m.add_sequence("c", list(range(9)))        # [2, 3, 4]: 2 and 3 registered
    key2 = m.prefix.key_of(2)
    m.free_sequence("b")
    m.relocate([(2, 1), (4, 5)])
    assert m.block_table("c") == [1, 3, 5]
    assert m.prefix.key_of(1) == key2 and m.prefix.key_of(2) is None
    assert m.held_blocks() == [0, 1, 3, 5]
    assert m.get_block_for_position("c", 8) == (5, 0)
    ok(m)
    m.relocate([])
    ok(m)


def test_sequence_block_table_tuple():
    t = SequenceBlockTable("s", [1, 2], 7)
    assert (t.seq_id, t.block_ids, t.num_tokens) == ("s", [1, 2], 7)
    assert blocks_for_tokens(0, 4) == 0 and blocks_for_tokens(9, 4) == 3
    assert blocks_for_tokens(2**62 + 1, 4) == 2**60 + 1   # exact, no float rounding


def test_sequence_table_reads_ids_and_count_together():
    m = BlockManager(8, 4)
    m.add_sequence("a", num_tokens=4)          # [0]
    m.add_sequence("s", num_tokens=7)          # [1, 2]
    t = m.sequence_table("s")
    assert isinstance(t, SequenceBlockTable)
    assert t == SequenceBlockTable("s", [1, 2], 7)
    assert len(t.block_ids) == blocks_for_tokens(t.num_tokens, m.block_size)
    m.append_tokens("s", 2)
    assert m.sequence_table("s") == ("s", [1, 2, 3], 9)
    with pytest.raises(SequenceError, match="unknown sequence 'x'"):
        m.sequence_table("x")


def test_bad_block_size():
    with pytest.raises(SequenceError):
        BlockManager(8, 0)


def test_batch_views_follow_freed_and_reused_ids():
    # the manager remembers the last batch's rows; a freed id that comes back must not reuse them
    m = BlockManager(16, 4, enable_prefix_caching=False)
    m.add_sequence("a", num_tokens=4)          # [0]
    m.add_sequence("b", num_tokens=8)          # [1, 2]
    eq(m.block_table_array(["a", "b"]), [[0, -1], [1, 2]])
    eq(m.append_tokens_batch(["a", "b"]), [12, 16])     # a opens 3, b opens 4
    m.free_sequence("a")
    m.add_sequence("x", num_tokens=1)          # takes a's old row
    m.add_sequence("a", num_tokens=2)
    assert m.block_table("a") == [3]
    eq(m.block_table_array(["a", "b"]), [[3, -1, -1], [1, 2, 4]])
    eq(m.context_lens(["a", "b"]), [2, 9])
    eq(m.append_tokens_batch(["a", "b"]), [14, 17])
    eq(m.slot_mapping(["a", "b"]), [14, 17])
    with pytest.raises(SequenceError):
        m.append_tokens_batch(["a", "a"])
    eq(m.block_table_array(["a", "a"]), [[3], [3]])   # views allow repeats; appends never do
    with pytest.raises(SequenceError):
        m.append_tokens_batch(["a", "a"])
    ok(m)


# ----------------------------------------------------------------- step_view
def test_step_view_exact():
    m = BlockManager(16, 4, enable_prefix_caching=False)
    m.add_sequence("a", [10, 11, 12, 13, 14, 15])   # [0, 1], 6 tokens
    m.add_sequence("b", num_tokens=3)                # [2], ids unknown
    m.add_sequence("c", [20, 21, 22, 23, 24, 25, 26, 27, 28])  # [3, 4, 5], 9 tokens
    v = m.step_view(["a", "c"], [2, 1])
    assert isinstance(v, StepView)
    eq(v.positions, [4, 5, 8])
    assert v.positions.dtype == np.int64
    eq(v.slot_mapping, [1 * 4 + 0, 1 * 4 + 1, 5 * 4 + 0])
    assert v.slot_mapping.dtype == np.int64
    eq(v.context_lens, [6, 9])
    assert v.context_lens.dtype == np.int32
    eq(v.block_tables, [[0, 1, -1], [3, 4, 5]])
    assert v.block_tables.dtype == np.int32
    eq(v.query_start_loc, [0, 2, 3])
    assert v.query_start_loc.dtype == np.int32
    eq(v.input_ids, [14, 15, 28])
    assert v.input_ids.dtype == np.int64
    # decode step: one token each, tables padded to a multiple of 4
    v = m.step_view(["c", "a", "b"], 1, width_multiple=4)
    eq(v.positions, [8, 5, 2])
    eq(v.slot_mapping, [20, 5, 10])
    eq(v.context_lens, [9, 6, 3])
    eq(v.block_tables, [[3, 4, 5, -1], [0, 1, -1, -1], [2, -1, -1, -1]])
    eq(v.query_start_loc, [0, 1, 2, 3])
    assert v.input_ids is None                 # b's ids are unknown
    eq(m.step_view(["c", "a", "b"], [1, 1, 0]).input_ids, [28, 15])   # b computes nothing: known
    # wider than the table matrix: padded, the matrix does not grow
    v = m.step_view(["a"], 0, width_multiple=64)
    assert v.block_tables.shape == (1, 64) and v.block_tables[0, :3].tolist() == [0, 1, -1]
    assert (len(v.positions), len(v.slot_mapping), len(v.input_ids)) == (0, 0, 0)
    eq(v.query_start_loc, [0, 0])
    v = m.step_view([], 1, width_multiple=8)
    assert v.block_tables.shape == (0, 8) and v.query_start_loc.tolist() == [0]
    ok(m)


def test_step_view_follows_appends_and_copy_on_write():
    m = BlockManager(16, 4)
    m.add_sequence("p", [1, 2, 3, 4, 5, 6])        # [0, 1]
    m.fork("p", "c")
    slots = m.append_tokens_batch(["p", "c"], 1, token_ids=[7, 9])
    eq(slots, [2 * 4 + 2, 1 * 4 + 2])              # p copies block 1 into block 2
    v = m.step_view(["p", "c"], 1)
    eq(v.slot_mapping, slots)
    eq(v.input_ids, [7, 9])
    eq(v.block_tables, [[0, 2], [0, 1]])
    assert m.token_ids("p") == [1, 2, 3, 4, 5, 6, 7] and m.token_ids("c") == [1, 2, 3, 4, 5, 6, 9]
    v = m.step_view(["c", "p"], 7)                 # the whole sequences: prefill layout
    eq(v.input_ids, [1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4, 5, 6, 7])
    eq(v.positions, list(range(7)) * 2)
    eq(v.query_start_loc, [0, 7, 14])
    ok(m)


def test_step_view_bad_input_changes_nothing():
    m = BlockManager(8, 4)
    m.add_sequence("a", [1, 2, 3])
    m.add_sequence("e")                            # no tokens
    before = state(m)
    for bad, match in [(((["a", "e"], 1), {}), "sequence 'e' has only 0 tokens"),
                       (((["a"], 4), {}), "num_new_tokens=4: sequence 'a' has only 3 tokens"),
                       (((["a"], -1), {}), "num_new_tokens must be >= 0"),
                       (((["a"], [1, 1]), {}), "one per sequence"),
                       (((["a"], [True]), {}), r"num_new_tokens\[0\] must be an integer, got True \(bool\)"),
                       (((["a"], 1.0), {}), r"num_new_tokens must be an integer, got 1.0 \(float\)"),
                       (((["a"], 1), {"width_multiple": 0}), "width_multiple"),
                       (((["a"], 1), {"width_multiple": True}), "width_multiple"),
                       (((["zz"], 1), {}), "unknown sequence 'zz'"),
                       (((["a", ["x"]], 1), {}), "not hashable")]:
        (args, kwargs) = bad
        with pytest.raises(SequenceError, match=match):
            m.step_view(*args, **kwargs)
        assert state(m) == before
    ok(m)


@pytest.mark.parametrize("prefix", [False, True])
def test_step_view_agrees_with_the_other_views_on_random_batches(prefix):
    rng = np.random.default_rng(3)
    m = BlockManager(256, 4, enable_prefix_caching=prefix)
    for i in range(24):
        if i % 5 == 4:
            m.add_sequence(i, num_tokens=int(rng.integers(0, 9)))
        else:
            m.add_sequence(i, rng.integers(0, 3, size=int(rng.integers(1, 12))).tolist())
    for step in range(40):
        ids = rng.permutation(m.seq_ids)[: int(rng.integers(0, 12))].tolist()
        if step % 3 == 0 and ids:
            m.append_tokens_batch(ids, 1, token_ids=rng.integers(0, 3, size=len(ids)))
        elif step % 3 == 1 and ids:
            m.fork(ids[0], 100 + step)
        lens = m.context_lens(ids)
        q = [int(rng.integers(0, n + 1)) for n in lens.tolist()]
        wm = int(rng.integers(1, 5))
        v = m.step_view(ids, q, width_multiple=wm)
        eq(v.context_lens, lens)
        eq(v.slot_mapping, m.slot_mapping(ids, q))
        eq(v.query_start_loc, np.concatenate([[0], np.cumsum(q)]).astype(np.int32))
        eq(v.positions, np.concatenate([np.arange(n - k, n) for n, k in zip(lens.tolist(), q)] + [[]]))
        tables = m.block_table_array(ids)
        w = max(1, tables.shape[1] if ids else 0)
        assert v.block_tables.shape == (len(ids), -(-w // wm) * wm)
        eq(v.block_tables[:, : tables.shape[1]], tables)
        assert (v.block_tables[:, tables.shape[1]:] == -1).all()
        known = [m.token_ids(s) for s, k in zip(ids, q) if k]
        if all(t is not None for t in known):
            eq(v.input_ids, [t for s, k in zip(ids, q) if k for t in m.token_ids(s)[m.num_tokens(s) - k:m.num_tokens(s)]])
        else:
            assert v.input_ids is None
        if all(k == 1 for k in q):
            eq(m.step_view(ids, 1, width_multiple=wm).slot_mapping, v.slot_mapping)
        ok(m)


def test_append_batch_with_ids_for_several_tokens_each():
    m = BlockManager(16, 4)
    m.add_sequence("a", [1, 2])
    m.add_sequence("b", [5])
    eq(m.append_tokens_batch(["a", "b"], [3, 2], token_ids=[3, 4, 9, 6, 7]), [2, 3, 8, 5, 6])
    assert (m.token_ids("a"), m.token_ids("b")) == ([1, 2, 3, 4, 9], [5, 6, 7])
    assert m.prefix.key_of(0) == m.prefix.block_keys([1, 2, 3, 4])[0]   # a's block 0 filled and registered
    before = state(m)
    with pytest.raises(SequenceError, match="one id per new token"):
        m.append_tokens_batch(["a", "b"], [1, 2], token_ids=[1, 2])
    with pytest.raises(SequenceError, match=r"token_ids\[0\] must be an integer token id, got 'x'"):
        m.append_tokens_batch(["a", "b"], 1, token_ids=["x", "y"])
    assert state(m) == before
    ok(m)


def test_usage_and_metadata_bytes():
    m = BlockManager(16, 4)
    assert m.usage() == BlockUsage(0, 0, 0, 0, 0, 4)
    assert m.usage().internal_fragmentation == 0.0
    m.add_sequence("a", num_tokens=5)          # [0, 1]
    m.fork("a", "b")                           # shares both
    m.append_token("b")                        # b copies block 1 into block 2
    u = m.usage()
    assert (u.num_sequences, u.num_live_tokens, u.num_logical_blocks) == (2, 11, 4)
    assert (u.num_distinct_blocks, u.num_used_slots, u.num_reserved_slots) == (3, 4 + 1 + 2, 12)
    assert u.internal_fragmentation == m.internal_fragmentation() == 1 - 7 / 12
    assert m.live_token_slots() == 7 and m.num_live_tokens() == 11
    small = m.metadata_bytes()
    assert small >= m.tables.metadata_bytes() + m.pool.metadata_bytes() + m.prefix.metadata_bytes()
    m.add_sequence("long", list(range(3 * 4 + 1)))
    assert m.metadata_bytes() > small
    ok(m)


def test_token_ids_follow_compaction():
    m = BlockManager(16, 4)
    m.add_sequence("x", num_tokens=8)          # [0, 1]
    m.add_sequence("a", [1, 2, 3, 4, 5, 6])    # [2, 3]
    m.free_sequence("x")
    plan = m.plan_compaction()
    assert plan.moves == [(3, 0), (2, 1)]
    m.apply_compaction(plan)
    assert m.block_table("a") == [1, 0] and m.token_ids("a") == [1, 2, 3, 4, 5, 6]
    assert m.prefix.key_of(1) == m.prefix.block_keys([1, 2, 3, 4])[0]
    eq(m.step_view(["a"], 6).input_ids, [1, 2, 3, 4, 5, 6])
    r = m.add_sequence("b", [1, 2, 3, 4, 9])   # hits the moved block
    assert (r.num_cached_tokens, r.block_ids[0]) == (4, 1)
    ok(m)


# ------------------------------------------------- slot token storage grows with use
def test_slot_tokens_grow_on_write_and_read_unwritten_slots_as_unknown():
    st = SlotTokens(4, 1000)
    assert st.num_stored_blocks == 0 and st.nbytes == 0
    eq(st.read(np.array([0, 3999], dtype=np.int64)), [UNKNOWN, UNKNOWN])
    st.write(np.array([41], dtype=np.int64), np.array([7], dtype=np.int64))   # block 10
    assert st.num_stored_blocks == 11 and st.nbytes == 11 * 4 * 8
    eq(st.read(np.array([40, 41, 44, 3999], dtype=np.int64)), [UNKNOWN, 7, UNKNOWN, UNKNOWN])
    st.write(np.array([48], dtype=np.int64), np.array([8], dtype=np.int64))   # block 12: doubles
    assert st.num_stored_blocks == 22
    st.copy_blocks([10, 900], [500, 12])    # a stored block up, an unwritten one over block 12
    assert st.num_stored_blocks == 501
    eq(st.read(np.array([2001, 48], dtype=np.int64)), [7, UNKNOWN])
    assert st.block_bytes([999]) == np.full(4, UNKNOWN, dtype=np.int64).tobytes()
    st.write(np.array([3999], dtype=np.int64), np.array([9], dtype=np.int64))
    assert st.num_stored_blocks == 1000                 # never more than the pool


def test_large_pool_manager_keeps_host_arrays_small():
    # 2**32 slots: a slot-token array sized for the pool would be 32 GiB
    m = BlockManager(2**16, 2**16)
    r = m.add_sequence("a", [1, 2, 3])
    assert r.block_ids == [0] and r.slots.tolist() == [0, 1, 2]
    assert m.append_tokens("a", 2, token_ids=[4, 5]).tolist() == [3, 4]
    m.add_sequence("b", num_tokens=2**16 + 1)              # blocks 1, 2; ids unknown
    m.fork("a", "c")
    slots = m.append_tokens_batch(["a", "c", "b"], 1, token_ids=[6, 60, 7])   # a copies block 0 to 3
    assert slots.tolist() == [3 * 2**16 + 5, 5, 2 * 2**16 + 1] and m.take_pending_copies() == [(0, 3)]
    view = m.step_view(["a", "c"], [6, 1])
    eq(view.input_ids, [1, 2, 3, 4, 5, 6, 60])
    assert view.slot_mapping.dtype == np.int64 and view.slot_mapping[0] == 3 * 2**16
    assert m.step_view(["b"], 1).input_ids is None
    assert m.token_ids("c") == [1, 2, 3, 4, 5, 60] and m.token_ids("a") == [1, 2, 3, 4, 5, 6]
    m.free_sequence("b")                                   # blocks 1, 2 free: compaction moves 3 -> 1
    plan = m.plan_compaction()
    assert plan.moves == [(3, 1)]
    m.apply_compaction(plan)
    assert m.block_table("a") == [1] and m.token_ids("a") == [1, 2, 3, 4, 5, 6]
    eq(m.step_view(["a"], 6).input_ids, [1, 2, 3, 4, 5, 6])
    ok(m)
    assert m.tables._slot_tokens.num_stored_blocks <= 4
    assert m.metadata_bytes() < 4 * 2**20
