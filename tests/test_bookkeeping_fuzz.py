"""Hypothesis state machines for the bookkeeping layer.

``PoolMachine`` replays random allocate / incref / free / cache / evict / grow /
shrink calls on a BlockPool and on an exact model of its documented policy
(LIFO free stack, LRU evictable queue) and compares ids, orders and counts
after every step.

``ManagerMachine`` drives a BlockManager with prompts drawn from a three-token
vocabulary (so prefixes collide), chunked prompts, appends, batched appends,
reservations of tokens whose ids come later and their commits, truncations,
forks, frees and reclaims. It keeps a fake KV store: the value written at a
token's slot is a hash of the salt and every token up to it, so after every
step each sequence must read back exactly its own values through its block
table. A prefix hit on the wrong block, a missed copy-on-write (a truncation
into a shared block included), a block keyed under ids it no longer holds or
a block shared across salts breaks that check; ``check_invariants`` compares
every sequence's prefix keys with the keys of its known ids after each step,
so reserve + commit must key exactly what an append with ids keys.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvforge.core.manager import BlockManager
from kvforge.errors import InvalidBlockError, OutOfBlocksError, SequenceError
from kvforge.core.pool import BlockPool

SETTINGS = settings(max_examples=200, stateful_step_count=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --------------------------------------------------------------------- pool
MAX_BLOCKS = 24
START_CAPACITY = 16


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(MAX_BLOCKS, capacity=START_CAPACITY)
        self.evicted: list[int] = []
        self.pool.on_evict = self.evicted.append
        # the model
        self.cap = START_CAPACITY
        self.free = list(range(START_CAPACITY - 1, -1, -1))   # a stack: top at the end
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.ref = [0] * MAX_BLOCKS
        self.cached: set[int] = set()
        self.held: list[int] = []                             # one entry per reference
        self.expected_evicted: list[int] = []

    def _evict(self, k: int) -> None:
        for _ in range(k):
            b, _ = self.evictable.popitem(last=False)
            self.cached.discard(b)
            self.free.append(b)
            self.expected_evicted.append(b)

    def _take(self, ids: list[int]) -> None:
        for b in ids:
            self.ref[b] = 1
        self.held.extend(ids)

    @rule(n=st.integers(0, 7))
    def allocate(self, n: int) -> None:
        avail = len(self.free) + len(self.evictable)
        if n > avail:
            with pytest.raises(OutOfBlocksError) as exc:
                self.pool.allocate(n)
            assert (exc.value.requested, exc.value.available) == (n, avail)
            return
        if n > len(self.free):
            self._evict(n - len(self.free))
        cut = len(self.free) - n
        expected = self.free[cut:][::-1]
        del self.free[cut:]
        assert self.pool.allocate(n) == expected
        self._take(expected)

    @rule(n=st.integers(1, 5))
    def allocate_consecutive(self, n: int) -> None:
        ids = sorted(self.free)
        start = next((ids[i] for i in range(len(ids) - n + 1) if ids[i + n - 1] - ids[i] == n - 1), None)
        got = self.pool.allocate_consecutive(n)
        if start is None:
            assert got is None
            return
        run = list(range(start, start + n))
        assert got == run
        self.free = [b for b in self.free if b not in run]
        self._take(run)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        picks = data.draw(st.lists(st.integers(0, len(self.held) - 1), unique=True, min_size=1, max_size=6))
        ids = [self.held[i] for i in picks]
        for i in sorted(picks, reverse=True):
            del self.held[i]
        zero = []
        for b in ids:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                zero.append(b)
        for b in zero:
            if b in self.cached:
                self.evictable[b] = None
            else:
                self.free.append(b)
        assert self.pool.free(ids) == len(zero)

    @precondition(lambda self: self.held or self.evictable)
    @rule(data=st.data())
    def incref(self, data: st.DataObject) -> None:
        choices = sorted(set(self.held) | set(self.evictable))
        ids = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4))
        self.pool.incref(ids)
        for b in ids:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        self.held.extend(ids)

    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        unheld = [b for b in range(MAX_BLOCKS) if self.ref[b] == 0 and b not in self.evictable]
        bad = data.draw(st.sampled_from(unheld + [-1, MAX_BLOCKS, 10**6]))
        good = data.draw(st.lists(st.sampled_from(self.held), max_size=2)) if self.held else []
        ids = good + [bad]
        with pytest.raises(InvalidBlockError):
            if data.draw(st.booleans()):
                self.pool.free(ids)
            else:
                self.pool.incref(ids)
        # the invariant compares everything with the (unchanged) model

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def mark_cached(self, data: st.DataObject) -> None:
        b = data.draw(st.sampled_from(self.held))
        self.pool.mark_cached(b)
        self.cached.add(b)

    @rule()
    def reclaim(self) -> None:
        k = len(self.evictable)
        self._evict(k)
        assert self.pool.reclaim_unused_blocks() == k

    @rule()
    def sort_free_list(self) -> None:
        self.pool.sort_free_list()
        self.free.sort(reverse=True)

    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        new = data.draw(st.integers(self.cap, MAX_BLOCKS))
        self.pool.grow(new)
        self.free[:0] = list(range(new - 1, self.cap - 1, -1))
        self.cap = new

    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        new = data.draw(st.integers(0, self.cap))
        if any(self.ref[b] or b in self.cached for b in range(new, self.cap)):
            with pytest.raises(InvalidBlockError):
                self.pool.shrink(new)
            return
        self.pool.shrink(new)
        self.free = [b for b in self.free if b < new]
        self.cap = new

    @invariant()
    def matches_model(self) -> None:
        pool = self.pool
        pool.check_invariants()
        assert pool.capacity == self.cap
        assert pool.free_blocks() == self.free[::-1]
        assert pool.evictable_blocks() == list(self.evictable)
        assert [pool.ref_count(b) for b in range(MAX_BLOCKS)] == self.ref
        assert {b for b in range(MAX_BLOCKS) if pool.is_cached(b)} == self.cached
        assert self.evicted == self.expected_evicted
        held = sum(1 for r in self.ref if r)
        s = pool.stats
        assert (s.current_allocations, s.free_blocks, s.evictable_blocks) == (held, len(self.free), len(self.evictable))
        top = max((b + 1 for b in range(MAX_BLOCKS) if self.ref[b] or b in self.cached), default=0)
        assert pool.high_water_mark() == top
        # evictable cached blocks count as free for fragmentation: only live blocks trap free ones
        live_top = max((b + 1 for b in range(MAX_BLOCKS) if self.ref[b]), default=0)
        free = self.cap - held
        assert pool.fragmentation_ratio() == ((live_top - held) / free if free else 0.0)


# ------------------------------------------------------------------ manager
NUM_BLOCKS = 20
BS = 4
VOCAB = st.integers(0, 2)


def chain_values(salt, tokens, start_value=None) -> list[int]:
    """The fake K/V of each token: depends on the salt and every token up to it."""
    out, h = [], hash(("root", salt)) if start_value is None else start_value
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


class _Seq:
    __slots__ = ("tokens", "values", "salt", "reserved", "unc")

    def __init__(self, tokens: list[int], salt, reserved: int) -> None:
        self.tokens = tokens          # every known token: reserved ones, then pending prompt tokens
        self.values = chain_values(salt, tokens)
        self.salt = salt
        self.reserved = reserved
        self.unc = 0                  # the last reserved tokens whose ids are not committed yet

    def truncate(self, n: int) -> None:
        self.unc = max(0, self.unc - (self.reserved - n))
        del self.tokens[n:], self.values[n:]
        self.reserved = n

    def extend(self, tokens: list[int]) -> None:
        self.values += chain_values(self.salt, tokens, self.values[-1] if self.values else None)
        self.tokens += tokens


class ManagerMachine(RuleBasedStateMachine):
    PREFIX = True

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=self.PREFIX)
        self.store = np.zeros(NUM_BLOCKS * BS, dtype=object)
        self.seqs: dict[int, _Seq] = {}
        self.next_id = 0
        self.freed: list[int] = []   # ids that may come back (the manager must not confuse them)

    # -- helpers
    def _store_new(self, ids: list, counts: list[int], gens: list, slots, uncommitted: bool = False) -> None:
        """What an append or a reservation did, in the model: carry out the copy-on-write copies
        it queued, then write each sequence's new tokens' values at its slots (reserved ones
        still uncommitted with ``uncommitted``)."""
        for src, dst in self.m.take_pending_copies():
            self.store[dst * BS:(dst + 1) * BS] = self.store[src * BS:(src + 1) * BS]
        i = 0
        for sid, n, gen in zip(ids, counts, gens):
            seq = self.seqs[sid]
            seq.extend(gen)
            self.store[slots[i:i + n]] = seq.values[seq.reserved:seq.reserved + n] if n else []
            seq.reserved += n
            if uncommitted:
                seq.unc += n
            i += n
        assert i == len(slots)

    def _snapshot(self):
        m = self.m
        return (m.seq_ids, {s: (m.block_table(s), m.num_tokens(s), m.num_pending_tokens(s), m.token_ids(s),
                                m.num_uncommitted_tokens(s), m.keyed_blocks(s)) for s in m.seq_ids},
                m.pool.free_blocks(), m.pool.evictable_blocks(),
                [m.pool.ref_count(b) for b in range(NUM_BLOCKS)], m.prefix.num_cached_blocks, len(m.pending_copies),
                [m.prefix.key_of(b) for b in range(NUM_BLOCKS)])

    def _write(self, seq_id: int, start: int, stop: int, slots: np.ndarray) -> None:
        """Apply queued copies, then write the values of tokens start..stop-1 at ``slots``."""
        for src, dst in self.m.take_pending_copies():
            self.store[dst * BS:(dst + 1) * BS] = self.store[src * BS:(src + 1) * BS]
        assert len(slots) == stop - start
        self.store[np.asarray(slots, dtype=np.int64)] = self.seqs[seq_id].values[start:stop] if stop > start else []

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _expect_failure(self, exc_type, call) -> None:
        before = self._snapshot()
        with pytest.raises(exc_type):
            call()
        assert self._snapshot() == before

    # -- rules
    @rule(prompt=st.lists(VOCAB, max_size=14), salt=st.sampled_from([None, None, "t"]),
          mode=st.sampled_from(["prompt", "prompt", "chunk", "bare"]), data=st.data())
    def add(self, prompt, salt, mode, data) -> None:
        sid = self.freed.pop() if self.freed and data.draw(st.booleans()) else self._new_id()
        if mode == "bare":
            ids, num_tokens, salt = None, len(prompt), None
        elif mode == "chunk":
            ids, num_tokens = prompt, data.draw(st.integers(0, len(prompt)))
        else:
            ids, num_tokens = prompt, None
        want = len(prompt) if num_tokens is None else num_tokens
        predicted = self.m.can_add_sequence(want, ids, salt)
        if not predicted:
            self._expect_failure(OutOfBlocksError, lambda: self.m.add_sequence(sid, ids, salt, num_tokens=num_tokens))
            self.freed.append(sid)
            return
        r = self.m.add_sequence(sid, ids, salt, num_tokens=num_tokens)
        seq = _Seq(list(prompt), salt, self.m.num_tokens(sid))
        self.seqs[sid] = seq
        nc = r.num_cached_tokens
        assert nc % BS == 0 and nc <= max(0, len(prompt) - 1)
        if ids is None or not self.PREFIX:
            assert nc == 0
        assert seq.reserved == max(want, nc)
        table = self.m.block_table(sid)
        for p in range(nc):  # reused blocks hold exactly this prompt's values
            assert self.store[table[p // BS] * BS + p % BS] == seq.values[p]
        self._write(sid, nc, seq.reserved, r.slots)
        assert self.m.num_pending_tokens(sid) == (len(prompt) - seq.reserved if ids is not None else 0)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(0, 6), with_ids=st.booleans())
    def append(self, data, n, with_ids) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[sid]
        pending = len(seq.tokens) - seq.reserved
        gen = data.draw(st.lists(VOCAB, min_size=max(0, n - pending), max_size=max(0, n - pending)))
        if seq.unc and n:  # ids still to come: nothing may follow them
            ids = gen if with_ids else None
            self._expect_failure(SequenceError, lambda: self.m.append_tokens(sid, n, token_ids=ids))
            return
        if with_ids and pending and n:
            self._expect_failure(SequenceError, lambda: self.m.append_tokens(sid, n, token_ids=[0] * n))
            return
        try_ids = gen if with_ids else None
        before = self._snapshot()
        try:
            slots = self.m.append_tokens(sid, n, token_ids=try_ids)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return
        seq.extend(gen)
        start = seq.reserved
        seq.reserved += n
        self._write(sid, start, seq.reserved, slots)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), ones=st.booleans())
    def append_batch(self, data, ones) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), unique=True, min_size=1, max_size=6))
        if ones:
            counts = [1] * len(ids)
            with_ids = data.draw(st.booleans())
        else:
            counts = data.draw(st.lists(st.integers(0, 3), min_size=len(ids), max_size=len(ids)))
            with_ids = False
        gens = []
        for sid, n in zip(ids, counts):
            seq = self.seqs[sid]
            pending = len(seq.tokens) - seq.reserved
            k = max(0, n - pending)
            gens.append(data.draw(st.lists(VOCAB, min_size=k, max_size=k)))
        token_ids = None
        if with_ids:
            token_ids = [g[0] if g else self.seqs[s].tokens[self.seqs[s].reserved] for s, g in zip(ids, gens)]
        before = self._snapshot()
        if any(self.seqs[s].unc and n for s, n in zip(ids, counts)):
            with pytest.raises(SequenceError, match="not committed"):
                self.m.append_tokens_batch(ids, counts, token_ids=token_ids)
            assert self._snapshot() == before
            return
        if with_ids and any(len(self.seqs[s].tokens) > self.seqs[s].reserved for s in ids):
            # ids for a row whose prompt is still pending: refused, as append_tokens does
            with pytest.raises(SequenceError, match="pending"):
                self.m.append_tokens_batch(ids, counts, token_ids=token_ids)
            assert self._snapshot() == before
            return
        try:
            slots = self.m.append_tokens_batch(ids, counts, token_ids=token_ids)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return
        self._store_new(ids, counts, gens, slots)
        tables = self.m.block_table_array(ids)   # the same batch again
        assert [tables[j, :len(self.m.block_table(s))].tolist() for j, s in enumerate(ids)] == \
            [self.m.block_table(s) for s in ids]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        if self.seqs[parent].unc:
            self._expect_failure(SequenceError, lambda: self.m.fork(parent, self.next_id))
            return
        child = self._new_id()
        self.m.fork(parent, child)
        p = self.seqs[parent]
        c = _Seq([], p.salt, p.reserved)
        c.tokens, c.values = list(p.tokens), list(p.values)
        self.seqs[child] = c

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), ones=st.booleans())
    def reserve(self, data, ones) -> None:
        """Slots now, ids later: the model knows the ids (it writes their values now)."""
        ids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), unique=True, min_size=1, max_size=5))
        counts = [1] * len(ids) if ones else \
            data.draw(st.lists(st.integers(0, 5), min_size=len(ids), max_size=len(ids)))
        gens = [data.draw(st.lists(VOCAB, min_size=n, max_size=n)) for n in counts]
        before = self._snapshot()
        if any(len(self.seqs[s].tokens) > self.seqs[s].reserved and n for s, n in zip(ids, counts)):
            with pytest.raises(SequenceError, match="pending"):
                self.m.reserve_tokens_batch(ids, 1 if ones else counts)
            assert self._snapshot() == before
            return
        try:
            slots = self.m.reserve_tokens_batch(ids, 1 if ones else counts)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return
        self._store_new(ids, counts, gens, slots, uncommitted=True)

    @precondition(lambda self: any(len(s.tokens) == s.reserved for s in self.seqs.values()))
    @rule(data=st.data())
    def async_step(self, data) -> None:
        """An overlapped decode step: reserve step t + 1's slot of each sequence, then commit
        the ids step t sampled (for those that had one outstanding)."""
        ready = sorted(s for s in self.seqs if len(self.seqs[s].tokens) == self.seqs[s].reserved)
        ids = data.draw(st.lists(st.sampled_from(ready), unique=True, min_size=1, max_size=6))
        gens = [data.draw(VOCAB) for _ in ids]
        before = self._snapshot()
        try:
            slots = self.m.reserve_tokens_batch(ids)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return
        for src, dst in self.m.take_pending_copies():
            self.store[dst * BS:(dst + 1) * BS] = self.store[src * BS:(src + 1) * BS]
        older = [s for s in ids if self.seqs[s].unc]
        for sid, tok, slot in zip(ids, gens, slots.tolist()):
            seq = self.seqs[sid]
            seq.extend([tok])
            self.store[slot] = seq.values[seq.reserved]
            seq.reserved += 1
            seq.unc += 1
        commit = [self.seqs[s].tokens[self.seqs[s].reserved - self.seqs[s].unc] for s in older]
        self.m.commit_token_ids(older, commit)
        for s in older:
            self.seqs[s].unc -= 1

    @precondition(lambda self: any(s.unc for s in self.seqs.values()))
    @rule(data=st.data(), ones=st.booleans(), over=st.integers(0, 5))
    def commit(self, data, ones, over) -> None:
        """The ids of the oldest uncommitted tokens (sometimes one too many: refused)."""
        ids = data.draw(st.lists(st.sampled_from(sorted(s for s in self.seqs if self.seqs[s].unc)),
                                 unique=True, min_size=1, max_size=5))
        counts = [1] * len(ids) if ones else \
            [data.draw(st.integers(0, self.seqs[s].unc)) for s in ids]
        bad = over == 0  # one sequence asked for more than it holds
        if bad:
            j = data.draw(st.integers(0, len(ids) - 1))
            if ones:  # a sequence with none uncommitted joins the batch
                others = [s for s in self.seqs if not self.seqs[s].unc and s not in ids]
                if not others:
                    return
                ids, counts = ids + [others[0]], counts + [1]
            else:
                counts[j] = self.seqs[ids[j]].unc + 1
        token_ids = []
        for sid, k in zip(ids, counts):
            seq = self.seqs[sid]
            start = seq.reserved - seq.unc
            token_ids += (seq.tokens + [0] * k)[start:start + k]
        if bad:
            self._expect_failure(SequenceError, lambda: self.m.commit_token_ids(ids, token_ids, 1 if ones else counts))
            return
        self.m.commit_token_ids(ids, token_ids, 1 if ones else counts)
        for sid, k in zip(ids, counts):
            self.seqs[sid].unc -= k

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[sid]
        n = data.draw(st.integers(0, seq.reserved))
        if len(seq.tokens) > seq.reserved:  # prompt tokens pending
            self._expect_failure(SequenceError, lambda: self.m.truncate(sid, n))
            return
        if data.draw(st.integers(0, 9)) == 0:
            self._expect_failure(SequenceError, lambda: self.m.truncate(sid, seq.reserved + 1))
            return
        self.m.truncate(sid, n)
        seq.truncate(n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate_batch(self, data) -> None:
        """Several truncations in one call (a speculative step's rejections)."""
        ids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), unique=True, min_size=1, max_size=5))
        counts = [data.draw(st.integers(0, self.seqs[s].reserved)) for s in ids]
        if any(len(self.seqs[s].tokens) > self.seqs[s].reserved for s in ids):
            self._expect_failure(SequenceError, lambda: self.m.truncate_batch(ids, counts))
            return
        self.m.truncate_batch(ids, counts)
        for sid, n in zip(ids, counts):
            self.seqs[sid].truncate(n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_sequence(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.m.free_sequence(sid)
        del self.seqs[sid]
        self.freed.append(sid)

    @rule()
    def reclaim(self) -> None:
        k = self.m.pool.num_evictable_blocks
        assert self.m.pool.reclaim_unused_blocks() == k
        assert self.m.prefix.num_cached_blocks == sum(1 for b in range(NUM_BLOCKS) if self.m.pool.ref_count(b)
                                                      and self.m.prefix.key_of(b) is not None)

    @rule()
    def bad_ids(self) -> None:
        self._expect_failure(SequenceError, lambda: self.m.append_tokens(-1, 1))
        if self.seqs:
            sid = min(self.seqs)
            self._expect_failure(SequenceError, lambda: self.m.add_sequence(sid))
            self._expect_failure(SequenceError, lambda: self.m.append_tokens_batch([sid, sid]))

    # -- invariants
    @invariant()
    def consistent(self) -> None:
        m = self.m
        m.check_invariants()
        assert m.pending_copies == []
        ids = sorted(self.seqs)
        assert sorted(m.seq_ids) == ids
        if not ids:
            assert m.pool.num_allocated_blocks == 0
            return
        tables = m.block_table_array(ids)
        lens = m.context_lens(ids)
        all_slots = []
        for i, sid in enumerate(ids):
            seq = self.seqs[sid]
            table = m.block_table(sid)
            assert m.num_tokens(sid) == lens[i] == seq.reserved
            assert len(table) == -(-seq.reserved // BS)
            assert tables[i, :len(table)].tolist() == table and (tables[i, len(table):] == -1).all()
            slots = np.array([table[p // BS] * BS + p % BS for p in range(seq.reserved)], dtype=np.int64)
            assert self.store[slots].tolist() == seq.values[:seq.reserved], f"sequence {sid} reads wrong K/V"
            known = m.token_ids(sid)
            assert known is None or known == seq.tokens, f"sequence {sid} knows the wrong token ids"
            assert m.num_uncommitted_tokens(sid) == seq.unc
            assert not seq.unc or known is None
            all_slots += slots.tolist()
        # a step computing every token of every sequence: the prefill layout
        view = m.step_view(ids, [self.seqs[s].reserved for s in ids], width_multiple=3)
        assert view.positions.tolist() == [p for s in ids for p in range(self.seqs[s].reserved)]
        assert view.slot_mapping.tolist() == all_slots
        assert view.context_lens.tolist() == lens.tolist()
        assert view.block_tables.shape[1] % 3 == 0
        assert view.block_tables[:, :tables.shape[1]].tolist() == tables.tolist()
        if all(m.token_ids(s) is not None or not self.seqs[s].reserved for s in ids):
            assert view.input_ids.tolist() == [t for s in ids for t in self.seqs[s].tokens[:self.seqs[s].reserved]]
        else:
            assert view.input_ids is None
        nonempty = [s for s in ids if self.seqs[s].reserved]
        if nonempty:
            last = m.slot_mapping(nonempty)
            assert last.tolist() == [m.slot_of(s, self.seqs[s].reserved - 1) for s in nonempty]


class ManagerMachineNoPrefix(ManagerMachine):
    PREFIX = False


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = SETTINGS
TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = SETTINGS
TestManagerMachineNoPrefix = ManagerMachineNoPrefix.TestCase
TestManagerMachineNoPrefix.settings = settings(SETTINGS, max_examples=60)
