"""The host tier never loses data: random operations while a tier copy fails at a random call.

A real :class:`KVCache` (CPU, torch kernels) with a tiny device pool, so that
cached blocks are evicted and spill to a host tier of a few blocks, prefix
caching, forks, swaps and (on some runs) compaction. Keys and values are a
function of the token prefix (as in ``tests/test_faults.py``), so every block
has one right content. ``HostStorage.to_host`` / ``HostStorage.to_device``
and ``DeviceStorage.copy_blocks`` are made to raise at a chosen call. After
every operation, failed or not: every running sequence reads back
bit-identical, every swapped sequence's host and device blocks hold its keys
and values (and read back bit-identical once swapped in), every host-only
prefix block and every host copy holds the bytes of its key, no spill is left
queued, the invariants hold, and a failed swap changed nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import CacheConfig, KVCache
from kvforge.core.keys import root_key
from kvforge.errors import OutOfBlocksError
from kvforge.storage.device import DeviceStorage
from kvforge.storage.host import HostStorage
from tests.test_faults import BS, DIM, LAYERS, InjectedFault, kv_of  # the same data model


def as_block(kv: np.ndarray) -> torch.Tensor:
    """``[n, LAYERS, 2, heads, DIM]`` -> the block layout ``[LAYERS, 2, n, heads, DIM]``."""
    return torch.from_numpy(kv.transpose(1, 2, 0, 3, 4).copy())


class Faults:
    """Counts the calls of the patched copies and makes call ``fail_at`` raise."""

    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.only: str | None = None  # count (and fail) only the calls of this kind; None: every call
        self.calls = 0
        self.faults: list[str] = []  # kinds of the injected faults, in order

    def inject(self, kind: str, real: Callable[..., Any], *args: Any) -> Any:
        if self.only is not None and kind != self.only:
            return real(*args)
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            self.faults.append(kind)
            raise InjectedFault(f"{kind} call #{self.calls} failed")
        return real(*args)

    def fail_next(self) -> None:
        """Make the very next patched call raise."""
        self.fail_at = self.calls + 1


KINDS = {"to_host": (HostStorage, "to_host"), "to_device": (HostStorage, "to_device"),
         "copy_blocks": (DeviceStorage, "copy_blocks")}


@contextlib.contextmanager
def faulty_copies(kinds: tuple[str, ...] = tuple(KINDS)) -> Iterator[Faults]:
    """Patch the tier copies (and the device block copy) for the duration; build the
    cache inside the context (that works whether or not the cache binds the copies
    into its manager when it is built)."""
    faults = Faults()
    saved = []
    for kind in kinds:
        owner, name = KINDS[kind]
        real = getattr(owner, name)
        saved.append((owner, name, real))

        def patched(self: Any, *args: Any, _kind: str = kind, _real: Any = real) -> Any:
            return faults.inject(_kind, _real, self, *args)

        setattr(owner, name, patched)
    try:
        yield faults
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)


class Harness:
    """A cache, the token ids of every sequence (running or swapped) and the fault injector."""

    def __init__(self, *, heads: int = 1, num_blocks: int = 12, host_blocks: int = 8, host_chunk_blocks: int = 3,
                 compaction: bool = False, chunk_blocks: int = 4, initial_blocks: int | None = None) -> None:
        self.heads = heads
        bytes_per_block = LAYERS * 2 * BS * heads * DIM * 4
        cfg = CacheConfig(block_size=BS, num_blocks=num_blocks, num_layers=LAYERS, num_kv_heads=heads,
                          head_dim=DIM, dtype=torch.float32, device="cpu", chunk_blocks=chunk_blocks,
                          initial_blocks=initial_blocks, enable_compaction=compaction,
                          host_memory=host_blocks * bytes_per_block, host_chunk_blocks=host_chunk_blocks)
        self.cache = KVCache(cfg, backend="torch")
        assert self.cache.host_storage is not None and self.cache.host_storage.num_blocks == host_blocks
        self.tokens: dict[str, list[int]] = {}
        self.key_tokens: dict[Any, list[int]] = {}  # every block key seen -> the token prefix it names
        self.next_id = 0
        self.prompts: list[tuple[int, ...]] = []  # every prompt admitted, in order

    # ------------------------------------------------------------ model
    @property
    def running(self) -> list[str]:
        return sorted(s for s in self.tokens if not self.cache.is_swapped(s))

    @property
    def swapped(self) -> list[str]:
        return sorted(s for s in self.tokens if self.cache.is_swapped(s))

    def write(self, seq: str, start: int) -> None:
        """Compute (write) the keys/values of tokens ``start..`` of ``seq``."""
        toks = self.tokens[seq]
        for i, key in enumerate(self.keys_of(toks)):  # the keys its full blocks may be registered under
            self.key_tokens.setdefault(key, toks[: (i + 1) * BS])
        if start >= len(toks):
            return
        kv = torch.from_numpy(kv_of(toks, self.heads)[start:].copy())
        slots = self.cache.manager.slot_mapping([seq], len(toks) - start)
        for layer in range(LAYERS):
            self.cache.write(layer, slots, kv[:, layer, 0].contiguous(), kv[:, layer, 1].contiguous())

    def device_block(self, b: int) -> torch.Tensor:
        cb = self.cache.chunk_blocks
        return self.cache.chunks[b // cb][:, :, b % cb]

    def keys_of(self, toks: list[int]) -> list[Any]:
        full = len(toks) // BS * BS
        if not full:
            return []
        return self.cache.prefix._keys(np.asarray(toks[:full], dtype=np.int64).tobytes(), root_key(None))

    def snapshot(self) -> dict[str, Any]:
        """Where every sequence is: running (its table) or swapped (its record)."""
        m = self.cache.manager
        out: dict[str, Any] = {}
        for s in self.tokens:
            if self.cache.is_swapped(s):
                rec = m.host.swapped[s]
                out[s] = ("swapped", list(rec.blocks), list(rec.on_host), rec.num_tokens)
            else:
                out[s] = ("running", self.cache.block_table(s), self.cache.seq_len(s))
        return out

    def check(self) -> None:
        cache, m = self.cache, self.cache.manager
        cache.check_invariants()
        assert not m.host._pending, "a spill was left queued after the operation returned"
        assert set(cache.seq_ids) == set(self.running)
        assert set(cache.swapped_seq_ids) == set(self.swapped)
        for seq, toks in self.tokens.items():
            assert cache.seq_len(seq) == len(toks), seq
            want = kv_of(toks, self.heads)
            if cache.is_swapped(seq):  # its blocks hold its keys/values where the record says
                rec = m.host.swapped[seq]
                assert rec.num_tokens == len(toks)
                for i, (b, on_host) in enumerate(zip(rec.blocks, rec.on_host)):
                    held = cache.host_block(b) if on_host else self.device_block(b)
                    part = want[i * BS:(i + 1) * BS]
                    assert torch.equal(held[:, :, :len(part)], as_block(part)), (seq, i, b, on_host)
                continue
            for layer in range(LAYERS):
                k, v = cache.gather(seq, layer)
                assert torch.equal(k, torch.from_numpy(want[:, layer, 0].copy())), (seq, layer, "keys")
                assert torch.equal(v, torch.from_numpy(want[:, layer, 1].copy())), (seq, layer, "values")
        for key, h in m.host._keys.items():  # a host-only prefix block holds the bytes of its key
            toks = self.key_tokens[key]
            assert torch.equal(cache.host_block(h), as_block(kv_of(toks, self.heads)[-BS:])), ("host key", h)
        for d, h in m.host._copy.items():  # a host copy holds what its cached device block holds
            assert torch.equal(cache.host_block(h), self.device_block(d)), ("host copy", d, h)



# prompts share these prefixes (1 to 3 full blocks), so evicted prefixes come back from the host
PREFIXES = [list(range(100, 100 + 2 * BS)), list(range(300, 300 + 3 * BS + 3)), list(range(500, 500 + BS)), []]


def run_op(h: Harness, f: Faults, data: st.DataObject, compaction: bool) -> None:
    ops = ["add", "add", "readd", "readd", "flood", "append", "fork", "free", "free", "swap_out", "swap_in"]
    op = data.draw(st.sampled_from(ops + ["compact"] * compaction))
    if len(h.tokens) >= 4:  # keep blocks turning over: freed prefixes are evicted, spill, and come back
        op = data.draw(st.sampled_from(["free", "swap_out", "swap_in", "flood"]))
    cache = h.cache
    running, swapped = h.running, h.swapped
    if op == "flood":  # a long one-off request passes through: the device evicts (spills) what it must
        seq = f"s{h.next_id}"
        h.next_id += 1
        room = cache.num_available_blocks
        if not room:
            return
        # no prompt ids: nothing of it is cached, so it pushes the prefixes out without replacing them
        cache.add_sequence(seq, num_tokens=data.draw(st.integers(1, room)) * BS)
        cache.free_sequence(seq)
    elif op in ("add", "readd") or not h.tokens:
        if op == "readd" and h.prompts:  # a prompt seen before: its blocks may wait on either tier
            prompt = list(data.draw(st.sampled_from(h.prompts)))
        else:
            prompt = data.draw(st.sampled_from(PREFIXES)) + data.draw(st.lists(st.integers(0, 50), min_size=1,
                                                                               max_size=12))
        seq = f"s{h.next_id}"
        h.next_id += 1
        plan = cache.manager._plan_admission(None, prompt, None)  # what the admission will find
        before = (len(f.faults), cache.host_stats())
        try:
            r = cache.add_sequence(seq, prompt)
        except OutOfBlocksError:
            return
        onboard_failed = "to_device" in f.faults[before[0]:]
        stats = cache.host_stats()
        if onboard_failed:  # admitted all the same; only the device hits count as cached
            assert r.num_cached_tokens == len(plan.hits) * BS
            assert stats.failed_copies > before[1].failed_copies
        else:
            assert r.num_cached_tokens == (len(plan.hits) + len(plan.host_hits)) * BS
            assert stats.onboarded_blocks == before[1].onboarded_blocks + len(plan.host_hits)
        h.tokens[seq] = prompt
        h.prompts.append(tuple(prompt))
        h.write(seq, r.num_cached_tokens)
    elif op == "append" and running:
        seqs = data.draw(st.lists(st.sampled_from(running), min_size=1, max_size=len(running), unique=True))
        new = [data.draw(st.integers(0, 50)) for _ in seqs]
        before = h.snapshot()
        try:
            cache.append_tokens_batch(seqs, 1, new)
        except (OutOfBlocksError, InjectedFault):
            assert h.snapshot() == before  # all or nothing
            return
        for s, t in zip(seqs, new):
            h.tokens[s].append(t)
            h.write(s, len(h.tokens[s]) - 1)
    elif op == "fork" and running:
        parent = data.draw(st.sampled_from(running))
        child = f"s{h.next_id}"
        h.next_id += 1
        cache.fork(parent, child)
        h.tokens[child] = list(h.tokens[parent])
    elif op == "free":
        seq = data.draw(st.sampled_from(sorted(h.tokens)))
        cache.free_sequence(seq)
        del h.tokens[seq]
    elif op == "swap_out" and running:
        seqs = data.draw(st.lists(st.sampled_from(running), min_size=1, max_size=3, unique=True))
        before = h.snapshot()
        try:
            cache.swap_out(seqs)
        except (OutOfBlocksError, InjectedFault) as exc:
            assert h.snapshot() == before, f"a failed swap_out ({exc}) changed the placement"
            return
        after = h.snapshot()
        assert all(cache.is_swapped(s) for s in seqs)
        assert {s: v for s, v in after.items() if v[0] == "running"} == \
            {s: v for s, v in before.items() if v[0] == "running" and s not in seqs}
    elif op == "swap_in" and swapped:
        seqs = data.draw(st.lists(st.sampled_from(swapped), min_size=1, max_size=3, unique=True))
        before = h.snapshot()
        try:
            cache.swap_in(seqs)
        except (OutOfBlocksError, InjectedFault) as exc:
            assert h.snapshot() == before, f"a failed swap_in ({exc}) changed the placement"
            return
        assert not any(cache.is_swapped(s) for s in seqs)
    elif op == "compact":
        try:
            cache.compact_cache(keep_cached=data.draw(st.booleans()))
        except InjectedFault:
            pass


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), heads=st.sampled_from([1, 2]), host_blocks=st.sampled_from([3, 8, 16]),
       compaction=st.booleans(), inject=st.sampled_from(["none", "any", *KINDS]))
def test_random_operations_with_failing_tier_copies_lose_nothing(data: st.DataObject, heads: int, host_blocks: int,
                                                                compaction: bool, inject: str) -> None:
    with faulty_copies() as f:
        f.only = inject if inject in KINDS else None
        h = Harness(heads=heads, num_blocks=8, host_blocks=host_blocks, compaction=compaction,
                    initial_blocks=4 if compaction else None)
        h.check()
        for _ in range(data.draw(st.integers(5, 40))):
            if inject != "none" and (f.fail_at is None or f.calls >= f.fail_at):
                f.fail_at = f.calls + data.draw(st.integers(1, 4))  # the next failure, a few copies on
            run_op(h, f, data, compaction)
            h.check()
        # without faults, every swapped sequence comes back bit-exact (freeing running ones for room)
        f.fail_at = None
        while h.swapped:
            try:
                h.cache.swap_in(h.swapped[:1])
            except OutOfBlocksError:
                victim = h.running[0]
                h.cache.free_sequence(victim)
                del h.tokens[victim]
            h.check()
        if compaction:
            h.cache.compact_cache()
            h.check()


# ---------------------------------------------------------------- explicit cases
def filled(h: Harness, seq: str, tokens: list[int]) -> int:
    """Add ``seq`` and compute what the cache did not have; return its cached tokens."""
    r = h.cache.add_sequence(seq, tokens)
    h.tokens[seq] = list(tokens)
    h.write(seq, r.num_cached_tokens)
    return r.num_cached_tokens


P = list(range(1000, 1000 + 3 * BS + 3))  # 3 full blocks and a partial one


def test_a_prefix_hit_on_the_host_returns_the_exact_spilled_bytes() -> None:
    h = Harness(num_blocks=8, host_blocks=8)
    cache = h.cache
    filled(h, "a", P)
    spilled = [h.device_block(b).clone() for b in cache.block_table("a")[:3]]
    keys = h.keys_of(P)
    cache.free_sequence("a")
    del h.tokens["a"]
    filled(h, "b", list(range(2000, 2000 + 7 * BS + 4)))  # 8 blocks: evicts a's three cached ones
    h.check()
    st_ = cache.host_stats()
    assert (st_.spilled_blocks, st_.used_blocks, st_.cached_blocks) == (3, 3, 3)
    for key, want in zip(keys, spilled):
        hb = cache.manager.host.host_block(key)
        assert hb is not None and torch.equal(cache.host_block(hb), want)
    cache.free_sequence("b")
    del h.tokens["b"]
    assert filled(h, "a2", P) == 3 * BS  # every full block came back from the host ...
    st_ = cache.host_stats()
    assert (st_.onboarded_blocks, st_.host_hit_tokens) == (3, 3 * BS)
    assert cache.prefix_stats().host_hit_tokens == 3 * BS
    for b, want in zip(cache.block_table("a2")[:3], spilled):  # ... bit-exact, and nothing recomputed it
        assert torch.equal(h.device_block(b), want)
    assert st_.spilled_blocks == 6  # a2's two new blocks and onboarding evicted three of b's: spilled
    assert cache.host_bytes_moved == (6 * cache.config.bytes_per_block, 3 * cache.config.bytes_per_block)
    h.check()


def test_a_failed_onboard_admits_the_sequence_with_only_its_device_hits() -> None:
    with faulty_copies(("to_device",)) as f:
        h = Harness(num_blocks=8, host_blocks=8)
        cache = h.cache
        filled(h, "a", P)
        cache.free_sequence("a")
        del h.tokens["a"]
        filled(h, "b", list(range(2000, 2000 + 5 * BS + 4)))  # 6 blocks: evicts only a's third full block
        assert cache.host_stats().spilled_blocks == 1
        cache.free_sequence("b")
        del h.tokens["b"]
        f.fail_next()
        assert filled(h, "a2", P) == 2 * BS  # the host hit is recomputed, the device hits stay
        assert f.faults == ["to_device"]
        st_ = cache.host_stats()
        assert (st_.onboarded_blocks, st_.failed_copies, st_.host_hit_tokens) == (0, 1, 0)
        h.check()
        cache.free_sequence("a2")  # the recomputed block took the key over: a third admission hits it
        del h.tokens["a2"]
        assert filled(h, "a3", P) == 3 * BS
        h.check()


def test_a_failed_spill_loses_only_the_prefix_entry() -> None:
    with faulty_copies(("to_host",)) as f:
        h = Harness(num_blocks=8, host_blocks=8)
        cache = h.cache
        filled(h, "a", P)
        cache.free_sequence("a")
        del h.tokens["a"]
        f.fail_next()
        filled(h, "b", list(range(2000, 2000 + 7 * BS + 4)))  # the spill of a's blocks raises: b is fine
        assert f.faults == ["to_host"]
        st_ = cache.host_stats()
        assert st_.failed_copies == 1 and st_.cached_blocks == 0
        h.check()
        cache.free_sequence("b")
        del h.tokens["b"]
        assert filled(h, "a2", P) == 0  # recomputed, correctly
        h.check()


def test_a_failed_swap_changes_nothing() -> None:
    with faulty_copies(("to_host", "to_device")) as f:
        h = Harness(num_blocks=8, host_blocks=8)
        cache = h.cache
        filled(h, "a", P)
        filled(h, "b", list(range(3000, 3000 + BS + 2)))
        before, stats, free = h.snapshot(), cache.host_stats(), cache.pool.num_free_blocks
        f.fail_next()
        with pytest.raises(InjectedFault):
            cache.swap_out(["a", "b"])
        assert h.snapshot() == before and cache.pool.num_free_blocks == free
        after = cache.host_stats().to_dict()
        assert after.pop("failed_copies") == 1
        assert {k: v for k, v in stats.to_dict().items() if k != "failed_copies"} == after
        assert cache.manager.host.pool.num_available_blocks == 8
        h.check()
        assert cache.swap_out(["a", "b"]) == 6
        h.check()
        before = h.snapshot()
        f.fail_next()
        with pytest.raises(InjectedFault):
            cache.swap_in(["b", "a"])
        assert h.snapshot() == before and cache.is_swapped("a") and cache.is_swapped("b")
        h.check()
        assert cache.swap_in(["b", "a"]) == 6
        h.check()


def test_swap_out_without_host_room_raises_naming_the_host_tier_and_changes_nothing() -> None:
    h = Harness(num_blocks=8, host_blocks=3)
    cache = h.cache
    filled(h, "a", P)  # 4 blocks > 3 host blocks
    filled(h, "b", list(range(3000, 3000 + 5)))
    before, stats, free = h.snapshot(), cache.host_stats(), cache.pool.num_free_blocks
    with pytest.raises(OutOfBlocksError, match="host tier") as info:
        cache.swap_out(["b", "a"])
    assert (info.value.requested, info.value.available) == (5, 3)
    assert h.snapshot() == before and cache.host_stats() == stats and cache.pool.num_free_blocks == free
    h.check()
    assert cache.swap_out(["b"]) == 1  # a batch that fits goes
    h.check()


def test_drop_cached_blocks_and_reclaim_do_not_spill() -> None:
    h = Harness(num_blocks=8, host_blocks=8)
    cache = h.cache
    filled(h, "a", P)
    table = cache.block_table("a")
    cache.free_sequence("a")
    del h.tokens["a"]
    assert cache.drop_cached_blocks(table) == 3
    filled(h, "c", list(range(4000, 4000 + 2 * BS + 1)))
    cache.free_sequence("c")
    del h.tokens["c"]
    assert cache.reclaim_unused_blocks() == 2
    filled(h, "b", list(range(2000, 2000 + 7 * BS + 4)))  # fills the device: nothing cached to spill
    st_ = cache.host_stats()
    assert (st_.spilled_blocks, st_.used_blocks, st_.cached_blocks) == (0, 0, 0)
    assert cache.host_bytes_moved == (0, 0)
    h.check()
    cache.free_sequence("b")
    del h.tokens["b"]
    assert filled(h, "a2", P) == 0
    h.check()


def test_compaction_with_swapped_sequences_keeps_every_table_right() -> None:
    h = Harness(num_blocks=16, host_blocks=16, compaction=True, chunk_blocks=4)
    cache = h.cache
    for i in range(4):  # fillers take the low ids; freed below, they leave holes to pack into
        filled(h, f"x{i}", list(range(1000 * i, 1000 * i + BS + 3)))
    shared = list(range(9000, 9000 + BS))
    filled(h, "s1", shared + [1, 2, 3])
    filled(h, "s6", shared + [9, 9])  # shares s1's first (cached) block
    cache.fork("s1", "s1-child")
    h.tokens["s1-child"] = list(h.tokens["s1"])
    cache.append_token("s1-child", 7)  # copy-on-write of the shared partial block
    h.tokens["s1-child"].append(7)
    h.write("s1-child", len(h.tokens["s1-child"]) - 1)
    filled(h, "s3", list(range(8000, 8000 + BS + 3)))
    h.check()
    assert cache.swap_out(["s1", "s3"]) == 3  # s1's first block stays (shared), its tail and s3's go
    rec = cache.manager.host.swapped["s1"]
    assert rec.on_host == [False, True]
    for s in ("x0", "x1", "x2", "x3"):
        cache.free_sequence(s)
        del h.tokens[s]
    cache.reclaim_unused_blocks()
    h.check()
    plan = cache.manager.plan_compaction()
    assert rec.blocks[0] in dict(plan.moves)  # the device block the swapped s1 still holds moves
    cache.compact_cache()
    h.check()  # the swapped record follows the move of its device block
    assert rec.blocks[0] == cache.block_table("s6")[0]
    assert cache.pool.high_water_mark() == cache.pool.num_allocated_blocks
    assert cache.swap_in(["s3", "s1"]) == 3
    h.check()
    assert cache.block_table("s1")[0] == cache.block_table("s1-child")[0] == cache.block_table("s6")[0]
