"""Soak: the engine for 10,000 steps under random arrivals, cancellations,
preemptions, compactions and injected kernel failures.

A tiny random Llama on the CPU (float32, torch kernels) over a small cache, so
that sequences are preempted often. After every step the engine's and the
cache's invariants hold (no block lost or duplicated). Every greedy request
that was neither cancelled nor in a failed step produces exactly the tokens
the same prompt produces alone in a fresh engine; so do the requests caught in
a failed step (their sequences recompute).
"""
from __future__ import annotations

import random

import pytest

from kvforge.engine import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=True, torch_dtype="float32", initializer_range=0.5, eos_token_id=None)
STEPS = 10_000


class InjectedKernelFailure(RuntimeError):
    """A kernel launch failed (injected)."""


def engine(num_blocks: int) -> Engine:
    return Engine.from_config(TINY, num_blocks=num_blocks, block_size=8, device="cpu", dtype="float32",
                              backend="torch", max_num_seqs=8, max_num_batched_tokens=48, seed=0,
                              enable_compaction=True)


def test_soak() -> None:
    rng = random.Random(1234)
    systems = [[rng.randrange(64) for _ in range(n)] for n in (9, 16, 21)]
    prompts = [systems[i % 3] + [rng.randrange(64) for _ in range(rng.randrange(1, 12))] for i in range(12)]
    lengths = [rng.randrange(2, 14) for _ in prompts]
    ref = engine(64)
    want = [ref.generate([p], SamplingParams(max_tokens=m))[0].token_ids for p, m in zip(prompts, lengths)]

    eng = engine(20)  # 20 blocks of 8 tokens: a handful of sequences at once
    execute = eng.runner.execute
    failing = {"on": False, "count": 0}

    def flaky(out):  # type: ignore[no-untyped-def]
        if failing["on"]:
            failing["count"] += 1
            raise InjectedKernelFailure("injected kernel failure")
        return execute(out)

    eng.runner.execute = flaky  # type: ignore[method-assign]
    live: dict[str, int] = {}                 # unfinished request id -> prompt index
    prompt_of: dict[str, int] = {}
    touched: set[str] = set()                 # requests that were running in a failed step
    cancelled: set[str] = set()
    done: dict[str, list[int]] = {}
    compactions = 0
    for step in range(STEPS):
        if rng.random() < 0.12 and len(live) < 12:
            i = rng.randrange(len(prompts))
            n = 2 if rng.random() < 0.1 else 1
            rid = eng.add_request(prompts[i], SamplingParams(max_tokens=lengths[i], n=n))
            live[rid] = prompt_of[rid] = i
        if live and rng.random() < 0.01:
            rid = rng.choice(sorted(live))
            eng.abort(rid)
            cancelled.add(rid)
            del live[rid]
        failing["on"] = rng.random() < 0.01
        running = {s.request.request_id for s in eng.scheduler.running}
        try:
            outs = eng.step()
        except InjectedKernelFailure:
            touched |= running
            outs = []
        for o in outs:
            if o.finished:
                done[o.request_id] = [c.token_ids for c in o.outputs]
                live.pop(o.request_id, None)
        eng.check_invariants()
        if rng.random() < 0.02 and eng.cache.should_compact() or rng.random() < 0.005:
            eng.cache.compact_cache()
            compactions += 1
            eng.check_invariants()
    failing["on"] = False
    while eng.has_unfinished_requests():  # drain what is left
        for o in eng.step():
            if o.finished:
                done[o.request_id] = [c.token_ids for c in o.outputs]
                live.pop(o.request_id, None)
        eng.check_invariants()
    st = eng.stats()
    assert st.num_preemptions > 50 and failing["count"] > 50 and compactions > 20 and len(cancelled) > 10
    assert len(done) > 300
    # nothing leaked: every block is free or an evictable cached prefix
    assert st.used_blocks == 0 and eng.cache.pool.num_available_blocks == eng.cache.capacity_blocks
    kept = 0
    for rid, outputs in done.items():
        if rid in touched or rid in cancelled:
            continue
        kept += 1
        assert all(toks == want[prompt_of[rid]] for toks in outputs), (rid, outputs, want[prompt_of[rid]])
    assert kept > 200
    # requests caught in a failed step recomputed and finished with the same tokens too
    caught = touched & set(done)
    assert len(caught) > 50
    assert all(all(t == want[prompt_of[rid]] for t in done[rid]) for rid in caught)
