"""Compaction moves data, rewrites every table and the prefix index, and returns memory."""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from kvforge import CacheConfig, KVCache, plan_compaction
from kvforge.errors import OutOfBlocksError
from kvforge.kernels import reference
from kvforge.storage.device import DeviceStorage


def make_cache(num_blocks: int = 64, chunk_blocks: int = 4, **kw) -> KVCache:
    kw.setdefault("enable_compaction", True)
    cfg = CacheConfig(block_size=8, num_blocks=num_blocks, num_layers=2, num_kv_heads=1, head_dim=16,
                      dtype=torch.float32, device="cpu", chunk_blocks=chunk_blocks, **kw)
    return KVCache(cfg)


def code(tokens: list[int]) -> float:
    """Content of a token's K/V: a function of its whole prefix, like real keys."""
    return float(zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes()) % (1 << 20))


class Model:
    """Drives a cache and remembers every live sequence's tokens."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.tokens: dict[object, list[int]] = {}

    def _write(self, sid: object, start: int, slots: np.ndarray) -> None:
        toks = self.tokens[sid]
        vals = torch.tensor([code(toks[: p + 1]) for p in range(start, start + len(slots))])
        k = vals.view(-1, 1, 1).expand(-1, 1, 16).contiguous()
        for layer in range(2):
            self.cache.write(layer, slots, k, -k)

    def add(self, sid: object, prompt: list[int]) -> None:
        r = self.cache.add_sequence(sid, prompt)
        self.tokens[sid] = list(prompt)
        self._write(sid, r.num_cached_tokens, r.slots)

    def append(self, sid: object, tok: int) -> None:
        slots = self.cache.append_tokens(sid, 1, [tok])
        self.tokens[sid].append(tok)
        self._write(sid, len(self.tokens[sid]) - 1, slots)

    def fork(self, parent: object, child: object) -> None:
        self.cache.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, sid: object) -> None:
        self.cache.free_sequence(sid)
        del self.tokens[sid]

    def verify(self) -> None:
        for sid, toks in self.tokens.items():
            want = torch.tensor([code(toks[: p + 1]) for p in range(len(toks))])
            for layer in range(2):
                k, v = self.cache.gather(sid, layer)
                assert torch.equal(k[:, 0, 0], want), f"sequence {sid} layer {layer}: keys changed"
                assert torch.equal(v[:, 0, 0], -want)


def fragment(m: Model, n: int = 12, keep_every: int = 3) -> None:
    for i in range(n):
        m.add(i, [1000 * i + t for t in range(20)])  # 3 blocks each, distinct content
    for i in range(n):
        if i % keep_every:
            m.free(i)
    m.cache.reclaim_unused_blocks()


def decode_outputs(cache: KVCache, sids: list[object]) -> torch.Tensor:
    q = torch.randn(len(sids), 2, 16, generator=torch.Generator().manual_seed(0))
    return reference.paged_decode_attention(q, *cache.layer_kv(1), cache.block_tables(sids), cache.context_lens(sids))


def test_planner_moves_only_blocks_above_the_line():
    plan = plan_compaction([0, 3, 5, 7], capacity=8)
    assert plan.moves == [(7, 1), (5, 2)] and plan.packed_blocks == 4
    assert plan_compaction([0, 1, 2], 8).moves == []
    assert plan_compaction([], 8).moves == []


def test_should_compact_is_false_on_empty_and_packed_caches():
    cache = make_cache()
    assert cache.fragmentation_ratio() == 0.0 and not cache.should_compact()
    m = Model(cache)
    for i in range(4):
        m.add(i, [100 * i + t for t in range(16)])
    assert cache.fragmentation_ratio() == 0.0 and not cache.should_compact()
    fragment(Model(make_cache()))
    frag = make_cache()
    fragment(Model(frag))
    assert frag.fragmentation_ratio() > 0.3 and frag.memory_efficiency() < 0.7 and frag.should_compact()
    off = make_cache(enable_compaction=False)
    fragment(Model(off))
    assert not off.should_compact()


def test_compaction_keeps_data_and_attention_and_returns_chunks():
    cache = make_cache()
    m = Model(cache)
    fragment(m)
    live = list(m.tokens)
    before = decode_outputs(cache, live)
    bytes_before, chunks_before = cache.storage_bytes, cache.num_chunks
    moved_to: dict[int, int] = {}
    cache.add_relocation_listener(moved_to.update)
    released = cache.compact_cache()
    assert released > 0 and released % (4 * cache.config.bytes_per_block) == 0
    assert cache.storage_bytes == bytes_before - released
    assert cache.num_chunks < chunks_before
    assert cache.fragmentation_ratio() == 0.0 and not cache.should_compact()
    held = sorted(b for s in live for b in cache.block_table(s))
    assert held == list(range(len(held)))  # packed into the lowest ids
    assert moved_to and all(new < old for old, new in moved_to.items())
    m.verify()
    assert torch.equal(decode_outputs(cache, live), before)
    st = cache.stats
    assert st.compaction_count == 1 and st.total_blocks_moved == len(moved_to)
    assert st.total_bytes_returned == released and st.last_compaction_ms > 0
    assert cache.pool.free_blocks()[:3] == sorted(cache.pool.free_blocks())[:3]  # lowest handed out first
    cache.check_invariants()


def test_prefix_index_follows_compaction():
    cache = make_cache()
    m = Model(cache)
    fragment(m, n=9)
    survivor = 6  # kept: its blocks sit high in the pool
    old_table = cache.block_table(survivor)
    m.free(survivor)  # its two full blocks stay cached and evictable; the partial tail is freed
    assert cache.pool.num_evictable_blocks == 2
    cache.compact_cache()
    m.add("again", [1000 * survivor + t for t in range(20)])
    r_cached = cache.block_table("again")[:2]
    assert cache.prefix_stats().hit_tokens >= 16
    assert r_cached != old_table[:2]  # the cached blocks moved, and the index followed
    m.verify()


def test_failed_copy_changes_nothing(monkeypatch):
    cache = make_cache()
    m = Model(cache)
    fragment(m)
    tables = {s: cache.block_table(s) for s in m.tokens}
    stats, nbytes = cache.stats, cache.storage_bytes

    def boom(*a, **k):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr("kvforge.storage.cache.kernels.copy_blocks", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        cache.compact_cache()
    assert {s: cache.block_table(s) for s in m.tokens} == tables
    assert cache.stats == stats and cache.storage_bytes == nbytes
    cache.check_invariants()
    m.verify()
    monkeypatch.undo()
    assert cache.compact_cache() > 0  # still usable
    m.verify()


def test_elastic_pool_grows_on_demand_and_shrinks_after_compaction():
    cache = make_cache(num_blocks=32, chunk_blocks=4, initial_blocks=4)
    assert cache.num_chunks == 1 and cache.capacity_blocks == 4
    m = Model(cache)
    for i in range(6):
        m.add(i, [100 * i + t for t in range(24)])  # 3 blocks each
    assert cache.capacity_blocks >= 18 and cache.num_chunks == cache.capacity_blocks // 4
    for i in range(5):
        m.free(i)
    cache.reclaim_unused_blocks()
    peak_bytes = cache.storage_bytes
    released = cache.compact_cache()
    assert cache.num_chunks == 1 and cache.storage_bytes == peak_bytes - released
    m.verify()
    with pytest.raises(OutOfBlocksError):
        m.add("huge", list(range(8 * 40)))
    cache.check_invariants()


def test_growth_the_device_refuses_raises_and_keeps_the_cache(monkeypatch):
    cache = make_cache(num_blocks=32, chunk_blocks=4, initial_blocks=4)
    m = Model(cache)
    m.add("a", list(range(20)))
    stats, chunks = cache.stats, cache.num_chunks

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DeviceStorage, "_allocate_chunk", oom)
    with pytest.raises(OutOfBlocksError, match="cannot back"):
        m.add("b", list(range(500, 540)))
    assert cache.stats == stats and cache.num_chunks == chunks and "b" not in cache
    cache.check_invariants()
    m.verify()


def test_auto_compact_only_when_asked():
    cache = make_cache(auto_compact=True)
    m = Model(cache)
    assert cache.maybe_compact() == 0
    fragment(m)
    assert cache.maybe_compact() > 0
    m.verify()


def test_long_running_random_workload_with_compaction():
    rng = random.Random(1234)
    cache = make_cache(num_blocks=64, chunk_blocks=4, initial_blocks=8)
    m = Model(cache)
    vocab = [1, 2, 3]
    next_id = 0
    compactions = 0
    for step in range(3000):
        op = rng.random()
        live = list(m.tokens)
        try:
            if op < 0.25 or not live:
                prompt = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
                m.add(next_id, prompt)
                next_id += 1
            elif op < 0.75:
                m.append(rng.choice(live), rng.choice(vocab))
            elif op < 0.82:
                m.fork(rng.choice(live), next_id)
                next_id += 1
            else:
                m.free(rng.choice(live))
        except OutOfBlocksError:
            m.free(rng.choice(live)) if live else None
        cache.check_invariants()
        if cache.should_compact():
            cache.compact_cache()
            compactions += 1
            cache.check_invariants()
            m.verify()
        elif step % 250 == 0:
            m.verify()
    m.verify()
    assert compactions > 0 and cache.stats.compaction_count == compactions


def test_planner_packs_cached_blocks_above_live_ones_and_evicts_those_in_the_way():
    # live 0, 5, 9; cached (oldest first) 1, 7, 8; capacity 12
    plan = plan_compaction([0, 5, 9], 12, evictable=[1, 7, 8])
    assert plan.moves == [(9, 1), (5, 2)]          # live blocks fill 0..2; cached block 1 was in the way
    assert plan.evict == [1]
    assert plan.cached_moves == [(8, 3), (7, 4)]   # the others pack right above the live ones, second phase
    assert plan.packed_blocks == 5 and plan.num_moves == 4
    capped = plan_compaction([0, 5, 9], 12, evictable=[1, 7, 8], keep_blocks=4)
    assert capped.evict == [1, 7] and capped.packed_blocks == 4  # only the most recent one fits


def test_freed_prompts_fragment_the_pool_without_reclaiming_the_cache():
    cache = make_cache()
    m = Model(cache)
    for i in range(12):
        m.add(i, [1000 * i + t for t in range(24)])  # 3 full blocks each: all cached
    for i in range(12):
        if i % 4:
            m.free(i)
    assert cache.pool.num_evictable_blocks == 27
    assert cache.fragmentation_ratio() > 0.3 and cache.should_compact()
    released = cache.compact_cache()
    assert cache.fragmentation_ratio() == 0.0 and not cache.should_compact()
    assert sorted(b for s in m.tokens for b in cache.block_table(s)) == list(range(9))
    # cached blocks sitting where live ones go (ids 3..8 here) are dropped; the other 21 are kept,
    # packed right above the live ones
    assert cache.pool.num_evictable_blocks == 21
    assert cache.pool.high_water_mark() == 9 + 21
    m.verify()
    # and the cached prompts still hit, with the right contents
    m.add("again", [1000 * 5 + t for t in range(24)])
    assert cache.prefix_stats().hit_tokens >= 16
    m.verify()
    released_more = cache.compact_cache(keep_cached=False)
    assert released_more > 0 and cache.pool.num_evictable_blocks < 21
    assert released + released_more > 0
    m.verify()
    cache.check_invariants()


def test_compaction_hands_back_what_should_compact_promised():
    # live blocks 3 and 4, cached blocks 6 and 7, chunks of 4: packing must free the second chunk
    cfg = CacheConfig(block_size=8, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=16,
                      dtype=torch.float32, device="cpu", chunk_blocks=4, enable_compaction=True)
    cache = KVCache(cfg)
    m = Model.__new__(Model)
    m.cache, m.tokens = cache, {}
    for i in range(8):
        cache.add_sequence(i, [10 * i + t for t in range(8)])  # one full, cached block each: block i
    for i in (0, 1, 2, 5):
        cache.free_sequence(i)
    cache.reclaim_unused_blocks()  # 0, 1, 2, 5 free; 6 and 7 become cached only:
    for i in (6, 7):
        cache.free_sequence(i)
    assert cache.pool.evictable_blocks() == [6, 7] and cache.releasable_chunks() == 1
    assert cache.should_compact()
    released = cache.compact_cache()
    assert released == 4 * cfg.bytes_per_block and cache.num_chunks == 1
    assert sorted(cache.block_table(3) + cache.block_table(4)) == [0, 1]
    assert sorted(cache.pool.evictable_blocks()) == [2, 3]
    cache.check_invariants()


def test_refused_operations_do_not_grow_the_pool():
    import numpy as np

    from kvforge.errors import SequenceError

    cache = make_cache(num_blocks=32, chunk_blocks=4, initial_blocks=4)
    cache.add_sequence("a", list(range(30)))  # 4 blocks: the first chunk is full
    chunks = cache.num_chunks
    with pytest.raises(SequenceError):
        cache.add_sequence("a", list(range(30)))
    with pytest.raises(SequenceError):
        cache.append_tokens("a", 2, token_ids=[1])
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence("huge", num_tokens=8 * 40)
    assert cache.num_chunks == chunks
    cache.append_tokens("a", 1)  # fits in the last block's free slot: no growth
    assert cache.num_chunks == chunks
    cache.add_sequence("b", num_tokens=np.int64(40))  # numpy counts grow the pool like ints
    assert cache.num_chunks == chunks + 2
    cache.check_invariants()
