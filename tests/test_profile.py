"""MemoryProfile: every figure measured from the cache's real objects."""
from __future__ import annotations

import json

import pytest
import torch

from kvforge import CacheConfig, KVCache, MemoryProfile


def test_profile_figures_are_exact(capsys):
    cfg = CacheConfig(block_size=8, num_blocks=16, num_layers=2, num_kv_heads=1, head_dim=16,
                      dtype=torch.float32, device="cpu")
    cache = KVCache(cfg)
    cache.add_sequence("a", list(range(20)))    # 3 blocks, 20 tokens
    cache.add_sequence("b", list(range(16)) + [99])  # 17 tokens: reuses a's 2 full blocks, 1 new block
    cache.fork("b", "c")
    p = cache.memory_profile()
    bpt = 2 * 2 * 16 * 4
    assert p.total_bytes == cache.storage_bytes == 16 * 8 * bpt
    assert p.bytes_per_token == bpt and p.bytes_per_block == 8 * bpt
    assert p.physical_blocks == cache.pool.num_allocated_blocks == 4
    assert p.logical_blocks == 3 + 3 + 3
    assert p.used_bytes == 4 * 8 * bpt and p.used_bytes + p.free_bytes == p.total_bytes
    assert p.active_sequences == 3 and p.total_tokens == 20 + 17 + 17
    # distinct token slots holding a token: a's 20 and b's (and c's) 17th
    assert p.live_kv_bytes == cache.live_kv_bytes() == 21 * bpt
    assert p.memory_efficiency == p.efficiency_ratio() == p.live_kv_bytes / p.total_bytes
    assert 0 < p.internal_fragmentation < 1 and p.fragmentation_ratio == 0.0
    assert p.metadata_bytes > 0 and p.prefix_hit_rate > 0
    assert MemoryProfile.format_bytes(3 * 2**30) == "3.00 GiB"
    json.dumps(p.to_dict())
    text = p.report()
    printed = capsys.readouterr().out
    assert printed.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0] == "KV cache memory profile"
    assert len({line.index("  ", 2) for line in lines[2:] if "  " in line}) >= 1
    for label in ("internal fragmentation", "external fragmentation", "memory efficiency", "active sequences"):
        assert label in text
    assert p.report(echo=False) == text and capsys.readouterr().out == ""


@pytest.mark.parametrize("n", [0, 1, 5])
def test_profile_of_an_idle_cache(n):
    cfg = CacheConfig(block_size=8, num_blocks=16, num_layers=1, num_kv_heads=1, head_dim=16, device="cpu")
    cache = KVCache(cfg)
    for i in range(n):
        cache.add_sequence(i, num_tokens=8)
    p = cache.memory_profile()
    assert p.fragmentation_ratio == 0.0 and p.internal_fragmentation == 0.0
    assert p.memory_efficiency == pytest.approx(n / 16)


# ------------------------------------------------------------ the host tier
BPB = 8 * 2 * 2 * 2 * 16 * 4  # block_size 8, 2 layers, K and V, 2 kv heads, head_dim 16, float32: 4 KiB


def _tiered(**kw) -> KVCache:
    """A 4-block device pool and an 8-block host tier allocated 2 blocks at a time."""
    cfg = CacheConfig(block_size=8, num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device="cpu", host_memory="32KiB", host_chunk_blocks=2, **kw)
    return KVCache(cfg, backend="torch")


def _spill_swap_onboard(cache: KVCache) -> None:
    """a's 2 full blocks spill, b (4 blocks) swaps out, c onboards a's prefix from the host."""
    cache.add_sequence("a", list(range(16)))
    cache.free_sequence("a")                          # 2 cached device blocks
    cache.add_sequence("b", list(range(100, 132)))    # the whole pool: a's blocks spill (host 0, 1)
    cache.check_invariants()
    cache.swap_out(["b"])                             # host 2..5; b's device blocks stay cached (copies)
    cache.check_invariants()
    cache.add_sequence("c", list(range(16)) + [5])    # a's 2 blocks onboarded, 1 new; 3 of b's evicted (copies)
    cache.check_invariants()


def test_profile_of_a_host_tier_counts_blocks_bytes_and_moves(capsys):
    cache = _tiered()
    p0 = cache.memory_profile()
    assert p0.has_host_tier and not p0.host_pinned  # CPU: pageable memory
    assert (p0.host_capacity_blocks, p0.host_capacity_bytes, p0.host_allocated_bytes) == (8, 8 * BPB, 0)
    assert (p0.host_used_blocks, p0.host_free_blocks, p0.host_use, p0.device_use) == (0, 8, 0.0, 0.0)

    _spill_swap_onboard(cache)
    p = cache.memory_profile()
    assert cache.config.bytes_per_block == p.bytes_per_block == BPB
    assert p.host_capacity_blocks == 8 and p.host_capacity_bytes == 32 * 1024
    assert p.host_allocated_bytes == 3 * 2 * BPB  # host blocks 0..5 touched: 3 chunks of 2
    # used: b's 4 (referenced) + a's 2 (cached, copies of c's blocks); cached: 3 host-only keys
    # (b's blocks 1..3) + 3 copies (b's block 0, c's 2 onboarded blocks)
    assert (p.host_used_blocks, p.host_cached_blocks, p.host_free_blocks) == (6, 6, 2)
    assert p.host_used_bytes == 6 * BPB and p.host_use == 6 / 8
    assert p.device_use == 4 / 4 and p.swapped_sequences == 1
    assert (p.host_spilled_blocks, p.host_spill_reuses, p.host_dropped_blocks) == (2, 3, 0)
    assert (p.host_onboarded_blocks, p.host_hit_tokens) == (2, 16)
    assert (p.host_swapped_out_blocks, p.host_swapped_in_blocks, p.host_failed_copies) == (4, 0, 0)
    assert (p.host_bytes_to_host, p.host_bytes_to_device) == ((2 + 4) * BPB, 2 * BPB) == cache.host_bytes_moved
    # the device side keeps its meaning: c's 3 blocks, b's block 0 cached
    assert (p.physical_blocks, p.evictable_blocks, p.active_sequences, p.total_tokens) == (3, 1, 1, 17)

    d = p.to_dict()
    json.dumps(d)
    assert d["host_used_blocks"] == 6 and d["host_bytes_to_host"] == 6 * BPB and d["has_host_tier"] is True
    text = p.report(echo=False)
    lines = text.splitlines()
    tail = lines[lines.index(next(x for x in lines if x.startswith("host memory (tier)"))):]
    assert tail == [
        "host memory (tier)            24.00 KiB allocated (pageable), budget 32.00 KiB",
        "host used / free              24.00 KiB / 8.00 KiB",
        "host blocks used / max        6 / 8 of 8 tokens",
        "host cached / free blocks     6 / 2",
        "device / host use             100.0% / 75.0%",
        "swapped sequences             1",
        "spilled / reused / dropped    2 / 3 / 0 blocks",
        "host hits: blocks / tokens    2 / 16",
        "swapped out / in blocks       4 / 0",
        "bytes to host / to device     24.00 KiB / 8.00 KiB",
        "failed tier copies            0",
    ]
    assert lines[: len(lines) - len(tail)] == cache.memory_profile().report(echo=False).splitlines()[: -len(tail)]


def test_profile_counts_swap_in_and_blocks_dropped_from_a_full_host_tier():
    cache = _tiered()
    _spill_swap_onboard(cache)
    cache.free_sequence("c")               # c's 2 full blocks and b's block 0 cached on the device
    assert cache.swap_in(["b"]) == 4       # evicts those 3 (each has a host copy: 3 reuses)
    cache.check_invariants()
    p = cache.memory_profile()
    assert p.swapped_sequences == 0 and (p.host_swapped_out_blocks, p.host_swapped_in_blocks) == (4, 4)
    assert p.host_bytes_to_device == (2 + 4) * BPB and p.host_bytes_to_host == 6 * BPB
    # host: a's 2 blocks host-only again, b's 4 now copies of its device blocks
    assert (p.host_used_blocks, p.host_cached_blocks, p.host_spill_reuses) == (6, 6, 6)
    cache.free_sequence("b")               # b's 4 blocks cached on the device
    expected = [  # (spilled, reused, dropped, host used, host bytes allocated) after each x
        (2, 8, 0, 6, 6 * BPB),             # x0 evicts b's blocks 2, 3: copies exist
        (2, 10, 0, 6, 6 * BPB),            # x1 evicts b's blocks 0, 1: copies exist
        (4, 10, 0, 8, 8 * BPB),            # x2 evicts x0's 2 blocks: spilled into host 6, 7 (the last chunk)
        (6, 10, 2, 8, 8 * BPB),            # x3 evicts x1's 2: the tier is full, a's 2 (the oldest) dropped
    ]
    for i, want in enumerate(expected):
        cache.add_sequence(f"x{i}", list(range(1000 + 100 * i, 1016 + 100 * i)))
        cache.free_sequence(f"x{i}")
        cache.check_invariants()
        p = cache.memory_profile()
        got = (p.host_spilled_blocks, p.host_spill_reuses, p.host_dropped_blocks, p.host_used_blocks,
               p.host_allocated_bytes)
        assert got == want, i
    assert p.host_free_blocks == 0 and p.host_use == 1.0 and p.host_cached_blocks == 8
    assert "spilled / reused / dropped    6 / 10 / 2 blocks" in p.report(echo=False)
    # a's prefix was dropped from the host: asking for it again hits nothing
    cache.add_sequence("a2", list(range(16)))
    assert cache.memory_profile().host_onboarded_blocks == 2 and cache.memory_profile().host_hit_tokens == 16


def test_profile_without_a_host_tier_reports_nothing_new():
    cfg = CacheConfig(block_size=8, num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device="cpu")
    cache = KVCache(cfg, backend="torch")
    cache.add_sequence("a", list(range(20)))
    p = cache.memory_profile()
    assert not p.has_host_tier and p.host_rows() == []
    assert p.device_use == 3 / 4
    host = {k: v for k, v in p.to_dict().items() if k.startswith("host_") or k == "swapped_sequences"}
    assert host and set(host.values()) == {0, 0.0, False}
    text = p.report(echo=False)
    assert "host" not in text.replace("metadata (host)", "") and "swap" not in text
    assert len(text.splitlines()) == 2 + 18  # title, rule, the 18 device rows
