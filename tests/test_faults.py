"""Copies never lose data: random operations while the block copy fails at a random call.

A real :class:`KVCache` (CPU, torch kernels) with a small elastic pool, prefix
caching, forks and compaction. Keys and values are a function of the token
prefix (as a model's are), so sequences sharing a prefix share identical
blocks. The block copy (used by copy-on-write and compaction) is made to raise
at a chosen call; after every operation, failed or not, each live sequence's
keys and values read back bit-identical to the model, the bookkeeping's
invariants hold, and a failed operation changed nothing it promised not to.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import CacheConfig, KVCache
from kvforge.errors import KVForgeError, OutOfBlocksError
from kvforge.storage.device import DeviceStorage

LAYERS, HEADS, DIM, BS = 2, 1, 16, 8


class InjectedFault(RuntimeError):
    """The copy failed (injected)."""


@functools.lru_cache(maxsize=4096)
def _kv(tokens: tuple[int, ...], heads: int) -> np.ndarray:
    out = np.empty((len(tokens), LAYERS, 2, heads, DIM), dtype=np.float32)
    h = hashlib.blake2b(digest_size=8)
    for p, t in enumerate(tokens):
        h.update(int(t).to_bytes(8, "little"))
        seed = int.from_bytes(h.copy().digest(), "little")
        out[p] = np.random.default_rng(seed).standard_normal((LAYERS, 2, heads, DIM), dtype=np.float32)
    out.setflags(write=False)
    return out


def kv_of(tokens: list[int], heads: int = HEADS) -> np.ndarray:
    """Keys/values ``[len, LAYERS, 2, heads, DIM]`` of a token sequence: position p depends on
    tokens[:p+1] (a fresh, writable copy of a cached array)."""
    return _kv(tuple(tokens), heads).copy()


class Harness:
    def __init__(self) -> None:
        cfg = CacheConfig(block_size=BS, num_blocks=24, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                          dtype=torch.float32, device="cpu", initial_blocks=8, chunk_blocks=4,
                          enable_compaction=True)
        self.cache = KVCache(cfg, backend="torch")
        self.tokens: dict[str, list[int]] = {}
        self.next_id = 0
        self.fail_at: int | None = None
        self.copies = 0
        self.faults = 0

    # the fault injector: wraps the real copy, raising at the chosen call
    def copy(self, real, storage, pairs, num_blocks):  # type: ignore[no-untyped-def]
        self.copies += 1
        if self.fail_at is not None and self.copies == self.fail_at:
            self.faults += 1
            raise InjectedFault(f"copy #{self.copies} failed")
        return real(storage, pairs, num_blocks)

    def write(self, seq: str, start: int) -> None:
        """Compute (write) the keys/values of tokens ``start..`` of ``seq``."""
        toks = self.tokens[seq]
        if start >= len(toks):
            return
        kv = torch.from_numpy(kv_of(toks)[start:])
        slots = self.cache.manager.slot_mapping([seq], len(toks) - start)
        for layer in range(LAYERS):
            self.cache.write(layer, slots, kv[:, layer, 0].contiguous(), kv[:, layer, 1].contiguous())

    def check(self) -> None:
        self.cache.check_invariants()
        assert set(self.cache.seq_ids) == set(self.tokens)
        for seq, toks in self.tokens.items():
            assert self.cache.seq_len(seq) == len(toks), seq
            want = kv_of(toks)
            for layer in range(LAYERS):
                k, v = self.cache.gather(seq, layer)
                assert torch.equal(k, torch.from_numpy(want[:, layer, 0])), (seq, layer, "keys")
                assert torch.equal(v, torch.from_numpy(want[:, layer, 1])), (seq, layer, "values")


PREFIXES = [list(range(100, 100 + 2 * BS)), list(range(300, 300 + BS + 3))]


def run_op(h: Harness, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["add", "append", "append", "fork", "free", "compact", "grow"]))
    cache = h.cache
    live = sorted(h.tokens)
    if op == "add" or not live:
        prefix = data.draw(st.sampled_from(PREFIXES + [[]]))
        tail = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=12))
        seq = f"s{h.next_id}"
        h.next_id += 1
        try:
            r = cache.add_sequence(seq, prefix + tail)
        except OutOfBlocksError:
            return
        h.tokens[seq] = prefix + tail
        h.write(seq, r.num_cached_tokens)
    elif op == "append":
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live), unique=True))
        new = [data.draw(st.integers(0, 50)) for _ in seqs]
        before = {s: cache.seq_len(s) for s in seqs}
        try:
            cache.append_tokens_batch(seqs, 1, new)
        except (OutOfBlocksError, InjectedFault):
            assert {s: cache.seq_len(s) for s in seqs} == before  # all or nothing
            return
        for s, t in zip(seqs, new):
            h.tokens[s].append(t)
            h.write(s, len(h.tokens[s]) - 1)
    elif op == "fork":
        parent = data.draw(st.sampled_from(live))
        child = f"s{h.next_id}"
        h.next_id += 1
        cache.fork(parent, child)
        h.tokens[child] = list(h.tokens[parent])
    elif op == "free":
        seq = data.draw(st.sampled_from(live))
        cache.free_sequence(seq)
        del h.tokens[seq]
    elif op == "compact":
        try:
            cache.compact_cache(keep_cached=data.draw(st.booleans()))
        except InjectedFault:
            pass
    elif op == "grow":
        room = cache.config.num_blocks - cache.capacity_blocks
        if room:
            cache.grow(data.draw(st.integers(1, room)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_operations_with_a_failing_copy_lose_nothing(data: st.DataObject) -> None:
    h = Harness()
    real = DeviceStorage.copy_blocks
    DeviceStorage.copy_blocks = lambda self, pairs, n: h.copy(real, self, pairs, n)  # type: ignore[method-assign]
    try:
        for _ in range(data.draw(st.integers(5, 30))):
            if h.fail_at is None or h.copies >= h.fail_at:
                h.fail_at = h.copies + data.draw(st.integers(1, 4))  # the next failure, a few copies on
            run_op(h, data)
            h.check()
        # every example meets a failed copy: a copy-on-write of a shared partial block, at the end
        try:
            h.cache.add_sequence("last", list(range(11)))
        except OutOfBlocksError:
            pass
        else:
            h.tokens["last"] = list(range(11))
            h.write("last", 0)
            h.cache.fork("last", "last-2")
            h.tokens["last-2"] = list(range(11))
            faults, h.fail_at = h.faults, h.copies + 1
            try:
                h.cache.append_token("last-2", 3)
            except OutOfBlocksError:
                pass
            except InjectedFault:
                assert h.faults == faults + 1
            else:
                raise AssertionError("the injected copy failure did not surface")
            h.check()
        # the cache keeps working after the faults: compaction without faults packs and keeps everything
        h.fail_at = None
        h.cache.compact_cache()
        h.check()
    finally:
        DeviceStorage.copy_blocks = real  # type: ignore[method-assign]


def test_a_failed_copy_on_write_leaves_the_child_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    h.tokens["a"] = list(range(11))  # a partial last block, to be shared by the fork
    h.cache.add_sequence("a", h.tokens["a"])
    h.write("a", 0)
    h.cache.fork("a", "b")
    h.tokens["b"] = list(h.tokens["a"])
    table, free = h.cache.block_table("b"), h.cache.pool.num_free_blocks

    def broken(self, pairs, n):  # type: ignore[no-untyped-def]
        raise InjectedFault("copy-on-write copy failed")

    monkeypatch.setattr(DeviceStorage, "copy_blocks", broken)
    with pytest.raises(InjectedFault):
        h.cache.append_token("b", 7)
    assert h.cache.seq_len("b") == 11 and h.cache.block_table("b") == table
    assert h.cache.pool.num_free_blocks == free
    h.check()
    monkeypatch.undo()
    h.cache.append_token("b", 7)       # and it works once the copy does
    h.tokens["b"].append(7)
    h.write("b", 11)
    h.check()


def test_a_failed_cached_block_copy_in_compaction_keeps_live_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase 2 of compaction (cached blocks into ids the live blocks just left) fails."""
    h = Harness()
    for i in range(6):
        seq = f"s{i}"
        h.tokens[seq] = list(range(1000 * i, 1000 * i + 2 * BS))
        h.cache.add_sequence(seq, h.tokens[seq])
        h.write(seq, 0)
    for seq in ("s0", "s2", "s4"):           # cached blocks low, live ones high: both phases move
        h.cache.free_sequence(seq)
        del h.tokens[seq]
    plan = h.cache.manager.plan_compaction()
    assert plan.moves and plan.cached_moves
    calls = {"n": 0}
    real = DeviceStorage.copy_blocks

    def second_fails(self, pairs, n):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise InjectedFault("cached-block copy failed")
        return real(self, pairs, n)

    monkeypatch.setattr(DeviceStorage, "copy_blocks", second_fails)
    with pytest.raises(InjectedFault):
        h.cache.compact_cache()
    h.check()
    # s4's cached prefix (kept, not moved) still hits and its keys/values are right
    h.tokens["again"] = list(range(4000, 4000 + 2 * BS)) + [5]
    r = h.cache.add_sequence("again", h.tokens["again"])
    assert r.num_cached_tokens == 2 * BS
    h.write("again", r.num_cached_tokens)
    h.check()
    with pytest.raises(KVForgeError):
        h.cache.copy_blocks([(0.5, 1)])


@pytest.mark.parametrize("call", [
    lambda c: c.grow(True), lambda c: c.grow(2.5), lambda c: c.grow(-1), lambda c: c.grow("4"),
    lambda c: c.compact_cache(release=1), lambda c: c.compact_cache(keep_cached=None),
    lambda c: c.write(0, [0.0, 1.0], torch.zeros(2, HEADS, DIM), torch.zeros(2, HEADS, DIM)),
    lambda c: c.write(0, [True, False], torch.zeros(2, HEADS, DIM), torch.zeros(2, HEADS, DIM)),
    lambda c: c.write(0, [2**70], torch.zeros(1, HEADS, DIM), torch.zeros(1, HEADS, DIM)),
    lambda c: c.write(LAYERS, [0], torch.zeros(1, HEADS, DIM), torch.zeros(1, HEADS, DIM)),
    lambda c: c.copy_blocks([(1.0, 2.0)]), lambda c: c.copy_blocks([(True, 2)]), lambda c: c.copy_blocks("01"),
    lambda c: c.copy_blocks([(0, 99)]), lambda c: c.layer_view(True), lambda c: c.layer_view(-1),
])
def test_bad_storage_calls_change_nothing(call) -> None:  # type: ignore[no-untyped-def]
    h = Harness()
    h.tokens["a"] = list(range(13))
    h.cache.add_sequence("a", h.tokens["a"])
    h.write("a", 0)
    before = (h.cache.capacity_blocks, h.cache.stats, h.cache.block_table("a"), h.cache.prefix_stats())
    with pytest.raises(KVForgeError):
        call(h.cache)
    assert (h.cache.capacity_blocks, h.cache.stats, h.cache.block_table("a"), h.cache.prefix_stats()) == before
    h.check()
