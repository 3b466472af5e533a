"""Asynchronous scheduling (kvforge.engine.overlap): step t+1 is scheduled and launched
before step t's tokens are read, and the outputs are the synchronous engine's.

Tiny random float32 checkpoints on the CPU, which runs the same code path as a GPU (there
the reads wait on an event, here they are already done): greedy and seeded sampled
outputs through stop tokens and length limits, preemption in a small cache, shared
prefixes with compaction after every step, ``n > 1``, aborts while a step is in flight,
streaming, and a failed step that leaves nothing wrong in the prefix cache.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kvforge.config import ConfigError  # noqa: E402
from kvforge.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from kvforge.engine.testing import drain_steps, hf_greedy, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("async") / "ckpt"
    model = save_tiny_checkpoint("LlamaForCausalLM", folder, eos_token_id=7, max_position_embeddings=512)
    return folder, model


def _prompts() -> list[list[int]]:
    base = [10 + (i % 9) for i in range(20)]
    return [base + [30 + i, 40 + 2 * i, 3 + i] for i in range(5)] + [[7, 8, 9] * 6, list(range(50, 61))]


def test_the_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="async_scheduling must be True or False"):
        EngineConfig(async_scheduling=1)  # type: ignore[arg-type]


def test_greedy_outputs_equal_the_synchronous_engines_and_transformers(checkpoint) -> None:
    folder, model = checkpoint
    prompts = _prompts()
    params = SamplingParams(max_tokens=12)
    sync = Engine(str(folder), num_blocks=64, block_size=8)
    overlap = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True)
    want = sync.generate(prompts, params)
    got = overlap.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert any(o.finish_reason == "stop" for o in got) and any(o.finish_reason == "length" for o in got)
    for p, o in zip(prompts, got):
        hf = hf_greedy(model, p, 12)
        assert o.token_ids == hf[:len(o.token_ids)]
    overlap.check_invariants()
    assert overlap.cache.seq_ids == [] and not overlap.has_unfinished_requests()
    st = overlap.stats()
    assert st.num_decode_steps == sync.stats().num_decode_steps
    assert st.num_overlapped_steps >= st.num_decode_steps - 2  # all but the first and the last fallbacks
    assert sync.stats().num_overlapped_steps == 0


def test_a_step_is_launched_before_the_one_before_is_read(checkpoint) -> None:
    """Step by step: each call returns the tokens of the step launched by the call before,
    and while a step is in flight its decodes hold slots whose ids are not committed yet."""
    folder, _ = checkpoint
    engine = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True)
    rid = engine.add_request(list(range(20, 31)), SamplingParams(max_tokens=6, ignore_eos=True))
    assert engine.step() == []  # the prompt is launched; nothing is read yet
    seq = engine._requests[rid].seqs[0]
    assert engine.cache.num_uncommitted_tokens(seq.seq_id) == 0 and seq.token_ids == list(range(20, 31))
    first = engine.step()  # the first decode is launched before the prompt's token is read
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    assert engine.cache.num_uncommitted_tokens(seq.seq_id) == 0  # committed once read
    assert engine.cache.seq_len(seq.seq_id) == 12  # the prompt, and the slot of the token in flight
    engine.check_invariants()
    outs = drain_steps(engine)
    want = Engine(str(folder), num_blocks=64, block_size=8).generate(
        [list(range(20, 31))], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert outs[rid] == want and engine.cache.seq_ids == []


def test_preemption_prefixes_compaction_and_seeded_sampling(checkpoint) -> None:
    """A small cache (preemption), shared prefixes, compaction after every step, stop tokens,
    length limits and seeded sampled requests beside greedy ones: the synchronous tokens."""
    folder, _ = checkpoint
    prompts = _prompts()
    params = [SamplingParams(max_tokens=n) for n in (5, 17, 1, 30, 12, 20)] + [
        SamplingParams(max_tokens=14, temperature=0.9, top_k=20, seed=4)]

    def run(**kw: object) -> tuple[list, Engine]:
        e = Engine(str(folder), num_blocks=14, block_size=8, max_num_seqs=4, **kw)
        outs = e.generate(prompts, params, on_step=lambda eng: (eng.cache.compact_cache(), eng.check_invariants()))
        e.check_invariants()
        return outs, e

    (want, _), (got, overlap) = run(), run(async_scheduling=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    st = overlap.stats()
    assert st.num_preemptions > 0 and st.prefix.hit_tokens > 0 and st.num_compactions > 0
    assert st.num_overlapped_steps > st.num_steps // 2
    assert overlap.cache.seq_ids == []


def test_n_above_one_and_streaming(checkpoint) -> None:
    folder, _ = checkpoint
    prompts = [list(range(12, 30)), list(range(60, 67))]
    params = [SamplingParams(max_tokens=9, n=3, temperature=1.0, seed=11), SamplingParams(max_tokens=7)]
    want = Engine(str(folder), num_blocks=64, block_size=8).generate(prompts, params)
    got = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True).generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    engine = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True)
    snaps = list(engine.stream(prompts, params))
    last = {s.request_id: s for s in snaps if s.finished}
    assert len(last) == 2 and sorted(len(s.outputs) for s in last.values()) == [1, 3]
    assert sorted(tuple(c.token_ids for c in s.outputs) for s in last.values()) == \
        sorted(tuple(c.token_ids for c in o.outputs) for o in want)
    assert engine.cache.seq_ids == []


def test_an_abort_while_a_step_is_in_flight_frees_everything(checkpoint) -> None:
    folder, _ = checkpoint
    engine = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True)
    a = engine.add_request(list(range(20, 40)), SamplingParams(max_tokens=20, ignore_eos=True))
    b = engine.add_request(list(range(40, 50)), SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(4):
        engine.step()
    seq = engine._requests[a].seqs[0]
    engine.abort(a)  # its next token is in flight, and its slot for it is reserved
    engine.check_invariants()
    outs = drain_steps(engine)
    want = Engine(str(folder), num_blocks=64, block_size=8).generate(
        [list(range(40, 50))], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert outs[b] == want and a not in outs
    assert seq.finish_reason == "abort" and engine.cache.seq_ids == [] and engine.stats().used_blocks == 0


def test_a_failed_step_in_flight_is_undone_and_the_requests_complete(checkpoint,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that fails while the one before is still unread: both are undone (their sequences
    recompute), no block they reserved stays cached, and the outputs are the synchronous ones."""
    folder, _ = checkpoint
    prompts = [list(range(20, 37)), list(range(50, 58))]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = Engine(str(folder), num_blocks=64, block_size=4).generate(prompts, params)
    engine = Engine(str(folder), num_blocks=64, block_size=4, async_scheduling=True)
    rids = [engine.add_request(p, params) for p in prompts]
    execute = engine.runner.execute
    calls = []

    def failing(out, inputs=None):  # type: ignore[no-untyped-def]
        calls.append(inputs)
        if inputs is not None and len(calls) > 3:
            raise RuntimeError("injected kernel failure")
        return execute(out, inputs)

    monkeypatch.setattr(engine.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        for _ in range(20):
            engine.step()
    engine.check_invariants()
    assert engine.stats().num_preemptions >= 2 and engine._in_flight is None
    monkeypatch.setattr(engine.runner, "execute", execute)
    done = drain_steps(engine)
    assert [done[r] for r in rids] == [o.token_ids for o in want]
    assert engine.cache.seq_ids == []


def test_an_abort_then_a_failed_read_leaves_no_unwritten_block_cached(checkpoint,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt's step is launched (its full blocks registered), the request is aborted, then
    reading the step reports a device fault: the blocks of its tokens are dropped, not left
    in the prefix cache for the next request to hit with keys/values never written."""
    import torch

    from kvforge.engine import overlap
    folder, _ = checkpoint
    prompt = list(range(20, 36))  # 4 full blocks of 4
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    want = Engine(str(folder), num_blocks=64, block_size=4).generate([prompt], params)[0].token_ids
    engine = Engine(str(folder), num_blocks=64, block_size=4, async_scheduling=True)
    execute = engine.runner.execute

    def unwritten(out, inputs=None):  # type: ignore[no-untyped-def]  # launches; the KV is never written
        return torch.zeros(len(out.decodes) + sum(c.samples for c in out.chunks), engine.model_config.vocab_size)

    def fault(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected device fault, reported at the read")

    monkeypatch.setattr(engine.runner, "execute", unwritten)
    rid = engine.add_request(prompt, params)
    engine.step()  # launched, in flight
    engine.abort(rid)
    assert engine.cache.prefix_stats().cached_blocks == 4  # freed unpublished, cached meanwhile
    monkeypatch.setattr(overlap.InFlightStep, "read", fault)
    with pytest.raises(RuntimeError, match="injected device fault"):
        engine.step()
    monkeypatch.undo()
    engine.check_invariants()
    assert engine.cache.prefix_stats().cached_blocks == 0
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == want and engine.stats().prefix_hit_tokens == 0


def test_nothing_is_left_in_flight_after_generate_or_a_closed_stream(checkpoint) -> None:
    folder, _ = checkpoint
    engine = Engine(str(folder), num_blocks=64, block_size=8, async_scheduling=True)
    prompt = [7, 8, 9] * 6
    free = Engine(str(folder), num_blocks=64, block_size=8).generate([prompt], SamplingParams(max_tokens=20))[0]
    stop = free.token_ids[5]  # a token it reaches (whatever the device's arithmetic)
    out = engine.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=(stop,)))[0]
    assert out.outputs[0].finish_reason == "stop"  # a step was launched ahead for it, then dropped
    assert not engine.has_unfinished_requests() and engine.cache.seq_ids == []
    stream = engine.stream([list(range(20, 40)), list(range(50, 60))], SamplingParams(max_tokens=30, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    assert not engine.has_unfinished_requests() and engine.cache.seq_ids == [] and engine.stats().used_blocks == 0
