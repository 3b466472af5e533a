"""The engine's rule for fetching a prompt's blocks from the remote tier or computing
them (:mod:`kvforge.engine.fetch_policy`), on a real Redis server."""
from __future__ import annotations

import pytest
import torch

from kvforge import CacheConfig, ConfigError, KVCache, RedisTier
from kvforge.engine import EngineConfig, PreemptionPolicy
from kvforge.engine.fetch_policy import RemoteFetchPolicy
from tests.redis_server import RedisServer

BS = 8
#: 2 layers x 2 x 8 tokens x 8 KV heads x 64 dims x 4 bytes: 64 KiB a block
CFG = CacheConfig(block_size=BS, num_blocks=48, num_layers=2, num_kv_heads=8, head_dim=64,
                  dtype=torch.float32, device="cpu")
PROMPT = list(range(7, 7 + 20 * BS + 1))  # 20 full blocks (1.25 MiB) before the last token


def published(server: RedisServer) -> RedisTier:
    """A tier that holds PROMPT's blocks, published by another cache."""
    a = KVCache(CFG, backend="torch", remote=RedisTier(server.url(), "policy", timeout=2.0), model="m")
    r = a.add_sequence("x", PROMPT)
    for layer in range(2):
        k = torch.randn(len(r.slots), 8, 64)
        a.write(layer, r.slots, k, k)
    a.free_sequence("x")
    assert a.remote.flush(10.0)
    a.remote.close()
    return RedisTier(server.url(), "policy", timeout=2.0)


def rates(tokens_per_second: float | None) -> PreemptionPolicy:
    p = PreemptionPolicy("recompute", CFG.bytes_per_block, 0.0)
    if tokens_per_second is not None:
        p.record_prefill(int(tokens_per_second), 1.0)
    return p


def admitted(tier: RedisTier, policy: RemoteFetchPolicy) -> int:
    """Tokens a fresh cache on ``tier`` finds cached for PROMPT under ``policy``."""
    c = KVCache(CFG, backend="torch", remote=tier, model="m")
    c.remote_fetch_policy = policy
    n = c.add_sequence("y", PROMPT).num_cached_tokens
    c.check_invariants()
    return n


def test_auto_fetches_until_both_rates_are_known_then_takes_the_faster(redis: RedisServer) -> None:
    tier = published(redis)
    try:
        slow_gpu, fast_gpu = rates(1.0), rates(1e12)
        assert admitted(tier, RemoteFetchPolicy("auto", tier, rates(None))) == 20 * BS  # nothing measured
        assert tier.read_bandwidth  # measured by that fetch (over 1 MiB)
        declining = RemoteFetchPolicy("auto", tier, fast_gpu, probe_interval=3600.0)
        assert admitted(tier, declining) == 0  # computing 160 tokens at 1e12 tokens/s is faster
        assert (declining.num_fetched, declining.num_declined) == (0, 1)
        assert declining.fetch_seconds(10**6) > declining.compute_seconds(160)
        assert admitted(tier, RemoteFetchPolicy("auto", tier, slow_gpu)) == 20 * BS
        assert admitted(tier, RemoteFetchPolicy("always", tier, fast_gpu)) == 20 * BS
        # a stale measurement is probed again: fetch once per probe interval even when computing looks faster
        probing = RemoteFetchPolicy("auto", tier, fast_gpu, probe_interval=0.0)
        assert admitted(tier, probing) == 20 * BS and probing.num_fetched == 1
    finally:
        tier.close()


def test_the_engine_option_is_checked() -> None:
    assert EngineConfig(remote_fetch="always").remote_fetch == "always"
    with pytest.raises(ConfigError, match="remote_fetch must be one of auto, always"):
        EngineConfig(remote_fetch="never")


def test_auto_measures_the_prefill_rate_once_before_the_first_step(redis: RedisServer, tmp_path) -> None:
    """Under ``remote_fetch="auto"`` the engine computes a probe prompt before its first step,
    so its first decisions rest on a measured prefill rate; the probe leaves nothing behind
    (no sequence, no cached or published block) and changes no output."""
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint
    model = save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt", max_position_embeddings=1024)
    tier = RedisTier(redis.url(), "calibrate", timeout=1.0)
    engine = Engine(str(tmp_path / "ckpt"), num_blocks=96, block_size=8, remote=tier)
    try:
        policy = engine.remote_fetch
        assert policy is not None and not policy.calibrated and engine.preemption.prefill_rate == 0
        prompt = list(range(3, 60))
        out = engine.generate([prompt], SamplingParams(max_tokens=4))[0]
        assert policy.calibrated and engine.preemption.prefill_rate > 0
        assert out.token_ids == hf_greedy(model, prompt, 4)
        assert tier.flush(10.0) and tier.stats().publish_jobs == 1  # the request's blocks only
        assert engine.cache.seq_ids == [] and engine.stats().prefix.hit_tokens == 0
        engine.check_invariants()
        # a cache too small for a probe of LARGE_PROMPT_STEP tokens records nothing
        small = Engine(str(tmp_path / "ckpt"), num_blocks=32, block_size=8, remote=RedisTier(redis.url(), "calib-2"))
        assert small.remote_fetch is not None
        assert small.remote_fetch.calibrate(small.runner.logits, small.cache, 4096, 128) is None
        assert small.preemption.prefill_rate == 0 and small.remote_fetch.calibrated
        small.cache.remote.close()
        # the transformers path calibrates through the same runner call
        hf = Engine(str(tmp_path / "ckpt"), num_blocks=96, block_size=8, model_impl="transformers",
                    remote=RedisTier(redis.url(), "calib-3"))
        assert hf.generate([prompt], SamplingParams(max_tokens=4))[0].token_ids == out.token_ids
        assert hf.remote_fetch is not None and hf.remote_fetch.calibrated and hf.preemption.prefill_rate > 0
        hf.cache.remote.close()
    finally:
        tier.close()
