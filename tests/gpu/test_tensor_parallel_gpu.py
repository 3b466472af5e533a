"""Tensor parallelism on two GPUs (NCCL): N = 2 gives N = 1's greedy tokens, each rank holds
half the KV bytes, and a failing worker stops the engine with its error. Skips without two GPUs."""
from __future__ import annotations

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA/ROCm devices", allow_module_level=True)

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.parallel import FAULT_ENV, TensorParallelError  # noqa: E402

HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=256,
          intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
          max_position_embeddings=1024, torch_dtype="float32", initializer_range=0.2)
PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (5, 40, 97)]


def test_two_gpus_equal_one() -> None:
    outs, kv = [], []
    for tp in (1, 2):
        engine = Engine.from_config(HF, kv_memory="64MiB", device="cuda", dtype="float32", tensor_parallel_size=tp)
        try:
            outs.append([o.token_ids for o in engine.generate(PROMPTS, SamplingParams(max_tokens=16))])
            kv.append(engine.cache.storage_bytes)
        finally:
            engine.close()
    assert outs[0] == outs[1]
    assert kv[1] * 2 == kv[0]


def test_a_failing_gpu_worker_stops_the_engine(monkeypatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "1:2")
    engine = Engine.from_config(HF, kv_memory="64MiB", device="cuda", dtype="float32", tensor_parallel_size=2)
    try:
        engine.add_request(PROMPTS[1], SamplingParams(max_tokens=20, ignore_eos=True))
        with pytest.raises(TensorParallelError, match="rank 1"):
            for _ in range(10):
                engine.step()
        assert all(not p.is_alive() for p in engine.tensor_parallel.procs)
    finally:
        engine.close()
