"""Tensor parallelism on the CPU (gloo, two processes): the output of N = 2 is N = 1's.

Each engine at ``tensor_parallel_size=2`` spawns one worker rank; rank 0 keeps
the bookkeeping and broadcasts every step. Greedy tokens must equal N = 1's
(and transformers') with shared prefixes, chunked prefill, preemption,
``n > 1`` (copy-on-write copies mirrored to the worker) and compaction between
steps; budgets are global; a worker that fails or dies stops the engine with
its error, in bounded time, and nothing else is left waiting; what tensor
parallelism does not do yet is refused with why.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("transformers")

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.parallel import FAULT_ENV, TensorParallelError, shard_model  # noqa: E402
from kvforge.engine.testing import hf_greedy, run_steps, save_tiny_checkpoint  # noqa: E402
from kvforge.errors import ConfigError  # noqa: E402

_rng = random.Random(77)
_PREFIX = [_rng.randrange(3, 128) for _ in range(21)]
PROMPTS = [_PREFIX + [_rng.randrange(3, 128) for _ in range(n)] for n in (2, 9, 5)] + [[5, 6, 7]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tp_llama")
    model = save_tiny_checkpoint("LlamaForCausalLM", folder)
    return str(folder), model


def _run(engine: Engine, compact: bool = False) -> list[list[int]]:
    try:
        return run_steps(engine, PROMPTS, [SamplingParams(max_tokens=MAX_NEW)] * len(PROMPTS), compact=compact)
    finally:
        engine.close()


def test_two_ranks_equal_one_and_transformers(llama) -> None:
    folder, model = llama
    want = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    # a cache small enough that sequences are preempted; prompts chunked 12 tokens a step
    opts = dict(num_blocks=13, block_size=4, max_num_batched_tokens=12)
    one = Engine(folder, **opts)
    assert _run(one) == want
    two = Engine(folder, tensor_parallel_size=2, **opts)
    assert two.tensor_parallel is not None and two.cache.config.num_kv_heads == one.cache.config.num_kv_heads // 2
    assert two.cache.config.num_blocks == one.cache.config.num_blocks  # the same block ids, half the bytes
    assert _run(two) == want
    s = two.stats()
    assert s.prefix_hit_tokens > 0 and s.num_preemptions > 0


def test_forks_and_compaction_reach_the_worker(llama) -> None:
    """n > 1 forks a prompt (copy-on-write copies of the shared last block) and compaction
    moves blocks between steps: the worker must copy the same blocks, or its shard of the
    keys and values would differ from rank 0's bookkeeping and the tokens would change."""
    folder, _ = llama
    params = SamplingParams(max_tokens=8, n=3, temperature=0.8, seed=5)
    outs = []
    for tp in (1, 2):
        engine = Engine(folder, num_blocks=48, block_size=4, enable_compaction=True, tensor_parallel_size=tp)
        try:
            outs.append(run_steps(engine, [PROMPTS[1], PROMPTS[0]], [params] * 2, compact=True))
            assert engine.cache.num_cow_copies > 0
        finally:
            engine.close()
    assert outs[0] == outs[1]


def test_fp8_cache_with_per_head_scales_splits_them(tmp_path) -> None:
    """An fp8 checkpoint with per-KV-head scales: each rank takes its heads' scales, and
    the output at N = 2 is N = 1's."""
    from kvforge.engine.testing import add_kv_scales

    save_tiny_checkpoint("LlamaForCausalLM", tmp_path)
    add_kv_scales(tmp_path, {0: (torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])),
                             1: (torch.tensor([1.0, 0.75]), torch.tensor([0.5, 0.5]))})
    outs = []
    for tp in (1, 2):
        engine = Engine(str(tmp_path), num_blocks=32, block_size=4, kv_dtype="fp8_e4m3", tensor_parallel_size=tp)
        try:
            assert engine.kv_scales_source == "checkpoint"
            if tp == 2:
                assert engine.cache.kv_scales(0).k_scale.tolist() == [0.5]
            outs.append([o.token_ids for o in engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6))])
        finally:
            engine.close()
    assert outs[0] == outs[1]


def test_host_tier_moves_reach_the_worker(llama) -> None:
    """A device pool too small for the batch, a host tier, preemption by swap: rank 0's swaps,
    spills and onboarding copies are replayed on the worker in order, so N = 2 gives N = 1's tokens."""
    folder, model = llama
    want = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    outs, stats = [], []
    for tp in (1, 2):
        engine = Engine(folder, num_blocks=13, block_size=4, max_num_batched_tokens=12, host_memory="512KiB",
                        preemption_mode="swap", tensor_parallel_size=tp)
        try:
            prompts = PROMPTS + PROMPTS[:2]  # the repeats hit blocks spilled to the host tier
            outs.append(run_steps(engine, prompts, [SamplingParams(max_tokens=MAX_NEW)] * len(prompts)))
            stats.append((engine.stats(), engine.cache.config.num_host_blocks, engine.cache.config.host_memory))
        finally:
            engine.close()
    assert outs[0] == outs[1] and outs[0][:len(PROMPTS)] == want
    for s, _, _ in stats:
        assert s.num_swaps_out > 0 and s.num_swaps_in > 0
    # a global budget: the same host blocks, each rank holding half the bytes
    assert stats[1][1] == stats[0][1] and stats[1][2] * 2 == stats[0][2]


def test_remote_tier_each_rank_shares_its_heads(llama, redis) -> None:
    """Two engines at N = 2 over one Redis server: the first publishes (every rank its share,
    named by its rank), the second reuses those blocks (every rank fetches its share, all or
    none) and gives N = 1's tokens; a server emptied behind its back makes it recompute."""
    from kvforge import RedisTier

    folder, model = llama
    want = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS[:3]]
    params = [SamplingParams(max_tokens=MAX_NEW)] * 3

    def engine() -> Engine:
        tier = RedisTier(redis.url(), namespace="tp", timeout=2.0, reader="thread")
        return Engine(folder, num_blocks=64, block_size=4, tensor_parallel_size=2, remote=tier, remote_fetch="always")

    a = engine()
    try:
        assert run_steps(a, PROMPTS[:3], params) == want
        assert a.cache.remote.flush(timeout=10)
    finally:
        a.close()
    time.sleep(1.0)  # the worker's writer flushes in the background too
    assert len(redis.client().keys("*")) >= 2 * 5  # both ranks' shares of the shared prefix's blocks
    b = engine()
    try:
        assert run_steps(b, PROMPTS[:3], params) == want
        assert b.stats().prefix_remote_hit_tokens > 0
    finally:
        b.close()
    redis.client().flushall()
    c = engine()
    try:
        assert run_steps(c, PROMPTS[:3], params) == want
        assert c.stats().prefix_remote_hit_tokens == 0
    finally:
        c.close()


def test_compaction_that_hands_chunks_back_reaches_the_worker(llama) -> None:
    """Requests of different lengths finish at different times in a pool of small chunks:
    each compaction moves live blocks down and then drops the emptied chunks. The worker must
    replay both in that order (moves first), or it copies from chunks it no longer has."""
    folder, _ = llama
    prompts = [PROMPTS[3], PROMPTS[0][:7], PROMPTS[1]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (2, 5, 12)]
    outs, released = [], []
    for tp in (1, 2):
        engine = Engine(folder, num_blocks=24, block_size=4, enable_compaction=True, tensor_parallel_size=tp)
        try:
            assert engine.cache.chunk_blocks == 2  # chunks of two blocks: a compaction hands some back
            outs.append(run_steps(engine, prompts, params, compact=True))
            released.append(engine.cache.stats.total_bytes_returned)
        finally:
            engine.close()
    assert outs[0] == outs[1]
    assert released[1] > 0


def test_budget_is_global(llama) -> None:
    folder, _ = llama
    one = Engine(folder, kv_memory="256KiB", block_size=4)
    two = Engine(folder, kv_memory="256KiB", block_size=4, tensor_parallel_size=2)
    try:
        assert two.cache.config.num_blocks == one.cache.config.num_blocks
        assert two.cache.config.estimated_memory_bytes() * 2 == one.cache.config.estimated_memory_bytes()
    finally:
        two.close()


def test_random_weights_split_the_same_way() -> None:
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, torch_dtype="float32", initializer_range=0.5)
    outs = []
    for tp in (1, 2):
        engine = Engine.from_config(hf, num_blocks=32, block_size=4, device="cpu", tensor_parallel_size=tp)
        try:
            outs.append([o.token_ids for o in engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6))])
        finally:
            engine.close()
    assert outs[0] == outs[1]


def test_shards_hold_their_heads(llama) -> None:
    folder, _ = llama
    engine = Engine(folder, num_blocks=8)
    full = engine.model
    a, b = shard_model(full, 0, 2), shard_model(full, 1, 2)
    c = full.config
    assert a.config.num_heads == c.num_heads // 2 and a.config.num_kv_heads == c.num_kv_heads // 2
    assert a.config.intermediate_size == c.intermediate_size // 2
    lw, la, lb = full.layers[0], a.layers[0], b.layers[0]
    d = c.head_dim
    q = lw.qkv[: c.q_size]
    assert torch.equal(torch.cat([la.qkv[: a.config.q_size], lb.qkv[: b.config.q_size]]), q)
    assert torch.equal(torch.cat([la.o_proj, lb.o_proj], dim=1), lw.o_proj)
    assert torch.equal(torch.cat([la.down, lb.down], dim=1), lw.down)
    assert la.qkv.shape[0] == (c.num_heads // 2 + c.num_kv_heads) * d


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_failing_worker_stops_the_engine_with_its_error(llama, how: str, monkeypatch) -> None:
    folder, _ = llama
    if how == "raises":
        monkeypatch.setenv(FAULT_ENV, "1:3")  # rank 1 raises on its 4th step
    engine = Engine(folder, num_blocks=32, block_size=4, tensor_parallel_size=2)
    try:
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()
        if how == "killed":
            os.kill(engine.tensor_parallel.procs[0].pid, signal.SIGKILL)
            time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1"):
            for _ in range(10):
                engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(TensorParallelError, match="has stopped"):
            engine.step()
        assert all(not p.is_alive() for p in engine.tensor_parallel.procs)
    finally:
        engine.close()


def test_a_failure_on_rank_zero_stops_the_workers(llama, monkeypatch) -> None:
    folder, _ = llama
    monkeypatch.setenv(FAULT_ENV, "0:2")
    engine = Engine(folder, num_blocks=32, block_size=4, tensor_parallel_size=2)
    try:
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
        with pytest.raises(TensorParallelError, match="rank 0 failed: RuntimeError: injected fault"):
            for _ in range(10):
                engine.step()
        assert all(not p.is_alive() for p in engine.tensor_parallel.procs)
        with pytest.raises(TensorParallelError, match="has stopped"):
            engine.step()
    finally:
        engine.close()


def test_what_tensor_parallelism_does_not_do_is_refused(llama, tmp_path) -> None:
    folder, _ = llama
    with pytest.raises(ConfigError, match="does not split evenly"):
        Engine(folder, num_blocks=8, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="native decoder"):
        Engine(folder, num_blocks=8, tensor_parallel_size=2, model_impl="transformers")
    one = Engine(folder, num_blocks=8)
    with pytest.raises(ConfigError, match="from_model"):
        Engine.from_model(one.model, num_blocks=8, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be"):
        Engine(folder, num_blocks=8, tensor_parallel_size=0)


def test_generate_command_takes_tensor_parallel_size(llama, tmp_path, capsys) -> None:
    import json

    from kvforge.tools.cli import main

    folder, _ = llama
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS[:2]))
    outs = []
    for tp in ("1", "2"):
        argv = ["generate", "--model", folder, "--prompts", str(prompts), "--max-tokens", "6", "--device", "cpu",
                "--num-blocks", "32", "--tensor-parallel-size", tp, "--no-progress"]
        capsys.readouterr()
        assert main(argv) == 0
        outs.append([line for line in capsys.readouterr().out.splitlines() if "completion" in line])
    assert outs[0] == outs[1] and len(outs[0]) == 2
