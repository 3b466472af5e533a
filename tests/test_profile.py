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
