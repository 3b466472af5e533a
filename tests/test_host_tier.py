"""The host tier's bookkeeping (kvforge.core): spills, onboards, swaps, one LRU across tiers.

A content model stands in for the storage: every device and host block holds
the token ids written into it, and the manager's copy callbacks move them, so
a wrong copy order or a stale placement shows up as a sequence whose blocks
do not hold its tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge.core import BlockManager
from kvforge.errors import OutOfBlocksError, SequenceError

BS = 4


class Contents:
    """What every block holds: ``device[b]`` / ``host[h]`` are lists of ``BS`` token ids (None: unwritten)."""

    def __init__(self, m: BlockManager, fail: set[str] | None = None) -> None:
        self.m = m
        self.device: dict[int, list] = {}
        self.host: dict[int, list] = {}
        self.fail = fail if fail is not None else set()
        self.log: list[tuple[str, list]] = []
        m.copy_to_host = self.to_host
        m.copy_to_device = self.to_device
        m.copy_blocks = self.copy

    def to_host(self, pairs):
        if "d2h" in self.fail:
            raise RuntimeError("injected d2h failure")
        self.log.append(("d2h", list(pairs)))
        for d, h in pairs:
            self.host[h] = list(self.device.get(d, [None] * BS))

    def to_device(self, pairs):
        if "h2d" in self.fail:
            raise RuntimeError("injected h2d failure")
        self.log.append(("h2d", list(pairs)))
        for h, d in pairs:
            self.device[d] = list(self.host[h])

    def copy(self, pairs):
        for s, d in pairs:
            self.device[d] = list(self.device.get(s, [None] * BS))

    def write(self, slots, tokens):
        for s, t in zip(np.asarray(slots).tolist(), tokens):
            self.device.setdefault(s // BS, [None] * BS)[s % BS] = t

    def check(self, seqs: dict) -> None:
        """Every running sequence's blocks hold its tokens; swapped ones' host blocks too."""
        m = self.m
        for sid, toks in seqs.items():
            n = m.num_tokens(sid)
            assert n == len(toks)
            if m.is_swapped(sid):
                rec = m.host.swapped[sid]
                for i, (b, on_host) in enumerate(zip(rec.blocks, rec.on_host)):
                    held = (self.host if on_host else self.device)[b]
                    want = toks[i * BS:(i + 1) * BS]
                    assert held[:len(want)] == want, f"swapped {sid} block {i}"
                continue
            table = m.block_table(sid)
            for i, b in enumerate(table):
                want = toks[i * BS:(i + 1) * BS]
                assert self.device[b][:len(want)] == want, f"{sid} block {i} (device {b})"
        for key, h in m.host._keys.items():  # every host-only key's block holds the tokens it names
            assert h in self.host and None not in self.host[h]
        m.check_invariants()


def manager(num_blocks=8, host=6, **kw):
    m = BlockManager(num_blocks, BS, num_host_blocks=host, **kw)
    return m, Contents(m)


def admit(m, c, sid, prompt, seqs, **kw):
    r = m.add_sequence(sid, prompt, **kw)
    m.flush_spills()
    c.write(r.slots, prompt[r.num_cached_tokens:])
    seqs[sid] = list(prompt)
    return r


A = list(range(100, 117))  # 17 tokens: 4 full blocks keyed, one partial
B = list(range(200, 229))  # 29 tokens: 8 blocks


def test_eviction_spills_and_a_hit_on_the_host_comes_back():
    m, c = manager()
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    m.free_sequence("a"); del seqs["a"]
    admit(m, c, "b", B, seqs)  # evicts a's four cached blocks: spilled, tail first
    assert c.log == [("d2h", [(3, 0), (2, 1), (1, 2), (0, 3)])]
    st = m.host.stats()
    assert (st.spilled_blocks, st.used_blocks, st.cached_blocks) == (4, 4, 4)
    c.check(seqs)
    m.free_sequence("b"); del seqs["b"]
    r = admit(m, c, "a2", A, seqs)
    assert r.num_cached_tokens == 16  # every full block came back from the host
    kind, pairs = c.log[-1]
    assert kind == "h2d" and [h for h, _ in pairs] == [3, 2, 1, 0]
    assert m.prefix.stats().host_hit_tokens == 16 and m.host.stats().onboarded_blocks == 4
    c.check(seqs)


def test_the_host_tier_continues_the_device_lru_and_drops_its_oldest():
    m, c = manager(num_blocks=8, host=4)
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    m.free_sequence("a"); del seqs["a"]
    admit(m, c, "b", B, seqs)  # a's 4 blocks spill and fill the host tier
    m.free_sequence("b"); del seqs["b"]
    admit(m, c, "c", list(range(300, 329)), seqs)  # b's 7 cached blocks spill: a's (oldest) are dropped
    assert m.host.lookup(m.prefix.block_keys(A[:16])) == []
    # b's blocks were evicted tail first, so its first four (the last evicted) are what the host keeps
    assert len(m.host.lookup(m.prefix.block_keys(B[:28]))) == 4
    st = m.host.stats()
    assert (st.spilled_blocks, st.dropped_blocks, st.used_blocks) == (4 + 7, 4 + 3, 4)
    c.check(seqs)


def test_swap_out_and_in_is_bit_exact_and_frees_device_blocks():
    m, c = manager(num_blocks=10, host=10)
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    free_before = m.pool.num_free_blocks
    pairs = m.swap_out(["a"])
    assert len(pairs) == 5 and m.is_swapped("a") and "a" in m
    assert m.pool.num_free_blocks == free_before + 1  # four cached full blocks stay evictable on the device
    assert m.pool.num_allocated_blocks == 0
    with pytest.raises(SequenceError, match="swapped out"):
        m.block_table("a")
    with pytest.raises(SequenceError, match="already exists"):
        m.add_sequence("a", [1, 2])
    c.check(seqs)
    admit(m, c, "x", list(range(500, 540)), seqs)  # takes every device block: a's cached ones reuse their copies
    c.check(seqs)
    m.free_sequence("x"); del seqs["x"]
    m.swap_in(["a"])
    assert not m.is_swapped("a") and m.token_ids("a") == A
    c.check(seqs)
    slots = m.append_tokens("a", 3, [1, 2, 3])
    c.write(slots, [1, 2, 3]); seqs["a"] += [1, 2, 3]
    c.check(seqs)


def test_blocks_shared_with_a_running_sequence_stay_and_forks_come_back_shared():
    m, c = manager(num_blocks=12, host=12)
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    m.fork("a", "b"); seqs["b"] = list(A)
    pairs = m.swap_out(["b"])
    assert pairs == [] and m.host.swapped["b"].on_host == [False] * 5  # all shared with running a
    m.swap_out(["a"])  # now a's blocks move, and b's parked references follow them to the host
    assert all(m.host.swapped["b"].on_host) and all(m.host.swapped["a"].on_host)
    assert m.pool.num_allocated_blocks == 0
    c.check(seqs)
    m.swap_in(["a", "b"])
    assert m.block_table("a") == m.block_table("b")
    assert all(m.pool.ref_count(b) == 2 for b in m.block_table("a"))
    slots = m.append_tokens("b", 1, [7])  # the shared partial tail is copied first
    c.write(slots, [7]); seqs["b"].append(7)
    assert m.block_table("a")[-1] != m.block_table("b")[-1]
    c.check(seqs)


def test_swaps_are_all_or_nothing():
    m, c = manager(num_blocks=12, host=3)
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    with pytest.raises(OutOfBlocksError, match="host tier has 3 available of 3"):
        m.swap_out(["a"])
    assert not m.is_swapped("a") and m.block_table("a")
    with pytest.raises(SequenceError, match="2 times"):
        m.swap_out(["a", "a"])
    with pytest.raises(SequenceError, match="not swapped out"):
        m.swap_in(["a"])
    c.fail.add("d2h")
    m2, c2 = manager(num_blocks=12, host=12)
    s2: dict = {}
    admit(m2, c2, "a", A, s2)
    c2.fail.add("d2h")
    with pytest.raises(RuntimeError, match="injected"):
        m2.swap_out(["a"])
    assert not m2.is_swapped("a") and m2.host.pool.num_allocated_blocks == 0
    c2.check(s2)
    c2.fail.clear()
    m2.swap_out(["a"])
    c2.fail.add("h2d")
    with pytest.raises(RuntimeError, match="injected"):
        m2.swap_in(["a"])
    assert m2.is_swapped("a") and m2.pool.num_allocated_blocks == 0
    c2.fail.clear()
    m2.swap_in(["a"])
    c2.check(s2)


def test_no_host_tier_refuses_swaps_with_a_clear_error():
    m = BlockManager(8, BS)
    m.add_sequence("a", A)
    with pytest.raises(OutOfBlocksError, match="no host tier"):
        m.swap_out(["a"])


def test_failed_onboard_computes_instead_and_failed_spill_loses_only_the_entry():
    m, c = manager()
    seqs: dict = {}
    admit(m, c, "a", A, seqs)
    m.free_sequence("a"); del seqs["a"]
    admit(m, c, "b", B, seqs)
    m.free_sequence("b"); del seqs["b"]
    c.fail.add("h2d")
    r = admit(m, c, "a2", A, seqs)
    assert r.num_cached_tokens == 0 and len(r.slots) == len(A)  # the request goes on, recomputing
    c.fail.clear()
    c.check(seqs)
    m.free_sequence("a2"); del seqs["a2"]
    c.fail.add("d2h")
    admit(m, c, "b2", B, seqs)  # evicts a2's blocks; their spill fails
    assert m.host.stats().failed_copies >= 2
    c.fail.clear()
    c.check(seqs)


ops = st.lists(st.tuples(st.sampled_from(["add", "append", "free", "fork", "out", "in"]),
                         st.integers(0, 5), st.integers(1, 9)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([0, 2, 6, 16]), st.booleans())
def test_random_operations_keep_every_sequence_intact(program, host_blocks, fail_some):
    """Random adds (over shared prefixes), appends, forks, frees and swaps against the content model."""
    m = BlockManager(10, BS, num_host_blocks=host_blocks)
    c = Contents(m)
    seqs: dict = {}
    prefixes = [list(range(1000 * p, 1000 * p + 13)) for p in range(3)]
    n = 0
    for i, (op, k, arg) in enumerate(program):
        if fail_some:
            c.fail = {"d2h"} if i % 5 == 1 else {"h2d"} if i % 7 == 3 else set()
        live = [s for s in seqs if not m.is_swapped(s)]
        swapped = [s for s in seqs if m.is_swapped(s)]
        try:
            if op == "add":
                prompt = prefixes[k % 3][: 4 + arg] + [k]
                n += 1
                admit(m, c, f"s{n}", prompt, seqs)
            elif op == "append" and live:
                sid = live[k % len(live)]
                toks = list(range(arg))
                slots = m.append_tokens(sid, arg, toks)
                m.flush_spills()
                c.write(slots, toks)
                seqs[sid] += toks
            elif op == "free" and seqs:
                sid = list(seqs)[k % len(seqs)]
                m.free_sequence(sid)
                del seqs[sid]
            elif op == "fork" and live:
                n += 1
                m.fork(live[k % len(live)], f"s{n}")
                seqs[f"s{n}"] = list(seqs[live[k % len(live)]])
            elif op == "out" and live and host_blocks:
                m.swap_out(live[k % len(live):][:1 + arg % 2])
            elif op == "in" and swapped:
                m.swap_in(swapped[:1 + arg % 2])
        except (OutOfBlocksError, RuntimeError) as exc:
            assert not isinstance(exc, RuntimeError) or "injected" in str(exc)
        c.fail = set()
        c.check(seqs)
