"""The swap-or-recompute rule of the engine and its configuration."""
from __future__ import annotations

import pytest
import torch

from kvforge import CacheConfig, KVCache
from kvforge.engine import EngineConfig
from kvforge.engine.preemption import PreemptionPolicy, measure_tier_bandwidth
from kvforge.errors import ConfigError

MiB = 2**20


def test_auto_swaps_exactly_when_moving_costs_less_than_recomputing():
    p = PreemptionPolicy("auto", bytes_per_block=2 * MiB, bandwidth=50e9)
    assert not p.should_swap(1000, 63)  # no prefill measured yet: recompute
    p.record_prefill(20_000, 1.0)  # 20k tokens/s
    # 63 blocks out and back: 2 * 63 * 2 MiB / 50 GB/s = 5.3 ms; 1000 tokens: 50 ms of prefill
    assert p.swap_seconds(63) == pytest.approx(2 * 63 * 2 * MiB / 50e9)
    assert p.recompute_seconds(1000) == pytest.approx(0.05)
    assert p.should_swap(1000, 63)
    slow = PreemptionPolicy("auto", bytes_per_block=2 * MiB, bandwidth=0.5e9)
    slow.record_prefill(20_000, 1.0)
    assert not slow.should_swap(1000, 63)  # 528 ms of copying against 50 ms of prefill
    assert slow.should_swap(1000, 2)


def test_prefill_rate_is_the_best_of_recent_large_prompt_steps():
    """Steps of a 10 ms fixed cost plus 20 us a prompt token: small chunks (their rate
    mostly fixed cost) count only until a large one is seen; a slow outlier (a kernel
    compiled on first use) does not count."""
    p = PreemptionPolicy("auto", 1, 1.0)
    for tokens in (100, 150, 120):
        p.record_prefill(tokens, 0.010 + 20e-6 * tokens)
    assert p.prefill_rate < 10_000  # the running mean of small steps
    for tokens in (2000, 1000, 4000):
        p.record_prefill(tokens, 0.010 + 20e-6 * tokens)
    p.record_prefill(2000, 3.0)  # compiling
    assert p.prefill_rate == pytest.approx(4000 / 0.090)  # the best of 33.3k, 40k, 44.4k and 0.7k tokens/s
    for _ in range(32):  # the window moves on
        p.record_prefill(1000, 0.030)
    assert p.prefill_rate == pytest.approx(1000 / 0.030)


def test_prefill_rate_is_a_running_mean_of_small_steps():
    p = PreemptionPolicy("auto", 1, 1.0)
    p.record_prefill(100, 1.0)
    p.record_prefill(200, 1.0)
    assert p.prefill_rate == pytest.approx(0.8 * 100 + 0.2 * 200)
    p.record_prefill(0, 1.0)  # nothing computed: ignored
    assert p.prefill_rate == pytest.approx(120)


@pytest.mark.parametrize("mode, bandwidth, want", [("swap", 1.0, True), ("recompute", 1e12, False),
                                                     ("swap", 0.0, False), ("auto", 0.0, False)])
def test_modes(mode, bandwidth, want):
    p = PreemptionPolicy(mode, 1, bandwidth)
    p.record_prefill(1, 1e9)
    assert p.should_swap(10**6, 1) is want


@pytest.mark.parametrize("options, match", [({"preemption_mode": "never"}, "preemption_mode"),
                                            ({"host_memory": -1}, "host_memory"),
                                            ({"host_memory": "lots"}, "lots"),
                                            ({"host_memory": 1.5}, "host_memory")])
def test_engine_config_refuses_bad_tier_options(options, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**options)


def test_bandwidth_probe_changes_no_data():
    cfg = CacheConfig(block_size=8, num_blocks=8, num_layers=2, num_kv_heads=2, head_dim=16,
                      dtype=torch.float32, device="cpu", host_memory="64KiB")
    cache = KVCache(cfg, backend="torch")
    r = cache.add_sequence("a", list(range(40)))
    k = torch.randn(40, 2, 16)
    cache.write(0, r.slots, k, -k)
    before = [t.clone() for t in cache.gather("a", 0)]
    assert measure_tier_bandwidth(cache) > 0
    after = cache.gather("a", 0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    no_tier = KVCache(cfg.replace(host_memory=0), backend="torch")
    assert measure_tier_bandwidth(no_tier) == 0.0
