"""Randomized differential test of asynchronous scheduling (kvforge.engine.overlap).

For each seed a random workload (prompts with shared prefixes, lengths from 1 token,
``max_tokens`` from 1, end-of-sequence and explicit stop tokens, seeded sampled requests
with ``top_k`` / ``top_p``, ``n`` of 2 and 3, requests arriving and aborted between
steps) runs step by step on two engines over the same tiny checkpoint, one synchronous
and one with ``async_scheduling=True``, in a cache small enough to preempt (some seeds
swap to a host tier, some compact the cache after every step). Both engines get the
same calls in the same order: requests are added and aborted "after k calls of step()".

Checked: every request neither engine aborted has the same token ids and finish reason
per completion in both; a request aborted in either has, per completion, token ids one
of which is a prefix of the other (the engines reach an abort at different progress: the
asynchronous one reads each step one call later) and ends ``'abort'`` wherever it was
aborted while unfinished; after every call, ``check_invariants()``, no slot left
uncommitted and the cache's token ids (the prefix keys of the blocks they fill) the
sequences' own; at the end, nothing running, waiting, swapped or in flight, no block in
use; and a last round of prompts that reuse the blocks both engines cached (the generated
tokens' blocks too, registered when their ids were committed) gives equal outputs, those
of a fresh engine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.outputs import request_output  # noqa: E402
from kvforge.engine.testing import save_tiny_checkpoint  # noqa: E402

EOS = 7
VOCAB = 128
MAX_CALLS = 400  # a workload drains in far fewer calls; more means the engine stopped progressing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("async_fuzz") / "ckpt"
    save_tiny_checkpoint("LlamaForCausalLM", folder, seed=3, eos_token_id=EOS, max_position_embeddings=512)
    return folder


@dataclass
class Workload:
    engine_options: dict[str, Any]
    compact: bool
    requests: list[tuple[list[int], SamplingParams]]
    arrivals: dict[int, list[int]] = field(default_factory=dict)  # call index -> request indices to add
    aborts: dict[int, list[int]] = field(default_factory=dict)  # call index -> request indices to abort


def _workload(seed: int) -> Workload:
    rng = random.Random(seed)
    block_size = rng.choice([4, 8])
    num_blocks = rng.randint(8, 11) if block_size == 8 else rng.randint(14, 20)
    options: dict[str, Any] = dict(num_blocks=num_blocks, block_size=block_size,
                                   max_num_seqs=rng.randint(4, 6), max_num_batched_tokens=rng.choice([16, 24, 48]))
    if seed % 3 == 1:  # a host tier that every preemption swaps to
        options.update(host_memory="256KiB", preemption_mode="swap")
    room = num_blocks * block_size // 2  # a request's prompt and output fit in half of the cache
    prefixes = [[rng.randrange(10, VOCAB) for _ in range(rng.randint(block_size, 3 * block_size))]
                for _ in range(2)]
    stop_pool = [rng.randrange(10, VOCAB) for _ in range(6)]
    requests = []
    forking = 0
    for i in range(rng.randint(7, 11)):
        max_tokens = rng.choice([1, 1, 2, 3, rng.randint(4, 12), rng.randint(10, 24), rng.randint(16, 30),
                                 rng.randint(20, 30)])
        if i == 0:  # alone for its first steps: they overlap (a request not forked yet stops that)
            max_tokens = rng.randint(6, 16)
        kind = rng.random()
        if kind < 0.45:
            base = list(rng.choice(prefixes))
            tail = [rng.randrange(10, VOCAB) for _ in range(rng.randint(0, 6))]
            prompt = base + tail
        elif kind < 0.55:
            prompt = [rng.randrange(10, VOCAB)]  # one token
        else:
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))]
        prompt = prompt[:max(1, room - max_tokens)]
        kw: dict[str, Any] = dict(max_tokens=max_tokens)
        r = rng.random()
        if r < 0.4:  # sampled, seeded
            kw.update(temperature=rng.choice([0.7, 1.0, 1.4]), top_k=rng.choice([0, 5, 30]),
                      top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30))
            if rng.random() < 0.5 and i and forking < 2:
                kw.update(n=rng.choice([2, 3]))
                forking += 1
        elif r < 0.5 and i and forking < 2:
            kw.update(n=2)  # greedy siblings
            forking += 1
        if rng.random() < 0.35:
            kw.update(stop_token_ids=tuple(rng.sample(stop_pool, 3)))
        if rng.random() < 0.2:
            kw.update(ignore_eos=True)
        requests.append((prompt, SamplingParams(**kw)))
    w = Workload(options, compact=seed % 2 == 0, requests=requests)
    at = 0
    for i in range(len(requests)):
        w.arrivals.setdefault(at, []).append(i)
        if i and rng.random() < 0.25:  # some abort: right away (still waiting) or a few calls later
            w.aborts.setdefault(at + rng.choice([0, 1, 2, 3, 5, 8]), []).append(i)
        at += rng.choice([0, 0, 0, 1, 2]) if i else 3
    return w


def _assert_committed(engine: Engine) -> None:
    """After a call of step() every reserved slot has its id: the step in flight's own sampled
    tokens have no slots yet, and the slots reserved ahead were committed (or given back); and
    the ids the cache holds (the prefix keys of the blocks they fill) are the sequence's own."""
    cache = engine.cache
    for sid in [*cache.seq_ids, *cache.swapped_seq_ids]:
        assert cache.num_uncommitted_tokens(sid) == 0, f"sequence {sid} keeps uncommitted slots between steps"
    for s in engine.scheduler.running:
        known = cache.seq_len(s.seq_id) + cache.num_pending_tokens(s.seq_id)
        assert cache.manager.token_ids(s.seq_id) == s.token_ids[:known], f"sequence {s.seq_id}: wrong ids cached"


def _drive(engine: Engine, w: Workload) -> tuple[dict[str, Any], set[str]]:
    """Run ``w`` on ``engine`` call by call; the final snapshot of each request, by id, and the
    ids it aborted while unfinished."""
    finals: dict[str, Any] = {}
    aborted: set[str] = set()
    last_event = max([*w.arrivals, *w.aborts])
    calls = 0
    while True:
        for i in w.arrivals.get(calls, []):
            prompt, params = w.requests[i]
            engine.add_request(prompt, params, request_id=f"r{i}")
        for i in w.aborts.get(calls, []):
            req = engine._requests.get(f"r{i}")  # gone once step() returned it finished
            if req is not None:
                engine.abort(req.request_id)
                aborted.add(req.request_id)
                finals[req.request_id] = request_output(None, req, detokenize=False)
                engine.check_invariants()
        if calls > last_event and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals, f"{out.request_id} reported finished twice"
                finals[out.request_id] = out
        calls += 1
        engine.check_invariants()
        _assert_committed(engine)
        if w.compact:
            engine.cache.compact_cache()
            engine.check_invariants()
        assert calls < MAX_CALLS, "the engine stopped making progress"
    return finals, aborted


def _assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.cache.seq_ids == [] and engine.cache.swapped_seq_ids == []
    st = engine.stats()
    assert st.used_blocks == 0 and st.num_running == 0 and st.num_waiting == 0 and st.num_swapped == 0
    engine.check_invariants()


SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("seed", SEEDS)
def test_async_engine_matches_the_synchronous_one_step_by_step(checkpoint: Path, seed: int) -> None:
    w = _workload(seed)
    sync = Engine(str(checkpoint), **w.engine_options)
    over = Engine(str(checkpoint), **w.engine_options, async_scheduling=True)
    want, want_aborted = _drive(sync, w)
    got, got_aborted = _drive(over, w)
    assert set(got) == set(want) == {f"r{i}" for i in range(len(w.requests))}

    for rid in want:
        a, b = got[rid], want[rid]
        n = w.requests[int(rid[1:])][1].n
        assert len(a.outputs) == len(b.outputs) == n, rid
        if rid not in got_aborted and rid not in want_aborted:
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], rid
            assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs], rid
            assert all(c.finish_reason in ("stop", "length") for c in a.outputs), rid
            continue
        for ca, cb in zip(a.outputs, b.outputs):  # the same completion, cut at different points
            short, long_ = (ca, cb) if len(ca.token_ids) <= len(cb.token_ids) else (cb, ca)
            assert long_.token_ids[:len(short.token_ids)] == short.token_ids, (rid, ca, cb)
            if len(short.token_ids) < len(long_.token_ids):
                assert short.finish_reason == "abort", (rid, ca, cb)
            elif short.finish_reason != long_.finish_reason:
                assert "abort" in (short.finish_reason, long_.finish_reason), (rid, ca, cb)
        for out, ab in ((a, got_aborted), (b, want_aborted)):
            reasons = [c.finish_reason for c in out.outputs]
            assert all(r in ("stop", "length", "abort") for r in reasons), (rid, reasons)
            if rid in ab:
                assert "abort" in reasons, (rid, reasons)
            else:
                assert "abort" not in reasons, (rid, reasons)

    for e in (sync, over):
        _assert_idle(e)
    st, ref = over.stats(), sync.stats()
    assert st.num_overlapped_steps > 0 and ref.num_overlapped_steps == 0
    assert st.num_finished_requests == ref.num_finished_requests == len(w.requests)

    # the blocks both engines cached, decode blocks too: a prompt that reuses them must see the
    # keys and values of the tokens their keys name
    probes, probe_params = [], SamplingParams(max_tokens=3, ignore_eos=True)
    for rid, b in want.items():
        if rid in want_aborted or rid in got_aborted:
            continue
        prompt = w.requests[int(rid[1:])][0]
        full = prompt + b.outputs[0].token_ids[:-1]
        if len(full) + 3 <= w.engine_options["num_blocks"] * w.engine_options["block_size"] // 2:
            probes.append(full)
    if probes:
        want_p = sync.generate(probes, probe_params)
        got_p = over.generate(probes, probe_params)
        assert [o.token_ids for o in got_p] == [o.token_ids for o in want_p]
        fresh = Engine(str(checkpoint), **w.engine_options).generate(probes, probe_params)
        assert [o.token_ids for o in want_p] == [o.token_ids for o in fresh]
        for e in (sync, over):
            while e.has_unfinished_requests():  # the asynchronous engine may hold a last step in flight
                assert e.step() == []
            _assert_idle(e)


def test_the_workloads_cover_what_they_are_for(checkpoint: Path) -> None:
    """The seeds above preempt, swap, hit the prefix cache, stop on tokens, hit length limits,
    fork, abort and compact (so the equality test is not vacuous); run on the synchronous engine."""
    seen: dict[str, int] = dict(preempt=0, swap=0, hit=0, stop=0, length=0, fork=0, abort=0, compact=0, one=0)
    for seed in SEEDS:
        w = _workload(seed)
        e = Engine(str(checkpoint), **w.engine_options)
        finals, aborted = _drive(e, w)
        st = e.stats()
        seen["preempt"] += st.num_preemptions > 0
        seen["swap"] += st.num_swaps_out > 0
        seen["hit"] += st.prefix_hit_tokens > 0
        seen["compact"] += st.num_compactions > 0
        seen["abort"] += bool(aborted)
        reasons = [c.finish_reason for o in finals.values() for c in o.outputs]
        seen["stop"] += "stop" in reasons
        seen["length"] += "length" in reasons
        seen["fork"] += any(p.n > 1 for _, p in w.requests)
        seen["one"] += any(p.max_tokens == 1 for _, p in w.requests)
    assert all(v >= 2 for v in seen.values()), seen
