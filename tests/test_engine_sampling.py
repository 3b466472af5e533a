"""Sampling: the batched sampler's filters and noise, and the engine's seeded,
top-k and n > 1 behaviour on a tiny checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from kvforge.engine.sampling import SamplingBatch, SamplingParams, sample, uniform_noise
from kvforge.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed0: int = 0) -> SamplingBatch:
    return SamplingBatch([temperature] * n, [top_k] * n, [top_p] * n, list(range(seed0, seed0 + n)), [0] * n)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=-1), dict(n=0), dict(seed=1.5), dict(temperature=float("inf")),
                                    dict(stop_token_ids=["a"]), dict(ignore_eos=1)])
def test_sampling_params_reject_invalid(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_uniform_noise_is_deterministic_and_uniform() -> None:
    seeds = torch.arange(64, dtype=torch.int64)
    u = uniform_noise(seeds, torch.zeros(64, dtype=torch.int64), 1000)
    assert u.shape == (64, 1000) and float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(u, uniform_noise(seeds, torch.zeros(64, dtype=torch.int64), 1000))
    assert abs(float(u.mean()) - 0.5) < 0.01
    v = uniform_noise(seeds, torch.ones(64, dtype=torch.int64), 1000)
    assert not torch.equal(u, v)  # the step changes the draw
    assert not torch.equal(u[0], u[1])  # so does the seed


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(8, 50)
    assert torch.equal(sample(logits, None), logits.argmax(-1))
    mixed = SamplingBatch([0.0, 1.0] * 4, [0] * 8, [1.0] * 8, list(range(8)), [0] * 8)
    out = sample(logits, mixed)
    assert torch.equal(out[0::2], logits.argmax(-1)[0::2])


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(32, 100)
    assert torch.equal(sample(logits, batch(32, temperature=1.7, top_k=1)), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_draw() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4).contiguous()
    nucleus = sample(logits, batch(2000, top_p=0.4))
    assert set(nucleus.tolist()) == {0}  # 0.5 >= 0.4 already
    two = sample(logits, batch(2000, top_p=0.75))
    assert set(two.tolist()) == {0, 1}
    k2 = sample(logits, batch(2000, top_k=2))
    assert set(k2.tolist()) == {0, 1}


def test_draws_follow_the_softmax() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = (probs.log() * 2.0).expand(n, 4).contiguous()  # temperature 2 undoes the factor 2
    counts = torch.bincount(sample(logits, batch(n, temperature=2.0)), minlength=4).float() / n
    for p, c in zip(probs.tolist(), counts.tolist()):
        assert abs(p - c) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


# ------------------------------------------------------------------ engine
transformers = pytest.importorskip("transformers")
from kvforge.engine import Engine  # noqa: E402
from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint  # noqa: E402

PROMPT = [5, 17, 99, 3, 42, 42, 8, 64, 11, 23, 71]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    folder = str(tmp_path_factory.mktemp("qwen3"))
    model = save_tiny_checkpoint("Qwen3ForCausalLM", folder, eos_token_id=None)
    return folder, model


def test_seeded_requests_reproduce_whatever_the_batch(ckpt: tuple[str, object]) -> None:
    folder, _ = ckpt
    p = SamplingParams(max_tokens=20, temperature=2.0, seed=1234)
    alone = Engine(folder, num_blocks=64, block_size=8).generate([PROMPT], p)[0].token_ids
    others = [[7] * 30, [9, 8, 7, 6, 5]]
    crowd = Engine(folder, num_blocks=64, block_size=8, max_num_batched_tokens=16).generate(
        others + [PROMPT], [SamplingParams(max_tokens=20, temperature=1.0)] * 2 + [p])
    assert crowd[2].token_ids == alone
    other_seed = Engine(folder, num_blocks=64, block_size=8).generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=2.0, seed=99))[0].token_ids
    assert other_seed != alone


def test_seeded_request_survives_preemption(ckpt: tuple[str, object]) -> None:
    folder, _ = ckpt
    params = [SamplingParams(max_tokens=24, temperature=1.5, seed=s) for s in range(4)]
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:] * 2, [3, 1, 4, 1, 5, 9, 2, 6]]
    roomy = Engine(folder, num_blocks=128, block_size=8).generate(prompts, params)
    tight = Engine(folder, num_blocks=14, block_size=8)
    squeezed = tight.generate(prompts, params)
    assert tight.stats().num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]


def test_top_k_one_equals_greedy(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    out = Engine(folder, num_blocks=64, block_size=8).generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=1.3, top_k=1, seed=5))
    assert out[0].token_ids == hf_greedy(model, PROMPT, 16)


def test_n_completions_fork_the_prompt(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    engine = Engine(folder, num_blocks=64, block_size=8)
    rid = engine.add_request(PROMPT * 2, SamplingParams(max_tokens=12, temperature=2.0, seed=3, n=3))
    engine.step()  # prefill and the first token of each completion; then the forks
    seqs = engine._requests[rid].seqs
    assert len(seqs) == 3
    full = len(PROMPT * 2) // 8
    tables = [engine.cache.block_table(s.seq_id)[:full] for s in seqs]
    assert tables[0] == tables[1] == tables[2]  # the prompt's full blocks are shared, not copied
    while engine.has_unfinished_requests():
        outs = engine.step()
        engine.check_invariants()
    out = outs[-1]
    assert out.finished and len(out.outputs) == 3
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = Engine(folder, num_blocks=64, block_size=8).generate(
        [PROMPT * 2], SamplingParams(max_tokens=12, temperature=2.0, seed=3, n=3))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = Engine(folder, num_blocks=64, block_size=8).generate([PROMPT], SamplingParams(max_tokens=8, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == hf_greedy(model, PROMPT, 8)
