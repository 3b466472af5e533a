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


def test_forced_swaps_keep_outputs(ref: Reference) -> None:
    """Every preemption swaps to the host tier and back: outputs stay transformers'."""
    engine = Engine(ref.folder, num_blocks=16, block_size=8, max_num_batched_tokens=24,
                    host_memory="4MiB", preemption_mode="swap")
    prompts = MIXED[1:] + [MIXED[2][::-1]]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=MAX_NEW)] * len(prompts))
    assert got == [ref.expected(p) for p in prompts]
    stats = engine.stats()
    assert stats.num_swaps_out > 0 and stats.num_swaps_in == stats.num_swaps_out
    assert stats.host.swapped_out_blocks > 0 and stats.num_swapped == 0


def test_spilled_prefixes_come_back_from_the_host(ref: Reference) -> None:
    """A device pool too small for the shared prefixes: they spill to the host tier and
    are onboarded on the next round; outputs stay transformers'."""
    engine = Engine(ref.folder, num_blocks=12, block_size=8, max_num_seqs=1,
                    host_memory="4MiB")
    params = SamplingParams(max_tokens=MAX_NEW)
    prompts = SHARED + [p[::-1] for p in SHARED]  # the reversed ones push the shared prefix out
    for _ in range(2):
        got = [o.token_ids for o in engine.generate(prompts, params)]
        assert got == [ref.expected(p) for p in prompts]
        engine.check_invariants()
    stats = engine.stats()
    assert stats.host.spilled_blocks > 0 and stats.host.onboarded_blocks > 0
    assert stats.prefix_host_hit_tokens > 0


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


@pytest.fixture(scope="module")
def one_ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One architecture: enough for the fault paths."""
    return Reference(ARCHS[0], str(tmp_path_factory.mktemp("one")))


@pytest.mark.parametrize("fail", ["to_host", "to_device"])
def test_failing_tier_copies_lose_no_request(one_ref: Reference, fail: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other copy in one direction of the host tier raises: swaps fall back to
    recompute, failed swap-ins recompute, failed onboards compute; outputs stay transformers'."""
    ref = one_ref
    from kvforge.storage.host import HostStorage
    real = getattr(HostStorage, fail)
    calls = {"n": 0}

    def flaky(self, pairs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise RuntimeError(f"injected {fail} failure #{calls['n']}")
        return real(self, pairs)

    engine = Engine(ref.folder, num_blocks=16, block_size=8, max_num_batched_tokens=24,
                    host_memory="4MiB", preemption_mode="swap")
    monkeypatch.setattr(HostStorage, fail, flaky)
    prompts = MIXED[1:] + [MIXED[2][::-1]] + SHARED[:2]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=MAX_NEW)] * len(prompts))
    assert got == [ref.expected(p) for p in prompts]
    assert calls["n"] >= 2  # at least one copy failed
    stats = engine.stats()
    assert stats.host.failed_copies > 0 and stats.num_preemptions > 0
