"""Greedy tokens of kvforge's engine equal transformers' ``generate``, per architecture.

Each architecture gets a tiny random checkpoint written by ``save_pretrained``
(the real loading path) and, in float32 on the CPU, runs: a batch of prompts
of different lengths (block sizes 8 and 16); prompts sharing a long prefix
(prefix hits asserted, chunked prefill on); a cache so small that sequences
are preempted (asserted); and compaction forced between every two steps
(asserted). The engine's invariants are checked after every step.
"""
from __future__ import annotations

import random

import pytest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.testing import TINY_CONFIGS, hf_greedy, run_steps, save_tiny_checkpoint  # noqa: E402

ARCHS = sorted(TINY_CONFIGS)
MAX_NEW = 24
_rng = random.Random(1234)
MIXED = [[_rng.randrange(3, 128) for _ in range(n)] for n in (3, 11, 26, 40)]
_PREFIX = [_rng.randrange(3, 128) for _ in range(37)]
SHARED = [_PREFIX + [_rng.randrange(3, 128) for _ in range(n)] for n in (3, 9, 5, 1)]


class Reference:
    """A checkpoint folder and transformers' greedy outputs, computed once per prompt."""

    def __init__(self, arch: str, folder: str) -> None:
        self.arch = arch
        self.folder = folder
        self.model = save_tiny_checkpoint(arch, folder)
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def expected(self, prompt: list[int], max_tokens: int = MAX_NEW) -> list[int]:
        key = tuple(prompt)
        if key not in self._cache:
            self._cache[key] = hf_greedy(self.model, prompt, MAX_NEW)
        return self._cache[key][:max_tokens]  # greedy: a shorter run is a prefix


@pytest.fixture(scope="module", params=ARCHS)
def ref(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("block_size", [8, 16])
def test_batch_of_different_lengths(ref: Reference, block_size: int) -> None:
    engine = Engine(ref.folder, num_blocks=64, block_size=block_size)
    got = run_steps(engine, MIXED, [SamplingParams(max_tokens=MAX_NEW)] * len(MIXED))
    assert got == [ref.expected(p) for p in MIXED]
    assert engine.stats().used_blocks == 0


def test_shared_prefix_hits_cache(ref: Reference) -> None:
    engine = Engine(ref.folder, num_blocks=96, block_size=8, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=MAX_NEW)
    first = engine.generate(SHARED, params)
    assert [o.token_ids for o in first] == [ref.expected(p) for p in SHARED]
    assert engine.stats().prefix_hit_tokens > 0
    again = engine.generate(SHARED[::-1], params)  # now every prefix block is cached
    assert [o.token_ids for o in again] == [ref.expected(p) for p in SHARED[::-1]]
    assert all(o.metrics.num_cached_tokens >= 32 for o in again)
    engine.check_invariants()


def test_preemption_keeps_outputs(ref: Reference) -> None:
    engine = Engine(ref.folder, num_blocks=16, block_size=8, max_num_batched_tokens=24)
    prompts = MIXED[1:] + [MIXED[2][::-1]]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=MAX_NEW)] * len(prompts))
    assert got == [ref.expected(p) for p in prompts]
    assert engine.stats().num_preemptions > 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_compaction_between_steps(ref: Reference, prefix_caching: bool) -> None:
    engine = Engine(ref.folder, num_blocks=64, block_size=8, enable_compaction=True,
                    enable_prefix_caching=prefix_caching)
    prompts = MIXED + SHARED
    max_tokens = [5, MAX_NEW, 9, 17, 3, 20, 12, 7]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=m) for m in max_tokens], compact=True)
    assert got == [ref.expected(p, m) for p, m in zip(prompts, max_tokens)]
    stats = engine.stats()
    assert stats.num_compactions > 0
    assert stats.num_blocks_moved > 0


@pytest.mark.parametrize("options", [{"attention_bias": True}, {"mlp_bias": True},
                                     {"attention_bias": True, "mlp_bias": True}])
def test_llama_biases_match_transformers(options: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``attention_bias`` (q/k/v and o_proj) and ``mlp_bias`` (gate/up/down) are loaded and applied."""
    folder = str(tmp_path_factory.mktemp("llama-bias"))
    model = save_tiny_checkpoint("LlamaForCausalLM", folder, **options)
    names = {n for n, _ in model.named_parameters()}
    assert ("model.layers.0.self_attn.o_proj.bias" in names) == options.get("attention_bias", False)
    assert ("model.layers.0.mlp.down_proj.bias" in names) == options.get("mlp_bias", False)
    engine = Engine(folder, num_blocks=64, block_size=8)
    layer = engine.model.layers[0]
    assert (layer.o_bias is not None) == options.get("attention_bias", False)
    assert (layer.down_bias is not None) == (layer.gate_up_bias is not None) == options.get("mlp_bias", False)
    outs = engine.generate(MIXED, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(MIXED, outs):
        want = hf_greedy(model, prompt, 8)
        assert out.token_ids[:len(want)] == want
    engine.check_invariants()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_matches_transformers(ref: Reference, dtype: str,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A checkpoint saved in bf16/fp16 loads (cast to the engine's float32) and equals transformers
    run on the same rounded weights: the float dtypes are accepted, not refused or mangled."""
    import copy
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    half = getattr(torch, dtype)
    folder = str(tmp_path_factory.mktemp(f"{ref.arch}-{dtype}"))
    shutil.copytree(ref.folder, folder, dirs_exist_ok=True)
    path = f"{folder}/model.safetensors"
    save_file({n: t.to(half) for n, t in load_file(path).items()}, path, metadata={"format": "pt"})
    rounded = copy.deepcopy(ref.model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(half).float())
    engine = Engine(folder, num_blocks=64, block_size=8, dtype="float32")
    got = engine.generate(MIXED[:2], SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(MIXED[:2], got):
        want = hf_greedy(rounded, prompt, 8)
        assert out.token_ids[:len(want)] == want
