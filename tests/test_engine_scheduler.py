"""Property test of the scheduler: random workloads under a tight cache.

Requests arrive over several steps, with random prompt lengths, output
lengths, sampling settings (seeded), ``n`` and token budgets; some are
aborted; compaction may run between steps. Every step the engine's and the
cache's invariants hold, and every completion equals the one the same
request gets from a roomy engine that never preempts, chunks or compacts.
"""
from __future__ import annotations

import functools
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


pytestmark = pytest.mark.usefixtures("one_torch_thread")


pytest.importorskip("transformers")

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.testing import save_tiny_checkpoint  # noqa: E402

MAX_PROMPT, MAX_NEW = 40, 16


@functools.lru_cache(maxsize=1)
def checkpoint() -> str:
    folder = tempfile.mkdtemp(prefix="kvforge-engine-")
    save_tiny_checkpoint("Qwen2ForCausalLM", folder, eos_token_id=7)
    return folder


request = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(3, 127), min_size=1, max_size=MAX_PROMPT),
    "shared": st.integers(0, 24),  # leading tokens taken from a common prefix
    "max_tokens": st.integers(1, MAX_NEW),
    "temperature": st.sampled_from([0.0, 0.0, 1.0]),
    "top_k": st.sampled_from([0, 5]),
    "n": st.sampled_from([1, 1, 2]),
    "seed": st.integers(0, 2**31),
    "arrive": st.integers(0, 6),
    "abort": st.one_of(st.none(), st.integers(0, 12)),
})
COMMON = list(range(100, 124))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request, min_size=1, max_size=6), block_size=st.sampled_from([8, 16]),
       extra_blocks=st.integers(0, 12), budget=st.integers(4, 64), compact=st.booleans(),
       prefix=st.booleans())
def test_random_workloads_match_a_roomy_run(reqs: list[dict], block_size: int, extra_blocks: int, budget: int,
                                            compact: bool, prefix: bool) -> None:
    folder = checkpoint()
    prompts = [(COMMON[: r["shared"]] + r["prompt"])[:MAX_PROMPT] for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], top_k=r["top_k"],
                             n=r["n"], seed=r["seed"]) for r in reqs]
    roomy = Engine(folder, num_blocks=256, block_size=block_size)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)]

    min_blocks = -(-(MAX_PROMPT + MAX_NEW) // block_size) + 1
    engine = Engine(folder, num_blocks=min_blocks + extra_blocks, block_size=block_size,
                    max_num_batched_tokens=budget, enable_compaction=compact, enable_prefix_caching=prefix)
    rids: dict[int, str] = {}
    results: dict[str, list] = {}
    step = 0
    while len(rids) < len(reqs) or engine.has_unfinished_requests():
        for i, r in enumerate(reqs):
            if i not in rids and r["arrive"] <= step:
                rids[i] = engine.add_request(prompts[i], params[i])
        for i, r in enumerate(reqs):
            if r["abort"] == step and i in rids and rids[i] not in results:
                engine.abort(rids[i])
                results[rids[i]] = ["aborted"]
        for out in engine.step():
            if out.finished and out.request_id not in results:
                results[out.request_id] = [c.token_ids for c in out.outputs]
        engine.check_invariants()
        if compact:
            engine.cache.compact_cache()
            engine.check_invariants()
        step += 1
        assert step < 2000
    for i in range(len(reqs)):
        got = results[rids[i]]
        if got != ["aborted"]:
            assert got == expected[i], f"request {i}"
    assert engine.cache.seq_ids == [] and engine.stats().used_blocks == 0
