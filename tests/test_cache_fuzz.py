"""Hypothesis state machine over a real KVCache: add / append / fork / free / evict / compact.

Every token's keys/values are a function of its whole prefix, so prefix
reuse, copy-on-write and compaction can all be checked by content.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvforge.errors import OutOfBlocksError
from tests.test_compaction import Model, make_cache


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = Model(make_cache(num_blocks=32, chunk_blocks=4, initial_blocks=4))
        self.next_id = 0

    @rule(prompt=st.lists(st.sampled_from([1, 2]), min_size=1, max_size=28))
    def add(self, prompt):
        try:
            self.m.add(self.next_id, prompt)
        except OutOfBlocksError:
            assert self.next_id not in self.m.cache
        self.next_id += 1

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data(), tok=st.sampled_from([1, 2]))
    def append(self, data, tok):
        sid = data.draw(st.sampled_from(sorted(self.m.tokens)))
        n = self.m.cache.seq_len(sid)
        try:
            self.m.append(sid, tok)
        except OutOfBlocksError:
            assert self.m.cache.seq_len(sid) == n

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.m.tokens)))
        self.m.fork(sid, self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def free(self, data):
        self.m.free(data.draw(st.sampled_from(sorted(self.m.tokens))))

    @rule()
    def evict(self):
        self.m.cache.reclaim_unused_blocks()

    @rule()
    def compact(self):
        self.m.cache.compact_cache()
        assert self.m.cache.fragmentation_ratio() == 0.0

    @invariant()
    def consistent(self):
        self.m.cache.check_invariants()
        self.m.verify()


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
