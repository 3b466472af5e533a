"""Validate, then act: every public call of the bookkeeping refuses bad input before it changes anything.

A table of bad calls across BlockPool, PrefixIndex, BlockManager and the
compaction planner and trigger: each must raise the exact kvforge error,
name the bad value or argument, and leave the observable state (free stack
and its order, evictable queue, reference counts, cached flags, stats, every
sequence's table, counts and token ids, prefix stats and keys, queued copies)
exactly as it was, with the invariants holding. A hypothesis machine then
interleaves random valid and invalid operations and checks the same after
every invalid one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvforge.core import BlockManager, BlockPool, CompactionPlan, PrefixIndex, blocks_for_tokens, plan_compaction
from kvforge.core.compaction import should_compact
from kvforge.errors import ConfigError, InvalidBlockError, KVForgeError, OutOfBlocksError, SequenceError

BS = 4
NUM_BLOCKS = 16


def snapshot(m: BlockManager):
    """Everything a refused call must leave alone (and a check that every id handed out is a Python int)."""
    pool, prefix = m.pool, m.prefix
    seqs = {sid: (m.block_table(sid), m.num_tokens(sid), m.num_pending_tokens(sid), m.token_ids(sid))
            for sid in m.seq_ids}
    free, evictable = pool.free_blocks(), pool.evictable_blocks()
    handed_out = free + evictable + [b for t, _, _, _ in seqs.values() for b in t]
    assert all(type(b) is int for b in handed_out), "a non-int block id was handed out"
    return (m.seq_ids, seqs, free, evictable, pool.stats, pool.capacity,
            [pool.ref_count(b) for b in range(pool.num_blocks)],
            [pool.is_cached(b) for b in range(pool.num_blocks)],
            prefix.stats(), [prefix.key_of(b) for b in range(pool.num_blocks)],
            list(m.pending_copies), m.num_cow_copies, m.usage(),
            m.step_view(m.seq_ids, 0) if m.seq_ids else None)


def same(a, b) -> bool:
    """Snapshots equal (the step views hold arrays)."""
    *ra, va = a
    *rb, vb = b
    if ra != rb:
        return False
    if va is None or vb is None:
        return va is vb
    return all(np.array_equal(x, y) for x, y in zip(va, vb) if x is not None) and \
        (va.input_ids is None) == (vb.input_ids is None)


def populated() -> BlockManager:
    """A manager with held, shared, cached, evictable, free and unbacked blocks, and pending prompt tokens.

    a: prompt 1..9 in blocks 0, 1, 2 (0 and 1 cached); b: a fork of a (shares 0, 1, 2);
    c: 5 tokens without ids (blocks 3, 4); p: 2 of 6 prompt tokens reserved (block 5), 4 pending;
    blocks 6, 7 evictable (a freed prompt of 9 tokens); capacity 14 of 16.
    """
    m = BlockManager(NUM_BLOCKS, BS, capacity=14)
    m.add_sequence("a", list(range(1, 10)))
    m.fork("a", "b")
    m.add_sequence("c", num_tokens=5)
    m.add_sequence("p", [7, 7, 7, 7, 7, 7], num_tokens=2)
    m.add_sequence("d", list(range(50, 59)))
    m.free_sequence("d")
    assert m.block_table("a") == [0, 1, 2] and m.block_table("c") == [3, 4] and m.block_table("p") == [5]
    assert m.pool.evictable_blocks() == [7, 6] and m.pool.free_blocks() == [8, 9, 10, 11, 12, 13]
    m.check_invariants()
    return m


KEY = b"k" * 16

# (id, call, error type, a substring the message must contain)
BAD_CALLS = [
    # ------------------------------------------------------------------ BlockPool
    ("allocate-negative", lambda m: m.pool.allocate(-1), InvalidBlockError, "-1"),
    ("allocate-float", lambda m: m.pool.allocate(2.5), InvalidBlockError, "2.5"),
    ("allocate-bool", lambda m: m.pool.allocate(True), InvalidBlockError, "True"),
    ("allocate-str", lambda m: m.pool.allocate("2"), InvalidBlockError, "'2'"),
    ("allocate-none", lambda m: m.pool.allocate(None), InvalidBlockError, "None"),
    ("allocate-numpy-float", lambda m: m.pool.allocate(np.float64(1.0)), InvalidBlockError, "float64"),
    ("allocate-huge", lambda m: m.pool.allocate(2**70), InvalidBlockError, str(2**70)),
    ("allocate-consecutive-zero", lambda m: m.pool.allocate_consecutive(0), InvalidBlockError, "got 0"),
    ("allocate-consecutive-bool", lambda m: m.pool.allocate_consecutive(True), InvalidBlockError, "True"),
    ("allocate-consecutive-negative", lambda m: m.pool.allocate_consecutive(-3), InvalidBlockError, "-3"),
    ("can-allocate-negative", lambda m: m.pool.can_allocate(-1), InvalidBlockError, "-1"),
    ("can-allocate-float", lambda m: m.pool.can_allocate(1.5), InvalidBlockError, "1.5"),
    ("free-bool", lambda m: m.pool.free([True]), InvalidBlockError, "True"),
    ("free-numpy-bool", lambda m: m.pool.free([np.True_]), InvalidBlockError, "True"),
    ("free-float", lambda m: m.pool.free([1.0]), InvalidBlockError, "1.0"),
    ("free-none", lambda m: m.pool.free([None]), InvalidBlockError, "None"),
    ("free-str-id", lambda m: m.pool.free(["0"]), InvalidBlockError, "'0'"),
    ("free-negative", lambda m: m.pool.free([-1]), InvalidBlockError, "-1"),
    ("free-unknown", lambda m: m.pool.free([16]), InvalidBlockError, "16"),
    ("free-a-free-block", lambda m: m.pool.free([9]), InvalidBlockError, "block 9"),
    ("free-an-evictable-block", lambda m: m.pool.free([6]), InvalidBlockError, "block 6"),
    ("free-more-refs-than-held", lambda m: m.pool.free([0, 0, 0]), InvalidBlockError, "block 0 3 time"),
    ("free-good-then-bad", lambda m: m.pool.free([3, 4, 99]), InvalidBlockError, "99"),
    ("free-good-then-bool", lambda m: m.pool.free([3, True]), InvalidBlockError, "True"),
    ("free-scalar", lambda m: m.pool.free(0), InvalidBlockError, "0"),
    ("free-string", lambda m: m.pool.free("01"), InvalidBlockError, "'01'"),
    ("free-2d", lambda m: m.pool.free(np.zeros((1, 1), dtype=np.int64)), InvalidBlockError, "[0] (list)"),
    ("incref-bool", lambda m: m.pool.incref([True]), InvalidBlockError, "True"),
    ("incref-free-block", lambda m: m.pool.incref([9]), InvalidBlockError, "block 9"),
    ("incref-unknown", lambda m: m.pool.incref([0, 99]), InvalidBlockError, "99"),
    ("incref-float", lambda m: m.pool.incref([2.0]), InvalidBlockError, "2.0"),
    ("ref-count-bool", lambda m: m.pool.ref_count(True), InvalidBlockError, "True"),
    ("ref-count-negative", lambda m: m.pool.ref_count(-1), InvalidBlockError, "-1"),
    ("ref-count-unknown", lambda m: m.pool.ref_count(16), InvalidBlockError, "16"),
    ("ref-count-float", lambda m: m.pool.ref_count(1.0), InvalidBlockError, "1.0"),
    ("is-cached-negative", lambda m: m.pool.is_cached(-1), InvalidBlockError, "-1"),
    ("is-cached-none", lambda m: m.pool.is_cached(None), InvalidBlockError, "None"),
    ("unmark-cached-unknown", lambda m: m.pool.unmark_cached(16), InvalidBlockError, "16"),
    ("unmark-cached-bool", lambda m: m.pool.unmark_cached(True), InvalidBlockError, "True"),
    ("mark-cached-free", lambda m: m.pool.mark_cached(9), InvalidBlockError, "block 9"),
    ("mark-cached-negative", lambda m: m.pool.mark_cached(-1), InvalidBlockError, "-1"),
    ("mark-cached-many-one-free", lambda m: m.pool.mark_cached_many([3, 9]), InvalidBlockError, "block 9"),
    ("mark-cached-many-bool", lambda m: m.pool.mark_cached_many([3, True]), InvalidBlockError, "True"),
    ("evict-held", lambda m: m.pool.evict_blocks([0]), InvalidBlockError, "block 0"),
    ("evict-twice", lambda m: m.pool.evict_blocks([6, 6]), InvalidBlockError, "block 6 twice"),
    ("evict-bool", lambda m: m.pool.evict_blocks([True]), InvalidBlockError, "True"),
    ("evict-unknown", lambda m: m.pool.evict_blocks([6, 99]), InvalidBlockError, "99"),
    ("grow-bool", lambda m: m.pool.grow(True), InvalidBlockError, "True"),
    ("grow-float", lambda m: m.pool.grow(15.0), InvalidBlockError, "15.0"),
    ("grow-negative", lambda m: m.pool.grow(-1), InvalidBlockError, "-1"),
    ("grow-beyond-pool", lambda m: m.pool.grow(17), InvalidBlockError, "17"),
    ("grow-below-capacity", lambda m: m.pool.grow(13), InvalidBlockError, "13"),
    ("shrink-negative", lambda m: m.pool.shrink(-1), InvalidBlockError, "-1"),
    ("shrink-float", lambda m: m.pool.shrink(2.0), InvalidBlockError, "2.0"),
    ("shrink-none", lambda m: m.pool.shrink(None), InvalidBlockError, "None"),
    ("shrink-above-capacity", lambda m: m.pool.shrink(15), InvalidBlockError, "15"),
    ("shrink-over-held", lambda m: m.pool.shrink(4), InvalidBlockError, "block 4"),
    ("relocate-to-held", lambda m: m.pool.relocate([(5, 0)]), InvalidBlockError, "0 is held"),
    ("relocate-free-source", lambda m: m.pool.relocate([(9, 10)]), InvalidBlockError, "9 is free"),
    ("relocate-beyond-capacity", lambda m: m.pool.relocate([(5, 14)]), InvalidBlockError, "14"),
    ("relocate-two-to-one", lambda m: m.pool.relocate([(4, 9), (5, 9)]), InvalidBlockError, "block 9 twice"),
    ("relocate-one-twice", lambda m: m.pool.relocate([(5, 9), (5, 10)]), InvalidBlockError, "block 5 twice"),
    ("relocate-bool", lambda m: m.pool.relocate([(True, 9)]), InvalidBlockError, "True"),
    ("relocate-triple", lambda m: m.pool.relocate([(5, 9, 10)]), InvalidBlockError, "(5, 9, 10)"),
    ("relocate-float", lambda m: m.pool.relocate([(5.0, 9)]), InvalidBlockError, "5.0"),
    ("relocate-string", lambda m: m.pool.relocate("59"), InvalidBlockError, "'59'"),
    ("relocate-good-then-bad", lambda m: m.pool.relocate([(5, 9), (4, 99)]), InvalidBlockError, "99"),
    ("record-compaction-negative-time", lambda m: m.pool.record_compaction(-1.0, 0.0, 0, 0),
     InvalidBlockError, "when_ms"),
    ("record-compaction-nan", lambda m: m.pool.record_compaction(0.0, math.nan, 0, 0), InvalidBlockError, "nan"),
    ("record-compaction-float-moves", lambda m: m.pool.record_compaction(0.0, 0.0, 1.5, 0),
     InvalidBlockError, "1.5"),
    ("record-bytes-negative", lambda m: m.pool.record_bytes_returned(-5), InvalidBlockError, "-5"),
    ("record-bytes-bool", lambda m: m.pool.record_bytes_returned(True), InvalidBlockError, "True"),
    ("pool-size-zero", lambda m: BlockPool(0), InvalidBlockError, "num_blocks"),
    ("pool-size-bool", lambda m: BlockPool(True), InvalidBlockError, "True"),
    ("pool-size-huge", lambda m: BlockPool(2**40), InvalidBlockError, "num_blocks"),
    ("pool-capacity-over", lambda m: BlockPool(4, capacity=5), InvalidBlockError, "capacity"),
    ("pool-capacity-float", lambda m: BlockPool(4, capacity=2.0), InvalidBlockError, "2.0"),
    # ---------------------------------------------------------------- PrefixIndex
    ("keys-bool-token", lambda m: m.prefix.block_keys([1, True, 3, 4]), SequenceError, "True"),
    ("keys-str-token", lambda m: m.prefix.block_keys(["x"] * 4), SequenceError, "'x'"),
    ("keys-negative-token", lambda m: m.prefix.block_keys([-1, 0, 0, 0]), SequenceError, "-1"),
    ("keys-huge-token", lambda m: m.prefix.block_keys([2**63, 0, 0, 0]), SequenceError, str(2**63)),
    ("keys-short-parent", lambda m: m.prefix.block_keys([1, 2, 3, 4], parent=b"short"), InvalidBlockError, "parent"),
    ("keys-str-extra", lambda m: m.prefix.block_keys([1, 2, 3, 4], extra="lora"), InvalidBlockError, "extra"),
    ("next-key-partial-block", lambda m: m.prefix.next_key(None, [1, 2, 3]), InvalidBlockError, "got 3"),
    ("lookup-bad-key", lambda m: m.prefix.lookup([b"x"], 4), InvalidBlockError, "keys[0]"),
    ("lookup-negative-tokens", lambda m: m.prefix.lookup([KEY], -1), InvalidBlockError, "-1"),
    ("lookup-record-str", lambda m: m.prefix.lookup([KEY], 4, record="yes"), InvalidBlockError, "record"),
    ("record-query-negative", lambda m: m.prefix.record_query(-1, 0), InvalidBlockError, "-1"),
    ("record-query-float", lambda m: m.prefix.record_query(4, 1.0), InvalidBlockError, "1.0"),
    ("register-free-block", lambda m: m.prefix.register(9, KEY), InvalidBlockError, "block 9"),
    ("register-bool", lambda m: m.prefix.register(True, KEY), InvalidBlockError, "True"),
    ("register-short-key", lambda m: m.prefix.register(3, b"short"), InvalidBlockError, "key"),
    ("register-many-mismatch", lambda m: m.prefix.register_many([3, 4], [KEY]), InvalidBlockError, "2 block_ids"),
    ("register-many-one-free", lambda m: m.prefix.register_many([3, 9], [KEY, b"j" * 16]), InvalidBlockError,
     "block 9"),
    ("extend-chain-short-data", lambda m: m.prefix.extend_chain([], None, b"short", [3]), InvalidBlockError,
     "5 bytes"),
    ("extend-chains-mismatch", lambda m: m.prefix.extend_chains([[]], [None, None], bytes(32), [3]),
     InvalidBlockError, "2 salts"),
    ("extend-chains-bad-chain", lambda m: m.prefix.extend_chains(["abc"], [None], bytes(32), [3]),
     InvalidBlockError, "chains[0]"),
    ("key-of-negative", lambda m: m.prefix.key_of(-1), InvalidBlockError, "-1"),
    ("key-of-str", lambda m: m.prefix.key_of("0"), InvalidBlockError, "'0'"),
    ("prefix-relocate-bool", lambda m: m.prefix.relocate({0: True}), InvalidBlockError, "True"),
    ("prefix-relocate-not-a-dict", lambda m: m.prefix.relocate([(0, 9)]), InvalidBlockError, "list"),
    ("prefix-relocate-two-to-one", lambda m: m.prefix.relocate({0: 9, 1: 9}), InvalidBlockError, "9"),
    ("prefix-index-block-size", lambda m: PrefixIndex(m.pool, 0), InvalidBlockError, "block_size"),
    ("prefix-index-pool", lambda m: PrefixIndex("pool", 4), InvalidBlockError, "str"),
    # ---------------------------------------------------------------- BlockManager
    ("add-duplicate", lambda m: m.add_sequence("a", [1]), SequenceError, "'a'"),
    ("add-unhashable", lambda m: m.add_sequence(["x"], [1]), SequenceError, "['x']"),
    ("add-none-token", lambda m: m.add_sequence("n", [1, None]), SequenceError, "None"),
    ("add-float-token", lambda m: m.add_sequence("n", [1, 2.5]), SequenceError, "2.5"),
    ("add-bool-token", lambda m: m.add_sequence("n", [1, True]), SequenceError, "prompt_token_ids[1]"),
    ("add-negative-token", lambda m: m.add_sequence("n", [-1]), SequenceError, "-1"),
    ("add-huge-token", lambda m: m.add_sequence("n", [2**63]), SequenceError, str(2**63)),
    ("add-string-prompt", lambda m: m.add_sequence("n", "abc"), SequenceError, "'abc'"),
    ("add-scalar-prompt", lambda m: m.add_sequence("n", 5), SequenceError, "5"),
    ("add-float-array-prompt", lambda m: m.add_sequence("n", np.array([1.5])), SequenceError, "float64"),
    ("add-uint64-prompt", lambda m: m.add_sequence("n", np.array([2**64 - 1], dtype=np.uint64)), SequenceError,
     str(2**64 - 1)),
    ("add-more-than-prompt", lambda m: m.add_sequence("n", [1, 2], num_tokens=3), SequenceError, "num_tokens=3"),
    ("add-negative-count", lambda m: m.add_sequence("n", num_tokens=-1), SequenceError, "-1"),
    ("add-float-count", lambda m: m.add_sequence("n", num_tokens=2.0), SequenceError, "2.0"),
    ("add-bool-count", lambda m: m.add_sequence("n", num_tokens=True), SequenceError, "True"),
    ("add-too-long", lambda m: m.add_sequence("n", num_tokens=1000), OutOfBlocksError, "1000 tokens"),
    ("append-negative", lambda m: m.append_tokens("a", -1), SequenceError, "-1"),
    ("append-float", lambda m: m.append_tokens("a", 1.0), SequenceError, "1.0"),
    ("append-bool", lambda m: m.append_tokens("a", True), SequenceError, "True"),
    ("append-huge", lambda m: m.append_tokens("a", 2**70), SequenceError, str(2**70)),
    ("append-more-than-the-pool", lambda m: m.append_tokens("a", 10**6), OutOfBlocksError, "1000000 tokens"),
    ("append-ids-mismatch", lambda m: m.append_tokens("a", 2, [1]), SequenceError, "1 token_ids"),
    ("append-none-id", lambda m: m.append_tokens("a", 1, [None]), SequenceError, "None"),
    ("append-unknown", lambda m: m.append_tokens("zz", 1), SequenceError, "'zz'"),
    ("append-pending-with-ids", lambda m: m.append_tokens("p", 1, [3]), SequenceError, "pending"),
    ("append-token-negative", lambda m: m.append_token("a", -1), SequenceError, "token_id"),
    ("append-token-float", lambda m: m.append_token("a", 2.5), SequenceError, "2.5"),
    ("append-token-bool", lambda m: m.append_token("a", True), SequenceError, "True"),
    ("batch-duplicate", lambda m: m.append_tokens_batch(["a", "c", "a"], 1), SequenceError, "'a'"),
    ("batch-none-id", lambda m: m.append_tokens_batch(["a", "b"], 1, [1, None]), SequenceError, "None"),
    ("batch-str-id", lambda m: m.append_tokens_batch(["a", "b"], 1, [1, "x"]), SequenceError, "'x'"),
    ("batch-huge-id", lambda m: m.append_tokens_batch(["a", "b"], 1, [1, 2**70]), SequenceError, str(2**70)),
    ("batch-float-id", lambda m: m.append_tokens_batch(["a", "b"], 1, [1, 2.5]), SequenceError, "2.5"),
    ("batch-bool-id", lambda m: m.append_tokens_batch(["a", "b"], 1, [1, True]), SequenceError, "token_ids[1]"),
    ("batch-negative-array", lambda m: m.append_tokens_batch(["a", "b"], 1, np.array([1, -2])), SequenceError,
     "-2"),
    ("batch-float-array", lambda m: m.append_tokens_batch(["a", "b"], 1, np.array([1.5, 2.0])), SequenceError,
     "float64"),
    ("batch-bool-count", lambda m: m.append_tokens_batch(["a", "b"], [1, True]), SequenceError,
     "num_tokens[1]"),
    ("batch-negative-count", lambda m: m.append_tokens_batch(["a", "b"], [1, -1]), SequenceError, "-1"),
    ("batch-count-length", lambda m: m.append_tokens_batch(["a", "b"], [1]), SequenceError, "one per sequence"),
    ("batch-float-count", lambda m: m.append_tokens_batch(["a", "b"], 1.0), SequenceError, "1.0"),
    ("batch-string-ids", lambda m: m.append_tokens_batch("ab", 1), SequenceError, "'ab'"),
    ("batch-unknown", lambda m: m.append_tokens_batch(["a", "zz"], 1), SequenceError, "'zz'"),
    ("batch-pending-with-ids", lambda m: m.append_tokens_batch(["a", "p"], 1, [1, 2]), SequenceError, "'p'"),
    ("batch-more-than-the-pool", lambda m: m.append_tokens_batch(["a", "b"], [2**61, 2**61]), OutOfBlocksError,
     "the batch"),
    ("fork-existing-child", lambda m: m.fork("a", "b"), SequenceError, "'b'"),
    ("fork-unknown-parent", lambda m: m.fork("zz", "n"), SequenceError, "'zz'"),
    ("fork-unhashable-child", lambda m: m.fork("a", ["x"]), SequenceError, "['x']"),
    ("free-unknown-sequence", lambda m: m.free_sequence("zz"), SequenceError, "'zz'"),
    ("position-negative", lambda m: m.get_block_for_position("a", -1), SequenceError, "-1"),
    ("position-past-end", lambda m: m.get_block_for_position("a", 9), SequenceError, "position 9"),
    ("position-float", lambda m: m.get_block_for_position("a", 1.0), SequenceError, "1.0"),
    ("position-bool", lambda m: m.get_block_for_position("a", True), SequenceError, "True"),
    ("token-ids-unhashable", lambda m: m.token_ids(["x"]), SequenceError, "['x']"),
    ("contains-unhashable", lambda m: ["x"] in m, SequenceError, "['x']"),
    ("blocks-for-tokens-float", lambda m: blocks_for_tokens(2.5, 4), SequenceError, "2.5"),
    ("blocks-for-tokens-zero-size", lambda m: blocks_for_tokens(8, 0), SequenceError, "block_size"),
    ("view-width-multiple-zero", lambda m: m.step_view(["a"], 1, width_multiple=0), SequenceError,
     "width_multiple"),
    ("view-width-multiple-bool", lambda m: m.step_view(["a"], 1, width_multiple=True), SequenceError, "True"),
    ("view-width-multiple-huge", lambda m: m.step_view(["a"], 1, width_multiple=2**17), SequenceError,
     str(2**17)),
    ("view-bool-count", lambda m: m.step_view(["a"], [True]), SequenceError, "True"),
    ("view-count-past-end", lambda m: m.step_view(["a"], 100), SequenceError, "num_new_tokens=100"),
    ("table-width-negative", lambda m: m.block_table_array(["a"], -1), SequenceError, "-1"),
    ("table-width-bool", lambda m: m.block_table_array(["a"], True), SequenceError, "True"),
    ("table-width-narrow", lambda m: m.block_table_array(["a"], 2), SequenceError, "width=2"),
    ("table-width-float", lambda m: m.block_table_array(["a"], 2.5), SequenceError, "2.5"),
    ("table-width-huge", lambda m: m.block_table_array(["a"], 10**9), SequenceError, str(10**9)),
    ("slots-negative", lambda m: m.slot_mapping(["a"], -1), SequenceError, "-1"),
    ("context-lens-string", lambda m: m.context_lens("a"), SequenceError, "'a'"),
    ("needed-negative", lambda m: m.num_blocks_needed(-1), SequenceError, "-1"),
    ("needed-float", lambda m: m.num_blocks_needed(1.5), SequenceError, "1.5"),
    ("needed-none-token", lambda m: m.num_blocks_needed(2, [1, None]), SequenceError, "None"),
    ("needed-more-than-prompt", lambda m: m.num_blocks_needed(8, [1] * 4), SequenceError, "num_tokens=8"),
    ("can-add-bool", lambda m: m.can_add_sequence(True), SequenceError, "True"),
    ("plan-keep-negative", lambda m: m.plan_compaction(keep_blocks=-1), InvalidBlockError, "-1"),
    ("plan-keep-float", lambda m: m.plan_compaction(keep_blocks=1.5), InvalidBlockError, "1.5"),
    ("apply-not-a-plan", lambda m: m.apply_compaction("plan"), InvalidBlockError, "str"),
    ("apply-move-to-held", lambda m: m.apply_compaction(CompactionPlan([(5, 0)], 5)), InvalidBlockError,
     "0 is held"),
    ("apply-evict-held", lambda m: m.apply_compaction(CompactionPlan([], 6, [0])), InvalidBlockError, "block 0"),
    ("apply-evicted-str", lambda m: m.apply_compaction(CompactionPlan([], 6), evicted="no"), InvalidBlockError,
     "evicted"),
    ("apply-bad-second-phase", lambda m: m.apply_compaction(CompactionPlan([(5, 9)], 6, [], [(6, 0)])),
     InvalidBlockError, "0 is held"),
    ("apply-second-phase-onto-first", lambda m: m.apply_compaction(CompactionPlan([(5, 9)], 6, [], [(6, 9)])),
     InvalidBlockError, "9 is held"),
    ("manager-relocate-bool", lambda m: m.relocate([(5, True)]), InvalidBlockError, "True"),
    ("manager-relocate-to-held", lambda m: m.relocate([(5, 9), (4, 3)]), InvalidBlockError, "3 is held"),
    ("manager-block-size", lambda m: BlockManager(8, 0), SequenceError, "block_size"),
    ("manager-block-size-float", lambda m: BlockManager(8, 2.0), SequenceError, "2.0"),
    ("manager-prefix-flag", lambda m: BlockManager(8, 4, enable_prefix_caching="yes"), SequenceError, "'yes'"),
    ("manager-pool", lambda m: BlockManager(8, 4, pool="pool"), InvalidBlockError, "'pool'"),
    # ------------------------------------------------------------ compaction planner and trigger
    ("planner-duplicate", lambda m: plan_compaction([1, 1], 8), InvalidBlockError, "block 1 twice"),
    ("planner-evictable-held", lambda m: plan_compaction([1], 8, evictable=[1]), InvalidBlockError,
     "block 1 that is held"),
    ("planner-evictable-twice", lambda m: plan_compaction([1], 8, evictable=[2, 2]), InvalidBlockError,
     "block 2 twice"),
    ("planner-out-of-range", lambda m: plan_compaction([9], 8), InvalidBlockError, "9"),
    ("planner-bool", lambda m: plan_compaction([True], 8), InvalidBlockError, "True"),
    ("planner-float-id", lambda m: plan_compaction([1.0], 8), InvalidBlockError, "1.0"),
    ("planner-negative-capacity", lambda m: plan_compaction([1], -1), InvalidBlockError, "capacity"),
    ("planner-float-capacity", lambda m: plan_compaction([1], 8.0), InvalidBlockError, "8.0"),
    ("planner-keep-negative", lambda m: plan_compaction([1], 8, keep_blocks=-1), InvalidBlockError, "keep_blocks"),
    ("planner-string", lambda m: plan_compaction("12", 8), InvalidBlockError, "'12'"),
    ("trigger-nan", lambda m: should_compact(math.nan, 0.5, 0.3), ConfigError, "fragmentation"),
    ("trigger-bool", lambda m: should_compact(True, 0.5, 0.3), ConfigError, "True"),
    ("trigger-str-threshold", lambda m: should_compact(0.5, 0.5, "0.3"), ConfigError, "threshold"),
    ("trigger-negative-chunks", lambda m: should_compact(0.5, 0.5, 0.3, releasable_chunks=-1), ConfigError,
     "releasable_chunks"),
]


@pytest.mark.parametrize("call, error, needle", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_is_refused_and_changes_nothing(call, error, needle):
    m = populated()
    before = snapshot(m)
    with pytest.raises(error) as exc:
        call(m)
    assert type(exc.value) is error, f"{type(exc.value).__name__} is not exactly {error.__name__}"
    assert needle in str(exc.value), (needle, str(exc.value))
    assert same(snapshot(m), before)
    m.check_invariants()


def test_the_table_is_large_and_covers_every_part():
    assert len(BAD_CALLS) >= 60 and len({c[0] for c in BAD_CALLS}) == len(BAD_CALLS)
    for part in ("m.pool.", "m.prefix.", "m.add_sequence", "m.append_tokens_batch", "plan_compaction("):
        import inspect
        assert any(part in inspect.getsource(c[1]) for c in BAD_CALLS), part


def test_compaction_planner_errors_are_still_value_errors():
    with pytest.raises(ValueError):
        plan_compaction([1, 1], 8)


# ------------------------------------------------------------- ids handed out are Python ints
def test_numpy_ids_never_reach_the_free_stack_or_the_index():
    pool = BlockPool(6)
    a = pool.allocate(np.int64(3))
    pool.free([np.int64(a[2])])               # a numpy id in a list: the slow path converts it
    pool.free(np.array([a[1]]))
    pool.incref([np.int32(a[0])])
    pool.free([np.int16(a[0]), a[0]])
    assert all(type(b) is int for b in pool.free_blocks())
    assert all(type(b) is int for b in pool.allocate(6))
    pool.check_invariants()

    m = BlockManager(8, 4)
    m.add_sequence("x", [1, 2, 3, 4, 5])
    m.free_sequence("x")                      # block 0 cached, evictable
    m.relocate([(np.int64(0), np.int64(5))])  # numpy ids in the moves
    assert m.prefix.key_of(5) is not None and all(type(b) is int for b in m.pool.evictable_blocks())
    r = m.add_sequence("y", [1, 2, 3, 4, 9])  # hits the moved block
    assert r.block_ids[0] == 5 and all(type(b) is int for b in r.block_ids)
    assert all(type(b) is int for b in m.block_table("y"))
    m.check_invariants()


def test_num_blocks_needed_agrees_with_add_sequence_and_is_never_negative():
    m = BlockManager(16, 4)
    prompt = list(range(1, 14))              # 13 tokens: blocks 0..2 full, cached
    m.add_sequence("a", prompt)
    for n in range(0, 14):
        need = m.num_blocks_needed(n, prompt)
        assert need >= 0
        free = m.pool.num_available_blocks
        m.add_sequence(("b", n), prompt, num_tokens=n)
        assert free - m.pool.num_available_blocks == need, n
        m.free_sequence(("b", n))
    assert m.num_blocks_needed(8, prompt) == 0     # the three cached blocks cover 12 >= 8 tokens
    m.check_invariants()


def test_apply_compaction_refuses_a_plan_whose_later_phase_is_bad():
    m = populated()
    m.free_sequence("c")                       # blocks 3, 4 free: block 5 moves down, 6 and 7 follow
    good = m.plan_compaction()
    assert good.moves == [(5, 3)] and good.cached_moves
    for bad in (good._replace(cached_moves=good.cached_moves + [(12, 13)]),   # 12 is free
                good._replace(cached_moves=[(7, 3)]),                         # 3 is taken by phase 1
                good._replace(evict=[6], cached_moves=[(6, 4)])):             # 6 is evicted first
        before = snapshot(m)
        with pytest.raises(InvalidBlockError):
            m.apply_compaction(bad)
        assert same(snapshot(m), before)
    m.apply_compaction(good)                   # the plan itself still applies
    assert m.block_table("p") == [3]
    m.check_invariants()


# ----------------------------------------------------------- random valid and invalid calls
BAD_COUNTS = [-1, 2.5, True, None, "1", np.float64(1.0), 2**70, ["x"]]
BAD_TOKENS = [[None], ["x"], [2**70], [2.5], [-1], [True], "ab", 5, np.array([0.5])]
BAD_TOKEN_VALUES = [None, "x", 2**70, 2.5, -1, True, np.float64(3.0), [1]]
BAD_BLOCKS = [-1, 10**6, True, 1.5, None, "0"]


class ValidThenInvalid(RuleBasedStateMachine):
    """Random valid calls (which must succeed or be refused as out of blocks) and random
    invalid ones (which must be refused, changing nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(12, 4, capacity=10)
        self.next_id = 0

    def _ids(self):
        return self.m.seq_ids

    def _refused(self, call, errors=KVForgeError) -> None:
        before = snapshot(self.m)
        with pytest.raises(errors):
            call()
        assert same(snapshot(self.m), before)
        self.m.check_invariants()

    # ------------------------------------------------------------------ valid
    @rule(prompt=st.lists(st.integers(0, 2), max_size=10), salt=st.sampled_from([None, "t"]))
    def add(self, prompt, salt) -> None:
        sid, self.next_id = self.next_id, self.next_id + 1
        if self.m.can_add_sequence(len(prompt), prompt, salt):
            self.m.add_sequence(sid, prompt, salt)
        else:
            self._refused(lambda: self.m.add_sequence(sid, prompt, salt), OutOfBlocksError)

    @precondition(lambda self: self.m.seq_ids)
    @rule(data=st.data(), with_ids=st.booleans())
    def append_batch(self, data, with_ids) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._ids()), unique=True, min_size=1))
        pending = any(self.m.num_pending_tokens(s) for s in ids)
        tokens = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids))) \
            if with_ids and not pending else None
        try:
            self.m.append_tokens_batch(ids, 1, tokens)
        except OutOfBlocksError:
            pass
        self.m.take_pending_copies()

    @precondition(lambda self: self.m.seq_ids)
    @rule(data=st.data())
    def fork_or_free(self, data) -> None:
        sid = data.draw(st.sampled_from(self._ids()))
        if data.draw(st.booleans()):
            self.m.fork(sid, self.next_id)
            self.next_id += 1
        else:
            self.m.free_sequence(sid)

    @rule()
    def compact(self) -> None:
        self.m.apply_compaction(self.m.plan_compaction())

    # ---------------------------------------------------------------- invalid
    @rule(data=st.data())
    def invalid(self, data) -> None:
        m = self.m
        live = self._ids()
        sid = data.draw(st.sampled_from(live)) if live else "missing"
        count = data.draw(st.sampled_from(BAD_COUNTS))
        bad_or_none = -1 if count is None else count  # for arguments where None means "default"
        tokens = data.draw(st.sampled_from(BAD_TOKENS))
        bad_token = data.draw(st.sampled_from(BAD_TOKEN_VALUES))
        block = data.draw(st.sampled_from(BAD_BLOCKS))
        free_id = m.pool.free_blocks()[0] if m.pool.free_blocks() else 0
        calls = [
            lambda: m.append_tokens(sid, count),
            lambda: m.append_tokens(sid, 1, tokens),
            lambda: m.append_tokens_batch(live + ["missing"], 1),
            lambda: m.append_tokens_batch(live + live[:1], 1) if live else m.free_sequence("missing"),
            lambda: m.append_tokens_batch(live, 1, [0] * (len(live) - 1) + [bad_token]) if live else
            m.add_sequence("new", tokens),
            lambda: m.append_tokens_batch(live, [1] * (len(live) - 1) + [count]) if live else m.pool.grow(count),
            lambda: m.add_sequence("new", tokens),
            lambda: m.add_sequence("new", [0, 1], num_tokens=bad_or_none),
            lambda: m.num_blocks_needed(count),
            lambda: m.step_view(live, count),
            lambda: m.block_table_array(live, bad_or_none),
            lambda: m.get_block_for_position(sid, count),
            lambda: m.pool.free([block]),
            lambda: m.pool.free([free_id]) if m.pool.ref_count(free_id) == 0 else m.pool.free([block]),
            lambda: m.pool.incref([block]),
            lambda: m.pool.ref_count(block),
            lambda: m.pool.unmark_cached(block),
            lambda: m.pool.evict_blocks([block]),
            lambda: m.pool.grow(count),
            lambda: m.pool.shrink(count),
            lambda: m.pool.allocate(count),
            lambda: m.relocate([(0, block)]),
            lambda: m.prefix.block_keys(tokens),
            lambda: m.plan_compaction(keep_blocks=bad_or_none),
        ]
        self._refused(data.draw(st.sampled_from(calls)))

    @invariant()
    def consistent(self) -> None:
        self.m.check_invariants()


TestValidThenInvalid = ValidThenInvalid.TestCase
TestValidThenInvalid.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
