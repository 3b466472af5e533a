"""On a GPU: compaction moves bf16 data intact and the device sees the memory come back."""
from __future__ import annotations

import pytest
import torch

from kvforge import CacheConfig, KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")


def test_compaction_returns_memory_to_the_device():
    cfg = CacheConfig(block_size=16, num_blocks=512, num_layers=8, num_kv_heads=8, head_dim=128,
                      dtype=torch.bfloat16, device="cuda", enable_compaction=True, chunk_blocks=32)
    cache = KVCache(cfg)  # 512 blocks x 512 KiB = 256 MiB in 16 chunks
    for i in range(128):
        cache.add_sequence(i, list(range(1000 * i, 1000 * i + 64)))  # 4 blocks each
    for chunk in cache.chunks:
        chunk.normal_()
    keep = list(range(0, 128, 4))
    sums = {i: [cache.gather(i, l)[0].float().sum().item() for l in (0, 7)] for i in keep}
    for i in range(128):
        if i not in keep:
            cache.free_sequence(i)
    cache.reclaim_unused_blocks()
    assert cache.should_compact()
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    footprint = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    released = cache.compact_cache()
    free_after, _ = torch.cuda.mem_get_info()
    assert released >= 12 * 32 * cfg.bytes_per_block
    assert free_after - free_before >= 0.9 * released
    assert torch.cuda.max_memory_allocated() <= footprint + 32 * cfg.bytes_per_block
    for i in keep:
        assert [cache.gather(i, l)[0].float().sum().item() for l in (0, 7)] == sums[i]
    cache.check_invariants()
