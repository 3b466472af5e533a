"""Slots before ids (reserve_tokens_batch / commit_token_ids) and truncate, on the manager and the cache.

Exact expectations on tiny pools: which slots a reservation hands out, that a
sequence built by reserve + commit keys exactly the blocks an append with ids
keys (the same prefix-index keys, the same hits for a later prompt), that a
truncation frees whole blocks, un-keys a block it takes back below full, and
never lets a later append overwrite a block another owner reads; that every
bad call raises a kvforge error naming what was wrong and changes nothing;
that uncommitted tokens survive swaps and compaction.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvforge import CacheConfig, KVCache
from kvforge.core import BlockManager
from kvforge.errors import KVForgeError, OutOfBlocksError, SequenceError
from kvforge.storage.pending import PendingMethods
from tests.test_core_validation import same, snapshot
from tests.test_host_tier import Contents

BS = 4

if issubclass(KVCache, PendingMethods):
    Cache = KVCache
else:  # until storage/cache.py lists the mixin
    class Cache(PendingMethods, KVCache):  # type: ignore[no-redef]
        pass


def mgr(num_blocks: int = 16, **kw) -> BlockManager:
    return BlockManager(num_blocks, BS, **kw)


def state(m: BlockManager):
    """:func:`snapshot` plus the uncommitted counts and the swapped sequences."""
    unc = {s: m.num_uncommitted_tokens(s) for s in list(m.seq_ids) + m.swapped_seq_ids}
    return snapshot(m), unc, m.swapped_seq_ids


def unchanged(a, b) -> bool:
    return same(a[0], b[0]) and a[1:] == b[1:]


def refused(m: BlockManager, error: type[KVForgeError], match: str, call) -> None:
    """``call`` raises ``error`` matching ``match`` and leaves ``m`` exactly as it was."""
    before = state(m)
    with pytest.raises(error, match=match):
        call()
    assert unchanged(state(m), before)
    m.check_invariants()


PROMPT = [5, 6, 7, 8, 9, 10]      # one full block and a partial one
GEN = [11, 12, 13, 14, 15, 16, 17, 18, 19]


# --------------------------------------------------------------- reservations
def test_reserve_hands_out_the_slots_an_append_without_ids_would():
    a, b = mgr(), mgr()
    for m in (a, b):
        m.add_sequence("x", PROMPT)
        m.add_sequence("y", [1, 2, 3])
    got = a.reserve_tokens_batch(["x", "y"], [3, 6])
    want = b.append_tokens_batch(["x", "y"], [3, 6])
    assert got.dtype == np.int64 and got.tolist() == want.tolist()
    assert a.block_table("x") == b.block_table("x") and a.block_table("y") == b.block_table("y")
    assert [a.num_tokens(s) for s in "xy"] == [9, 9]
    assert [a.num_uncommitted_tokens(s) for s in "xy"] == [3, 6]
    assert a.token_ids("x") is None and a.step_view(["x"], 1).input_ids is None
    one = a.reserve_tokens_batch(["x", "y"])  # the decode step: one each
    assert one.tolist() == b.append_tokens_batch(["x", "y"]).tolist()
    assert [a.num_uncommitted_tokens(s) for s in "xy"] == [4, 7]
    a.check_invariants()


def decode_with_ids(m: BlockManager, sid, gen) -> None:
    for t in gen:
        m.append_tokens_batch([sid], 1, [t])


def decode_async(m: BlockManager, sid, gen, lag: int = 1) -> None:
    """Reserve at step t, commit ``lag`` steps later (the ids of step t arrive then)."""
    for t in range(len(gen) + lag):
        if t < len(gen):
            m.reserve_tokens_batch([sid])
        if t >= lag:
            m.commit_token_ids([sid], [gen[t - lag]])
        m.check_invariants()


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_reserve_then_commit_keys_what_an_append_with_ids_keys(lag):
    ref, m = mgr(), mgr()
    for x in (ref, m):
        x.add_sequence("s", PROMPT, salt="t")
    decode_with_ids(ref, "s", GEN)
    decode_async(m, "s", GEN, lag)
    assert m.num_uncommitted_tokens("s") == 0
    assert m.token_ids("s") == PROMPT + GEN == ref.token_ids("s")
    assert m.keyed_blocks("s") == ref.keyed_blocks("s")
    keys = m.keyed_blocks("s")[0]
    assert len(keys) == (len(PROMPT) + len(GEN)) // BS == 3
    assert [m.prefix.key_of(b) for b in m.block_table("s")[:3]] == keys
    assert dict(m.prefix._blocks) == dict(ref.prefix._blocks)
    later = PROMPT + GEN + [1, 2, 3]  # a later prompt continuing the sequence
    r, r_ref = m.add_sequence("q", later, salt="t"), ref.add_sequence("q", later, salt="t")
    assert r.num_cached_tokens == r_ref.num_cached_tokens == 12
    assert r.block_ids[:3] == m.block_table("s")[:3]
    m.check_invariants()


def test_blocks_are_keyed_at_commit_not_at_reserve_and_partial_commits_key_what_they_fill():
    m = mgr()
    m.add_sequence("s", PROMPT)                     # block 0 keyed; block 1 holds 2 tokens
    m.reserve_tokens_batch(["s"], 7)                # fills blocks 1 and 2, one token in block 3
    assert m.prefix.num_cached_blocks == 1 and m.num_uncommitted_tokens("s") == 7
    m.commit_token_ids(["s"], [11], 1)              # block 1 still short of full
    assert m.prefix.num_cached_blocks == 1 and m.num_uncommitted_tokens("s") == 6
    m.commit_token_ids(["s"], [12, 13, 14], 3)      # block 1 full of known ids, block 2 has two
    assert m.prefix.num_cached_blocks == 2 and m.num_uncommitted_tokens("s") == 3
    assert m.token_ids("s") is None                 # its last three are still to come
    ref = mgr()
    ref.add_sequence("s", PROMPT)
    ref.append_tokens("s", 4, [11, 12, 13, 14])
    assert m.keyed_blocks("s") == ref.keyed_blocks("s")
    m.commit_token_ids(["s"], [15, 16, 17], 3)
    assert m.token_ids("s") == PROMPT + [11, 12, 13, 14, 15, 16, 17]
    assert m.num_uncommitted_tokens("s") == 0 and m.prefix.num_cached_blocks == 3
    m.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=8), st.data())
def test_any_reserve_and_commit_order_keys_like_one_append(chunks, data):
    """Reservations of random sizes, commits of random sizes in between: the same keys."""
    gen = list(range(40, 40 + sum(chunks)))
    ref, m = mgr(), mgr()
    for x in (ref, m):
        x.add_sequence("s", PROMPT)
    ref.append_tokens("s", len(gen), gen)
    done = 0
    for k in chunks:
        m.reserve_tokens_batch(["s"], [k])
        c = data.draw(st.integers(0, m.num_uncommitted_tokens("s")))
        m.commit_token_ids(["s"], gen[done:done + c], [c])
        done += c
        m.check_invariants()
    m.commit_token_ids(["s"], gen[done:], m.num_uncommitted_tokens("s"))
    assert m.keyed_blocks("s") == ref.keyed_blocks("s") and m.token_ids("s") == ref.token_ids("s")
    assert dict(m.prefix._blocks) == dict(ref.prefix._blocks)


def test_batched_commit_with_counts_and_without():
    m = mgr(24)
    for s in "abc":
        m.add_sequence(s, [1, 2, 3])
    m.reserve_tokens_batch(["a", "b", "c"], [1, 2, 5])
    m.commit_token_ids(["c", "a", "b"], [7, 8, 9, 4, 5, 6], [3, 1, 2])  # any order; ids sequence after sequence
    assert [m.num_uncommitted_tokens(s) for s in "abc"] == [0, 0, 2]
    assert m.token_ids("a") == [1, 2, 3, 4] and m.token_ids("b") == [1, 2, 3, 5, 6]
    m.commit_token_ids(["c"], [10, 11], 2)
    assert m.token_ids("c") == [1, 2, 3, 7, 8, 9, 10, 11]
    assert m.prefix.num_cached_blocks == 4  # a's block, b's, c's two
    assert m.keyed_blocks("c")[0] == m.prefix.block_keys([1, 2, 3, 7, 8, 9, 10, 11])
    m.check_invariants()


def test_reserve_refusals_change_nothing():
    m = mgr(6)
    m.add_sequence("a", PROMPT)
    m.add_sequence("chunked", [1, 2, 3, 4, 5], num_tokens=2)  # 3 prompt tokens pending
    m.reserve_tokens_batch(["a"], 1)
    refused(m, SequenceError, "unknown sequence 'nope'", lambda: m.reserve_tokens_batch(["a", "nope"]))
    refused(m, SequenceError, "names sequence 'a' 2 times", lambda: m.reserve_tokens_batch(["a", "a"]))
    refused(m, SequenceError, "must be >= 0, got -1", lambda: m.reserve_tokens_batch(["a"], -1))
    refused(m, SequenceError, "must be an integer, got True", lambda: m.reserve_tokens_batch(["a"], True))
    refused(m, SequenceError, "one per sequence \\(1\\), got 2", lambda: m.reserve_tokens_batch(["a"], [1, 2]))
    refused(m, SequenceError, "must be a list of sequence ids", lambda: m.reserve_tokens_batch("a"))
    refused(m, SequenceError, "'chunked' still has 3 prompt tokens pending",
            lambda: m.reserve_tokens_batch(["a", "chunked"]))
    refused(m, OutOfBlocksError, "the batch needs 4 more blocks; 3 available",
            lambda: m.reserve_tokens_batch(["a"], 14))
    refused(m, OutOfBlocksError, r"needs 250000000 more blocks for 1000000000 tokens \(the pool has 6\); 3 avail",
            lambda: m.reserve_tokens_batch(["a"], [10**9]))
    m.reserve_tokens_batch(["chunked"], 0)  # nothing asked of it: no refusal
    assert m.num_uncommitted_tokens("a") == 1


def test_commit_refusals_change_nothing():
    m = mgr()
    m.add_sequence("a", PROMPT)
    m.add_sequence("b", PROMPT)
    m.reserve_tokens_batch(["a"], 2)
    refused(m, SequenceError, "'b' has 0 uncommitted token\\(s\\); cannot commit 1",
            lambda: m.commit_token_ids(["a", "b"], [1, 2]))
    refused(m, SequenceError, "'a' has 2 uncommitted token\\(s\\); cannot commit 3",
            lambda: m.commit_token_ids(["a"], [1, 2, 3], 3))
    refused(m, SequenceError, "expected 2 token ids .* got 1", lambda: m.commit_token_ids(["a"], [1], 2))
    refused(m, SequenceError, "expected 1 token ids .* got 2", lambda: m.commit_token_ids(["a"], [1, 2]))
    refused(m, SequenceError, r"token_ids\[0\] must lie in \[0, 2\*\*63\), got -1",
            lambda: m.commit_token_ids(["a"], [-1]))
    refused(m, SequenceError, "must be an integer token id, got 1.5", lambda: m.commit_token_ids(["a"], [1.5]))
    refused(m, SequenceError, "unknown sequence 'z'", lambda: m.commit_token_ids(["z"], [1]))
    refused(m, SequenceError, "names sequence 'a' 2 times", lambda: m.commit_token_ids(["a", "a"], [1, 2]))
    refused(m, SequenceError, "must be >= 0, got -2", lambda: m.commit_token_ids(["a"], [], -2))
    m.commit_token_ids([], [])  # an empty batch is fine
    m.commit_token_ids(["a", "b"], [], 0)
    assert m.num_uncommitted_tokens("a") == 2


def test_appending_after_uncommitted_tokens_and_forking_them_are_refused():
    m = mgr()
    m.add_sequence("a", PROMPT)
    m.add_sequence("b", PROMPT)
    m.reserve_tokens_batch(["a"])
    why = "'a' has 1 reserved token\\(s\\) whose ids are not committed"
    refused(m, SequenceError, why, lambda: m.append_tokens("a", 1, [3]))
    refused(m, SequenceError, why, lambda: m.append_tokens("a", 2))
    refused(m, SequenceError, why, lambda: m.append_token("a"))
    refused(m, SequenceError, why, lambda: m.append_tokens_batch(["b", "a"], 1, [1, 2]))
    refused(m, SequenceError, why, lambda: m.append_tokens_batch(["b", "a"], [1, 1]))
    refused(m, SequenceError, "fork\\(\\): sequence 'a' has 1 reserved token", lambda: m.fork("a", "a2"))
    m.append_tokens_batch(["b", "a"], [1, 0])  # nothing asked of 'a'
    m.append_tokens("a", 0)
    m.commit_token_ids(["a"], [3])
    m.append_tokens("a", 1, [4])
    m.fork("a", "a2")
    assert m.token_ids("a2") == PROMPT + [3, 4]
    m.check_invariants()


def test_a_failed_copy_on_write_during_a_reservation_changes_nothing():
    m = mgr()
    m.add_sequence("a", PROMPT)
    m.fork("a", "b")  # shared partial tail: a reservation copies it first
    def broken(pairs):
        raise RuntimeError("copy failed")
    m.copy_blocks = broken
    before = state(m)
    with pytest.raises(RuntimeError, match="copy failed"):
        m.reserve_tokens_batch(["b"])
    after = state(m)
    # the pool's counters record the block taken for the copy and given back (as for an append)
    no_counters = lambda s: (s[0][:4] + s[0][5:],) + s[1:]  # noqa: E731
    assert unchanged(no_counters(after), no_counters(before))
    assert m.num_uncommitted_tokens("b") == 0
    m.copy_blocks = None
    slots = m.reserve_tokens_batch(["b"])
    assert m.take_pending_copies() == [(1, 2)] and slots.tolist() == [2 * BS + 2]
    m.check_invariants()


# --------------------------------------------------------------- truncation
class Store:
    """A fake K/V store over a manager without storage: the value at each slot, queued copies applied."""

    def __init__(self, m: BlockManager) -> None:
        self.m, self.slots = m, {}

    def write(self, slots, values) -> None:
        for src, dst in self.m.take_pending_copies():
            for o in range(BS):
                if src * BS + o in self.slots:
                    self.slots[dst * BS + o] = self.slots[src * BS + o]
        assert len(slots) == len(values)
        self.slots.update(zip(np.asarray(slots).tolist(), values))

    def read(self, sid) -> list:
        return [self.slots.get(self.m.slot_of(sid, p)) for p in range(self.m.num_tokens(sid))]


def test_truncate_frees_whole_blocks_and_keeps_the_prefix():
    m = mgr()
    m.add_sequence("s", list(range(14)))            # blocks 0..3, three keyed
    assert m.block_table("s") == [0, 1, 2, 3] and m.prefix.num_cached_blocks == 3
    m.truncate("s", 8)                              # back to two full blocks
    assert m.block_table("s") == [0, 1] and m.num_tokens("s") == 8
    assert m.token_ids("s") == list(range(8)) and len(m.keyed_blocks("s")[0]) == 2
    assert m.pool.free_blocks()[0] == 3 and m.pool.ref_count(3) == 0  # an unkeyed block: free
    assert m.pool.evictable_blocks() == [2]        # a full keyed block: cached, as after free_sequence
    m.check_invariants()
    m.truncate("s", 8)                              # the same length: nothing happens
    m.truncate("s", 0)
    assert m.block_table("s") == [] and m.num_tokens("s") == 0 and m.token_ids("s") == []
    assert m.pool.num_allocated_blocks == 0
    m.append_tokens("s", 4, [0, 1, 2, 3])           # known again: its new block is keyed (its old one holds the key)
    assert m.block_table("s") == [3] and m.keyed_blocks("s")[0] == m.prefix.block_keys([0, 1, 2, 3])
    m.check_invariants()


def test_truncating_an_own_full_block_unkeys_it_and_the_next_append_writes_in_place():
    m = mgr()
    st_ = Store(m)
    r = m.add_sequence("s", list(range(7)))         # block 0 keyed, block 1 holds 3 tokens
    st_.write(r.slots, list(range(7)))
    st_.write(m.append_tokens("s", 1, [7]), [7])    # block 1 full and keyed now
    assert m.prefix.key_of(1) is not None and m.pool.ref_count(1) == 1
    cached = m.prefix.num_cached_blocks
    m.truncate("s", 6)                               # block 1 falls back below full
    assert m.prefix.key_of(1) is None and m.prefix.num_cached_blocks == cached - 1
    assert not m.pool.is_cached(1) and m.block_table("s") == [0, 1]
    slots = m.append_tokens("s", 2, [60, 70])
    assert slots.tolist() == [1 * BS + 2, 1 * BS + 3] and m.num_cow_copies == 0
    st_.write(slots, [60, 70])
    assert m.prefix.key_of(1) is not None            # full again, under its new ids
    r = m.add_sequence("q", list(range(8)) + [9])    # the old content is no longer found in block 1
    assert r.num_cached_tokens == 4 and r.block_ids[0] == 0 and r.block_ids[1] != 1
    m.check_invariants()


def test_truncating_into_a_forked_block_never_writes_the_other_owner():
    m = mgr()
    st_ = Store(m)
    r = m.add_sequence("a", list(range(7)))
    st_.write(r.slots, list(range(7)))
    m.fork("a", "b")
    m.truncate("b", 5)                               # into the shared partial block 1
    assert m.block_table("b") == m.block_table("a") == [0, 1]
    slots = m.append_tokens("b", 2, [50, 51])        # copies block 1 first
    assert m.num_cow_copies == 1 and m.block_table("b")[1] != 1
    st_.write(slots, [50, 51])
    assert st_.read("a") == list(range(7))
    assert st_.read("b") == [0, 1, 2, 3, 4, 50, 51]
    m.check_invariants()


@pytest.mark.parametrize("other_leaves_first", [False, True])
def test_truncating_into_a_shared_keyed_block_copies_it_even_after_the_others_leave(other_leaves_first):
    m = mgr()
    st_ = Store(m)
    a = list(range(10))
    r = m.add_sequence("a", a)                       # blocks 0, 1 keyed
    st_.write(r.slots, a)
    r = m.add_sequence("b", a[:9] + [99])            # a prefix hit on blocks 0 and 1
    assert r.num_cached_tokens == 8 and r.block_ids[:2] == [0, 1]
    st_.write(r.slots, [a[8], 99])
    m.truncate("b", 6)                               # into block 1, which a still reads (and stays keyed)
    assert m.prefix.key_of(1) is not None and m.pool.ref_count(1) == 2
    if other_leaves_first:
        m.free_sequence("a")                         # block 1: only b now, but still keyed
        assert m.pool.ref_count(1) == 1 and m.pool.is_cached(1)
    slots = m.append_tokens("b", 1, [77])
    assert m.num_cow_copies == 1 and m.block_table("b")[1] != 1
    st_.write(slots, [77])
    assert st_.read("b") == a[:6] + [77]
    r = m.add_sequence("c", a[:9])                   # the cached block still holds a's tokens
    assert r.num_cached_tokens == 8 and r.block_ids[:2] == [0, 1]
    assert [st_.slots[s] for s in range(8)] == a[:8]
    m.check_invariants()


def test_truncating_into_a_block_shared_inside_one_append_batch():
    """Both sharers truncate into one keyed block and append in one batch: each copies it."""
    m = mgr()
    st_ = Store(m)
    r = m.add_sequence("a", list(range(9)))
    st_.write(r.slots, list(range(9)))
    m.fork("a", "b")
    m.truncate("a", 6)
    m.truncate("b", 5)
    slots = m.append_tokens_batch(["a", "b"], 1, [60, 50])
    st_.write(slots, [60, 50])
    assert m.num_cow_copies == 2 and len({m.block_table("a")[1], m.block_table("b")[1], 1}) == 3
    assert m.prefix.key_of(1) is not None and m.pool.evictable_blocks() == [1]
    assert st_.read("a") == [0, 1, 2, 3, 4, 5, 60] and st_.read("b") == [0, 1, 2, 3, 4, 50]
    m.check_invariants()


def test_truncate_takes_uncommitted_tokens_first():
    m = mgr()
    m.add_sequence("s", PROMPT)
    m.reserve_tokens_batch(["s"], 5)                 # 11 tokens, the last 5 uncommitted
    m.truncate("s", 9)
    assert m.num_tokens("s") == 9 and m.num_uncommitted_tokens("s") == 3 and m.token_ids("s") is None
    m.commit_token_ids(["s"], [1, 2], 2)
    m.truncate("s", 8)                               # the last uncommitted one goes: known again
    assert m.num_uncommitted_tokens("s") == 0 and m.token_ids("s") == PROMPT + [1, 2]
    assert m.prefix.num_cached_blocks == 2
    m.reserve_tokens_batch(["s"], 3)
    m.truncate("s", 7)                               # into the committed ones
    assert m.num_uncommitted_tokens("s") == 0 and m.token_ids("s") == PROMPT + [1]
    assert m.prefix.num_cached_blocks == 1 and m.block_table("s") == [0, 1]
    m.check_invariants()


def test_speculative_append_drafts_then_truncate_the_rejected():
    m = mgr()
    st_ = Store(m)
    r = m.add_sequence("s", PROMPT)
    st_.write(r.slots, PROMPT)
    drafts = [20, 21, 22, 23]
    st_.write(m.append_tokens("s", 4, drafts), drafts)   # verified in one step
    accepted = 1
    m.truncate("s", len(PROMPT) + accepted)
    bonus = m.append_tokens("s", 1, [30])            # the target model's own next token
    st_.write(bonus, [30])
    assert m.token_ids("s") == PROMPT + [20, 30] == st_.read("s")
    assert m.keyed_blocks("s")[0] == m.prefix.block_keys(PROMPT + [20, 30])
    m.check_invariants()


def test_truncate_refusals_change_nothing():
    m = mgr(num_host_blocks=8)
    m.add_sequence("a", PROMPT)
    m.add_sequence("chunked", [1, 2, 3, 4, 5], num_tokens=2)
    m.add_sequence("away", [1, 2])
    m.swap_out(["away"])
    refused(m, SequenceError, "unknown sequence 'z'", lambda: m.truncate("z", 0))
    refused(m, SequenceError, "'away' is swapped out", lambda: m.truncate("away", 0))
    refused(m, SequenceError, "must be >= 0, got -1", lambda: m.truncate("a", -1))
    refused(m, SequenceError, "must be an integer, got False", lambda: m.truncate("a", False))
    refused(m, SequenceError, "must be an integer, got 2.0", lambda: m.truncate("a", 2.0))
    refused(m, SequenceError, "'a' has 6 tokens; cannot keep 7", lambda: m.truncate("a", 7))
    refused(m, SequenceError, "'chunked' still has 3 prompt tokens pending", lambda: m.truncate("chunked", 1))
    m.truncate("a", np.int64(3))
    assert m.num_tokens("a") == 3


def build_mixed(m: BlockManager) -> list:
    """Sequences of every kind a truncation meets: own keyed tails, forks, prefix hits,
    uncommitted tokens, an unknown one, a short one."""
    m.add_sequence("own", list(range(13)))          # blocks keyed through 12
    m.add_sequence("fork", list(range(100, 110)))
    m.fork("fork", "fork2")
    m.add_sequence("hit", list(range(12)) + [7])    # prefix hit on own's first three blocks
    m.add_sequence("resv", [1, 2, 3])
    m.reserve_tokens_batch(["resv"], 6)
    m.commit_token_ids(["resv"], [4, 5], 2)
    m.add_sequence("bare", num_tokens=7)
    m.add_sequence("short", [9])
    # those that drop blocks first: a batch decides its tails after every drop of the batch
    return [("own", 6), ("fork2", 5), ("fork", 9), ("hit", 10), ("resv", 6), ("bare", 3), ("short", 1)]


def test_truncate_batch_is_the_sequence_of_truncates():
    a, b = mgr(32), mgr(32)
    cuts = build_mixed(a)
    build_mixed(b)
    for sid, n in cuts:
        a.truncate(sid, n)
    b.truncate_batch([s for s, _ in cuts], [n for _, n in cuts])
    assert unchanged(state(b), state(a))
    assert [b.tables.is_tail_shared(b._seqs.row(s)) for s, _ in cuts] == \
        [a.tables.is_tail_shared(a._seqs.row(s)) for s, _ in cuts]
    b.check_invariants()
    b.truncate_batch(["own", "fork"], 0)
    assert b.num_tokens("own") == b.num_tokens("fork") == 0 and b.token_ids("own") == []
    b.truncate_batch([], [])
    b.check_invariants()


def test_truncate_batch_refusals_change_nothing():
    m = mgr(32)
    build_mixed(m)
    m.add_sequence("chunked", [61, 62, 63, 64, 65], num_tokens=2)
    refused(m, SequenceError, r"truncate_batch\(\): sequence 'short' has 1 tokens; cannot keep 2",
            lambda: m.truncate_batch(["own", "short"], [1, 2]))
    refused(m, SequenceError, "names sequence 'own' 2 times", lambda: m.truncate_batch(["own", "own"], 1))
    refused(m, SequenceError, "unknown sequence 'z'", lambda: m.truncate_batch(["own", "z"], 1))
    refused(m, SequenceError, "must be >= 0, got -1", lambda: m.truncate_batch(["own"], [-1]))
    refused(m, SequenceError, r"one per sequence \(2\), got 1", lambda: m.truncate_batch(["own", "hit"], [1]))
    refused(m, SequenceError, "'chunked' still has 3 prompt tokens pending",
            lambda: m.truncate_batch(["own", "chunked"], [1, 2]))


def test_queued_copies_into_a_block_truncated_away_are_dropped():
    m = mgr()
    m.add_sequence("a", PROMPT)
    m.fork("a", "b")
    m.append_tokens("b", 1, [1])                     # queues (1 -> 2)
    assert m.pending_copies == [(1, 2)]
    m.truncate("b", 4)                               # block 2 is free again
    assert m.pending_copies == [] and m.pool.ref_count(2) == 0
    m.check_invariants()


# --------------------------------------------------------------- swap, compaction
def test_uncommitted_tokens_survive_a_swap():
    m = BlockManager(12, BS, num_host_blocks=8)
    c = Contents(m)
    r = m.add_sequence("s", PROMPT)
    c.write(r.slots, PROMPT)
    slots = m.reserve_tokens_batch(["s"], 4)
    c.write(slots, [11, 12, 13, 14])                  # the step computed them; ids not back yet
    m.commit_token_ids(["s"], [11])
    m.swap_out(["s"])
    assert m.num_uncommitted_tokens("s") == 3 and m.num_tokens("s") == 10
    c.check({"s": PROMPT + [11, 12, 13, 14]})
    r = m.add_sequence("filler", [90, 91, 92, 93, 94])   # the swap-in lands in other blocks
    c.write(r.slots, [90, 91, 92, 93, 94])
    m.swap_in(["s"])
    assert m.num_uncommitted_tokens("s") == 3 and m.token_ids("s") is None
    m.commit_token_ids(["s"], [12, 13, 14], 3)
    assert m.token_ids("s") == PROMPT + [11, 12, 13, 14]
    ref = mgr()
    ref.add_sequence("s", PROMPT + [11, 12, 13, 14])
    assert m.keyed_blocks("s")[0] == ref.keyed_blocks("s")[0]
    c.check({"s": PROMPT + [11, 12, 13, 14], "filler": [90, 91, 92, 93, 94]})


def test_truncating_a_keyed_block_with_a_host_copy_keeps_its_key_on_the_host():
    m = BlockManager(12, BS, num_host_blocks=8)
    c = Contents(m)
    toks = list(range(9))
    r = m.add_sequence("s", toks)
    c.write(r.slots, toks)
    m.free_sequence("s")
    m.pool.reclaim_unused_blocks()                    # both keyed blocks spill to the host
    m.flush_spills()
    assert len(m.host._keys) == 2
    r = m.add_sequence("u", toks)                     # and come back: keyed again, the host blocks their copies
    assert r.num_cached_tokens == 8
    m.flush_spills()
    c.write(r.slots, toks[8:])
    blk = m.block_table("u")[1]
    assert m.host.copy_of(blk) is not None
    m.truncate("u", 5)
    assert m.prefix.key_of(blk) is None and m.host.copy_of(blk) is None
    key = m.prefix.block_keys(toks[:8])[1]
    assert m.host.host_block(key) is not None        # still found, on the host
    c.write(m.append_tokens("u", 1, [55]), [55])      # written in place: the host copy is untouched
    assert m.num_cow_copies == 0
    c.check({"u": toks[:5] + [55]})
    r = m.add_sequence("v", toks)                     # block 0 on the device, block 1 from the host copy
    assert r.num_cached_tokens == 8 and r.block_ids[0] == m.block_table("u")[0]
    m.flush_spills()
    c.write(r.slots, toks[8:])
    c.check({"u": toks[:5] + [55], "v": toks})


def cache(**kw) -> KVCache:
    kw.setdefault("num_blocks", 16)
    cfg = CacheConfig(block_size=BS, num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32,
                      device="cpu", enable_compaction=True, **kw)
    return Cache(cfg)


def write(c: KVCache, slots, values) -> None:
    v = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 1, 8).contiguous()
    for layer in range(2):
        c.write(layer, np.asarray(slots), v, -v)


def read(c: KVCache, sid) -> list[float]:
    k, v = c.gather(sid, 1)
    assert torch.equal(k, -v)
    return k[:, 0, 0].tolist()


def test_cache_reserve_commit_through_compaction():
    c = cache(num_blocks=16, chunk_blocks=2)
    for i in range(4):
        r = c.add_sequence(i, [100 * i + t for t in range(8)])
        write(c, r.slots, [100 * i + t for t in range(8)])
    r = c.add_sequence("s", PROMPT)
    write(c, r.slots, PROMPT)
    slots = c.reserve_tokens_batch(["s"], 5)
    write(c, slots, [11, 12, 13, 14, 15])
    for i in range(4):
        c.free_sequence(i)
    c.reclaim_unused_blocks()
    before = c.block_table("s")
    assert c.compact_cache() > 0 and c.block_table("s") != before  # its blocks moved down
    c.check_invariants()
    assert c.num_uncommitted_tokens("s") == 5
    c.commit_token_ids(["s"], [11, 12, 13, 14, 15], 5)
    assert read(c, "s") == PROMPT + [11, 12, 13, 14, 15]
    r = c.add_sequence("q", PROMPT + [11, 12, 13, 14, 15, 16])
    assert r.num_cached_tokens == 8 and r.block_ids[:2] == c.block_table("s")[:2]
    c.check_invariants()


def test_cache_reserve_grows_the_pool_and_truncate_releases():
    c = cache(num_blocks=16, chunk_blocks=2, initial_blocks=2)
    c.add_sequence("s", [1, 2, 3])
    assert c.capacity_blocks == 2
    slots = c.reserve_tokens_batch(["s"], [9])        # needs 3 blocks: a chunk more
    assert c.capacity_blocks == 4 and len(slots) == 9
    write(c, slots, list(range(9)))
    c.truncate("s", 4)
    assert c.block_table("s") == [0] and c.num_uncommitted_tokens("s") == 1
    c.commit_token_ids(["s"], [4])
    assert c.manager.token_ids("s") == [1, 2, 3, 4]
    with pytest.raises(SequenceError, match="cannot commit 1"):
        c.commit_token_ids(["s"], [5])
    c.check_invariants()


def c_block_bytes() -> int:
    return 2 * 2 * BS * 1 * 8 * 4  # layers, keys and values, slots, heads, head_dim, fp32


def test_cache_swap_with_uncommitted_tokens():
    c = cache(num_blocks=16, host_memory=8 * c_block_bytes())
    r = c.add_sequence("s", PROMPT)
    write(c, r.slots, PROMPT)
    write(c, c.reserve_tokens_batch(["s"], 3), [7, 8, 9])
    c.swap_out(["s"])
    assert c.num_uncommitted_tokens("s") == 3
    c.swap_in(["s"])
    c.commit_token_ids(["s"], [7, 8, 9], 3)
    assert read(c, "s") == PROMPT + [7, 8, 9] and c.manager.token_ids("s") == PROMPT + [7, 8, 9]
    c.check_invariants()


# --------------------------------------------------------------- the invariants see the new state
def test_check_invariants_catches_broken_uncommitted_and_truncation_state():
    def broken(edit) -> None:
        m = mgr()
        m.add_sequence("a", list(range(9)))
        m.fork("a", "b")
        m.truncate("b", 6)                           # b's tail: block 1, shared and keyed
        m.add_sequence("c", PROMPT)
        m.reserve_tokens_batch(["c"], 3)
        m.check_invariants()
        edit(m, m._seqs.row("b"), m._seqs.row("c"))
        with pytest.raises(AssertionError):
            m.check_invariants()

    t = lambda m: m.tables  # noqa: E731
    broken(lambda m, b, c: t(m)._shared_tail.__setitem__(b, False))  # a later append would write a's block
    broken(lambda m, b, c: t(m)._known.__setitem__(c, True))         # known with ids missing
    broken(lambda m, b, c: t(m)._nunc.__setitem__(c, 0))             # the count of rows drifts
    broken(lambda m, b, c: t(m)._nunc.__setitem__(c, 99))            # more than its tokens
    broken(lambda m, b, c: t(m)._head_known.__setitem__(b, True))    # a head without uncommitted tokens
    broken(lambda m, b, c: m._seqs.state("c").keys.append(m._seqs.state("a").keys[1]))  # a key it has not
    broken(lambda m, b, c: m.prefix._register_many([m.block_table("c")[2]], [b"x" * 16]))  # uncommitted, keyed


def test_cache_step_over_uncommitted_tokens_takes_the_ids_from_the_caller():
    c = cache()
    r = c.add_sequence("s", PROMPT)
    write(c, r.slots, PROMPT)
    c.add_sequence("t", [1, 2])
    slots = c.reserve_tokens_batch(["s", "t"])          # step t + 1's slots; step t's ids not back yet
    with pytest.raises(KVForgeError, match="unknown to the cache .* pass input_ids="):
        c.prepare_step(["s", "t"], 1)
    batch = c.prepare_step(["s", "t"], 1, input_ids=[40, 41])  # the ids step t sampled
    assert batch.slot_mapping.tolist() == slots.tolist()
    assert batch.input_ids.tolist() == [40, 41] and batch.positions.tolist() == [6, 2]
    c.commit_token_ids(["s", "t"], [40, 41])
    assert c.prepare_step(["s", "t"], 1).input_ids.tolist() == [40, 41]  # the cache's own now
    c.check_invariants()


def test_a_failed_spill_drops_the_host_copy_adopted_while_it_was_queued():
    """Found by test_host_tier's random program: in one append a keyed block is evicted (its spill
    queued) and another block fills under the same key (adopting the queued host block as its
    copy); when the spill copy then fails, that copy must be forgotten, not reused by a swap."""
    m = BlockManager(4, BS, num_host_blocks=4)
    c = Contents(m)
    p = list(range(10, 18))
    r = m.add_sequence("a", p)                       # blocks 0, 1 keyed
    c.write(r.slots, p)
    m.free_sequence("a")
    r = m.add_sequence("b", p[:6])                   # hits block 0; block 2 new
    c.write(r.slots, p[4:6])
    r = m.add_sequence("d", [90])                    # block 3: nothing free, block 1 evictable
    c.write(r.slots, [90])
    slots = m.append_tokens("b", 3, p[6:8] + [5])    # evicts block 1; block 2 fills under its key
    filled = m.block_table("b")[1]
    assert m.host.copy_of(filled) is not None        # adopted: its data is still queued to come
    c.fail = {"d2h"}
    m.flush_spills()                                 # the spill fails
    c.fail = set()
    assert m.host.copy_of(filled) is None
    c.write(slots, p[6:8] + [5])
    m.swap_out(["b"])                                # block 2 is copied, not taken from the lost spill
    m.free_sequence("d")
    m.swap_in(["b"])
    c.check({"b": p + [5]})
