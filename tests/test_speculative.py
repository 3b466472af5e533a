"""Prompt-lookup speculative decoding (kvforge.engine.speculative) and the engine running it.

The drafts and the greedy check on their own; then engines with
``speculative_tokens`` against the same engine without them and against
transformers' own ``generate`` (float32, tiny random checkpoints): the same
tokens, with drafts accepted on a repetitive workload, through stop tokens,
length limits, preemption in a small cache, shared prefixes and compaction;
sampled requests decode one token a step beside drafting greedy ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kvforge.config import ConfigError  # noqa: E402
from kvforge.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from kvforge.engine.speculative import accept_greedy, propose_ngram  # noqa: E402
from kvforge.engine.testing import drain_steps, hf_greedy, save_tiny_checkpoint  # noqa: E402


def test_propose_takes_what_followed_the_latest_earlier_occurrence() -> None:
    ids = [5, 6, 7, 8, 9, 1, 5, 6, 7, 3, 4, 5, 6, 7]
    # the last three (5 6 7) occurred at 6..8 (followed by 3 4 5 ...) and at 0..2: the latest wins
    assert propose_ngram(ids, 3) == [3, 4, 5]
    assert propose_ngram(ids, 10) == [3, 4, 5, 6, 7, 3, 4, 5, 6, 7]  # past the end: the copy loops
    assert propose_ngram([1, 2, 3, 9, 2, 3], 2, max_ngram=3) == [9, 2]  # no 3-gram: the 2-gram (2 3)
    assert propose_ngram([1, 2, 3, 4], 2) == []  # nothing repeats
    assert propose_ngram([4, 4], 3) == [4, 4, 4]
    assert propose_ngram([1, 8, 9, 2, 8, 9], 5) == [2, 8, 9, 2, 8]  # period 3, from the occurrence to the end
    assert propose_ngram([1, 2, 1], 0) == [] and propose_ngram([1], 3) == []


def test_accept_keeps_drafts_up_to_the_first_miss_then_the_models_pick() -> None:
    assert accept_greedy([3, 4, 5], [3, 4, 5, 6]) == [3, 4, 5, 6]  # all accepted, one more
    assert accept_greedy([3, 4, 5], [3, 9, 5, 6]) == [3, 9]
    assert accept_greedy([3, 4, 5], [8, 4, 5, 6]) == [8]  # none: the step still yields a token
    with pytest.raises(ValueError, match="one more pick than drafts"):
        accept_greedy([3, 4], [3, 4])


def test_the_options_are_checked() -> None:
    assert EngineConfig(speculative_tokens=4).speculative_tokens == 4
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="speculative_tokens"):
            EngineConfig(speculative_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="speculative_ngram"):
        EngineConfig(speculative_ngram=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("spec") / "ckpt"
    model = save_tiny_checkpoint("LlamaForCausalLM", folder, eos_token_id=7, max_position_embeddings=512)
    return folder, model


def _repetitive(n: int, period: int, offset: int) -> list[int]:
    return [10 + offset + (i % period) for i in range(n)]


def test_greedy_output_is_plain_decodings_and_drafts_are_accepted(checkpoint) -> None:
    folder, model = checkpoint
    prompts = [_repetitive(40, 5, 0), _repetitive(33, 7, 20), list(range(40, 80)), _repetitive(25, 3, 50)]
    params = SamplingParams(max_tokens=24)
    plain = Engine(str(folder), num_blocks=64, block_size=8)
    spec = Engine(str(folder), num_blocks=64, block_size=8, speculative_tokens=4)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    for p, w in zip(prompts, want):
        assert w == hf_greedy(model, p, 24)
    st = spec.stats()
    assert st.num_draft_tokens > 0 and 0 < st.num_accepted_tokens <= st.num_draft_tokens
    assert 0 < st.draft_acceptance_rate <= 1.0
    assert st.num_decode_steps < plain.stats().num_decode_steps  # accepted drafts saved steps
    assert [o.finish_reason for o in got] == [o.finish_reason for o in plain.generate(prompts, params)]
    spec.check_invariants()
    assert spec.cache.seq_ids == []


def test_stop_tokens_length_limits_preemption_prefixes_and_compaction(checkpoint) -> None:
    """A small cache (preemption), shared prefixes, compaction after every step, stop tokens
    (the tiny model's eos is 7) and limits inside an accepted run: still plain decoding's tokens."""
    folder, _ = checkpoint
    base = _repetitive(24, 4, 0)
    prompts = [base + _repetitive(9, 3, 30 + i) for i in range(5)] + [[7, 8, 9] * 6]
    params = [SamplingParams(max_tokens=n) for n in (5, 17, 1, 30, 12, 20)]

    def run(**kw: object) -> tuple[list, Engine]:
        e = Engine(str(folder), num_blocks=14, block_size=8, max_num_seqs=4, **kw)
        outs = e.generate(prompts, params, on_step=lambda eng: eng.cache.compact_cache())
        e.check_invariants()
        return outs, e

    (want, _), (got, spec) = run(), run(speculative_tokens=3)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert all(len(o.token_ids) <= p.max_tokens for o, p in zip(got, params))
    st = spec.stats()
    assert st.num_preemptions > 0 and st.prefix.hit_tokens > 0 and st.num_draft_tokens > 0


def test_sampled_requests_decode_one_token_beside_drafting_greedy_ones(checkpoint) -> None:
    """A sampled request never drafts (it would need rejection sampling) but shares the steps of
    greedy ones that do: every output, the seeded sampled one included, is plain decoding's."""
    folder, _ = checkpoint
    prompts = [_repetitive(30, 5, 0), _repetitive(30, 4, 20), _repetitive(26, 3, 40)]
    params = [SamplingParams(max_tokens=16, temperature=0.8, seed=3), SamplingParams(max_tokens=16),
              SamplingParams(max_tokens=16, temperature=1.2, top_k=20, seed=5)]
    plain = Engine(str(folder), num_blocks=64, block_size=8).generate(prompts, params)
    engine = Engine(str(folder), num_blocks=64, block_size=8, speculative_tokens=4)
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert engine.stats().num_draft_tokens > 0  # the greedy one drafted
    alone = Engine(str(folder), num_blocks=64, block_size=8, speculative_tokens=4)
    alone.generate([prompts[0]], params[0])
    assert alone.stats().num_draft_tokens == 0  # a sampled request alone: no drafts at all


def test_a_failed_speculative_step_leaves_no_draft_block_in_the_prefix_cache(checkpoint,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts fill blocks that are registered for prefix reuse as they fill; a step that fails
    before computing them takes them back and drops those blocks (their keys/values were never
    written), keeps the ones computed before, and the request then completes with plain
    decoding's tokens."""
    folder, _ = checkpoint
    prompt = _repetitive(24, 3, 0)
    params = SamplingParams(max_tokens=40)
    want = Engine(str(folder), num_blocks=64, block_size=4).generate([prompt], params)[0].token_ids
    engine = Engine(str(folder), num_blocks=64, block_size=4, speculative_tokens=8)
    rid = engine.add_request(prompt, params)
    logits = engine.runner.logits

    def failing(batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(engine.runner, "logits", failing)  # only a step with drafts runs through it
    for _ in range(40):
        cached = engine.cache.prefix_stats().cached_blocks
        drafted = engine.stats().num_draft_tokens
        try:
            engine.step()
        except RuntimeError as exc:
            assert "injected" in str(exc)
            break
    else:
        pytest.fail("no step drafted")
    assert engine.stats().num_draft_tokens - drafted >= 4  # at least one full block of drafts
    engine.check_invariants()
    assert engine.cache.prefix_stats().cached_blocks <= cached and engine.cache.seq_ids == []
    monkeypatch.setattr(engine.runner, "logits", logits)
    assert drain_steps(engine)[rid] == want


def test_the_incremental_index_proposes_what_the_search_does() -> None:
    """The engine's per-sequence index gives propose_ngram's drafts at every length of a
    growing sequence (random short-alphabet texts: many repeats, loops, misses)."""
    import random

    from kvforge.engine.speculative import NgramIndex
    rng = random.Random(0)
    for trial in range(60):
        ngram, k = rng.randint(1, 4), rng.randint(0, 6)
        ids = [rng.randrange(4 if trial % 2 else 9) for _ in range(rng.randint(1, 5))]
        index = NgramIndex(ngram)
        for _ in range(40):
            assert index.propose(ids, k) == propose_ngram(ids, k, ngram), (ids, k, ngram)
            ids += [rng.randrange(4 if trial % 2 else 9) for _ in range(rng.randint(1, 3))]
