"""Hypothesis state machine over a real KVCache: add / append / reserve / commit / truncate /
fork / free / evict / compact.

Every token's keys/values are a function of its whole prefix, so prefix
reuse, copy-on-write (after a truncation into a shared block too) and
compaction (with tokens whose ids are not committed yet) can all be checked
by content.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvforge import CacheConfig, KVCache
from kvforge.errors import OutOfBlocksError, SequenceError
from kvforge.storage.pending import PendingMethods
from tests.test_compaction import Model

if issubclass(KVCache, PendingMethods):
    Cache = KVCache
else:  # until storage/cache.py lists the mixin
    class Cache(PendingMethods, KVCache):  # type: ignore[no-redef]
        pass


def make_cache(num_blocks: int, chunk_blocks: int, initial_blocks: int) -> KVCache:
    """``tests.test_compaction.make_cache``'s cache, with the reservation calls."""
    cfg = CacheConfig(block_size=8, num_blocks=num_blocks, num_layers=2, num_kv_heads=1, head_dim=16,
                      dtype=torch.float32, device="cpu", chunk_blocks=chunk_blocks, enable_compaction=True,
                      initial_blocks=initial_blocks)
    return Cache(cfg)


class ReservingModel(Model):
    """:class:`Model` that also reserves slots (the K/V written at once, the ids committed later)
    and truncates; ``unc[sid]``: its last tokens not committed yet."""

    def __init__(self, cache: KVCache) -> None:
        super().__init__(cache)
        self.unc: dict[object, int] = {}

    def add(self, sid: object, prompt: list[int]) -> None:
        super().add(sid, prompt)
        self.unc[sid] = 0

    def fork(self, parent: object, child: object) -> None:
        super().fork(parent, child)
        self.unc[child] = 0

    def free(self, sid: object) -> None:
        super().free(sid)
        del self.unc[sid]

    def reserve(self, sids: list[object], toks: list[int]) -> None:
        slots = self.cache.reserve_tokens_batch(sids)
        for i, (sid, tok) in enumerate(zip(sids, toks)):
            self.tokens[sid].append(tok)
            self.unc[sid] += 1
            self._write(sid, len(self.tokens[sid]) - 1, slots[i:i + 1])

    def commit(self, sid: object, k: int) -> None:
        toks = self.tokens[sid]
        start = len(toks) - self.unc[sid]
        self.cache.commit_token_ids([sid], toks[start:start + k], [k])
        self.unc[sid] -= k

    def truncate(self, sids: list[object], counts: list[int]) -> None:
        if len(sids) == 1:
            self.cache.truncate(sids[0], counts[0])
        else:
            self.cache.truncate_batch(sids, counts)
        for sid, n in zip(sids, counts):
            toks = self.tokens[sid]
            self.unc[sid] = max(0, self.unc[sid] - (len(toks) - n))
            del toks[n:]

    def verify(self) -> None:
        super().verify()
        for sid, toks in self.tokens.items():
            assert self.cache.num_uncommitted_tokens(sid) == self.unc[sid]
            assert self.cache.manager.token_ids(sid) == (None if self.unc[sid] else toks)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = ReservingModel(make_cache(num_blocks=32, chunk_blocks=4, initial_blocks=4))
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
        if self.m.unc[sid]:
            with pytest.raises(SequenceError, match="not committed"):
                self.m.append(sid, tok)
            assert self.m.cache.seq_len(sid) == n
            return
        try:
            self.m.append(sid, tok)
        except OutOfBlocksError:
            assert self.m.cache.seq_len(sid) == n

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.m.tokens)))
        if self.m.unc[sid]:
            with pytest.raises(SequenceError, match="not committed"):
                self.m.fork(sid, self.next_id)
            return
        self.m.fork(sid, self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def reserve(self, data):
        sids = data.draw(st.lists(st.sampled_from(sorted(self.m.tokens)), unique=True, min_size=1, max_size=4))
        toks = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(sids), max_size=len(sids)))
        lens = [self.m.cache.seq_len(s) for s in sids]
        try:
            self.m.reserve(sids, toks)
        except OutOfBlocksError:
            assert [self.m.cache.seq_len(s) for s in sids] == lens

    @precondition(lambda self: any(self.m.unc.values()))
    @rule(data=st.data())
    def commit(self, data):
        sid = data.draw(st.sampled_from(sorted(s for s, k in self.m.unc.items() if k)))
        self.m.commit(sid, data.draw(st.integers(1, self.m.unc[sid])))

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        sids = data.draw(st.lists(st.sampled_from(sorted(self.m.tokens)), unique=True, min_size=1, max_size=3))
        self.m.truncate(sids, [data.draw(st.integers(0, len(self.m.tokens[s]))) for s in sids])

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
