"""The engine's API: loading errors, request validation, stopping, abort,
streaming, stats and timings, text prompts, sharded checkpoints, the CLI,
random weights, and the scheduler's policies (chunking budget, preemption
order), with the cache's invariants checked along the way."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


pytest.importorskip("transformers")

from kvforge.config import CacheConfig  # noqa: E402
from kvforge.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from kvforge.tools.generate import main as cli_main  # noqa: E402
from kvforge.engine.testing import drain_steps, hf_greedy, save_tiny_checkpoint, tiny_hf_model  # noqa: E402
from kvforge.errors import ConfigError, ModelError, OutOfBlocksError, SequenceError  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42], [8, 64, 11, 23, 71, 7, 7, 9, 100, 101, 3, 4], list(range(3, 30))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    folder = str(tmp_path_factory.mktemp("llama"))
    model = save_tiny_checkpoint("LlamaForCausalLM", folder, eos_token_id=None)
    return folder, model


def small(folder: str, **kw: object) -> Engine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 8)
    return Engine(folder, **kw)


# ---------------------------------------------------------------- loading
def test_unknown_architecture_is_refused(ckpt: tuple[str, object], tmp_path: str) -> None:
    folder, _ = ckpt
    bad = os.path.join(tmp_path, "gpt2")
    shutil.copytree(folder, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        Engine(bad, num_blocks=8)


def test_unsupported_rope_and_missing_files(ckpt: tuple[str, object], tmp_path: str) -> None:
    folder, _ = ckpt
    cfg = json.load(open(os.path.join(folder, "config.json")))
    with pytest.raises(ModelError, match="yarn"):
        Engine.from_config({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                           num_blocks=8)
    with pytest.raises(ModelError, match="config.json"):
        Engine(str(tmp_path), num_blocks=8)
    pickled = os.path.join(tmp_path, "pickled")
    os.makedirs(pickled)
    shutil.copy(os.path.join(folder, "config.json"), pickled)
    torch.save({}, os.path.join(pickled, "pytorch_model.bin"))
    with pytest.raises(ModelError, match="pickle"):
        Engine(pickled, num_blocks=8)


def test_missing_tensor_is_named(ckpt: tuple[str, object], tmp_path: str) -> None:
    from safetensors.torch import load_file, save_file
    folder, _ = ckpt
    broken = os.path.join(tmp_path, "broken")
    shutil.copytree(folder, broken)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        Engine(broken, num_blocks=8)


def test_sharded_checkpoint_loads(tmp_path: str) -> None:
    folder = os.path.join(tmp_path, "sharded")
    model = tiny_hf_model("Qwen2ForCausalLM", eos_token_id=None)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    out = small(folder).generate([PROMPTS[1]], SamplingParams(max_tokens=10))
    assert out[0].token_ids == hf_greedy(model, PROMPTS[1], 10)


# --------------------------------------------------------------- requests
def test_prompt_too_long_for_the_cache(ckpt: tuple[str, object]) -> None:
    folder, _ = ckpt
    engine = small(folder, num_blocks=4)  # 32 tokens in all
    with pytest.raises(OutOfBlocksError, match="40 tokens"):
        engine.add_request(list(range(3, 43)))
    with pytest.raises(OutOfBlocksError):
        engine.generate([PROMPTS[0], list(range(3, 43))])
    assert not engine.has_unfinished_requests()  # nothing was queued
    with pytest.raises(ModelError, match="positions"):
        small(folder, max_model_len=16).add_request(list(range(3, 23)))


@pytest.mark.parametrize("prompt", [[], [3, 500], [-1, 4]])
def test_invalid_prompts(ckpt: tuple[str, object], prompt: list[int]) -> None:
    with pytest.raises(ConfigError):
        small(ckpt[0]).add_request(prompt)


def test_text_needs_a_tokenizer_and_options_are_checked(ckpt: tuple[str, object]) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        small(ckpt[0]).add_request("hello")
    with pytest.raises(ConfigError, match="max_num_sqs"):
        small(ckpt[0], max_num_sqs=4)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    wrong = CacheConfig(block_size=8, num_blocks=8, num_layers=2, num_kv_heads=2, head_dim=32)
    with pytest.raises(ConfigError, match="head_dim"):
        Engine(ckpt[0], wrong)
    right = Engine(ckpt[0], wrong.replace(head_dim=16))  # dtype and device follow the model
    assert right.cache.config.dtype == torch.float32 and right.cache.config.num_blocks == 8


def test_stop_tokens_max_tokens_and_eos(ckpt: tuple[str, object], tmp_path: str) -> None:
    folder, model = ckpt
    ref = hf_greedy(model, PROMPTS[1], 12)
    stop = ref[4]
    first = ref.index(stop)
    engine = small(folder)
    out = engine.generate([PROMPTS[1]] * 2, [SamplingParams(max_tokens=12, stop_token_ids=(stop,)),
                                             SamplingParams(max_tokens=7)])
    assert out[0].token_ids == ref[: first + 1] and out[0].finish_reason == "stop"
    assert out[1].token_ids == ref[:7] and out[1].finish_reason == "length"
    eos_folder = os.path.join(tmp_path, "eos")
    save_tiny_checkpoint("LlamaForCausalLM", eos_folder, eos_token_id=stop)  # same weights, an EOS
    eos_engine = small(eos_folder)
    got = eos_engine.generate([PROMPTS[1]] * 2, [SamplingParams(max_tokens=12),
                                                 SamplingParams(max_tokens=12, ignore_eos=True)])
    assert got[0].token_ids == ref[: first + 1] and got[0].finish_reason == "stop"
    assert got[1].token_ids == ref and got[1].finish_reason == "length"


def test_abort_frees_everything(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0], enable_prefix_caching=False)
    rids = [engine.add_request(p, SamplingParams(max_tokens=50, n=2 if i == 0 else 1))
            for i, p in enumerate(PROMPTS)]
    for _ in range(3):
        engine.step()
    assert engine.stats().used_blocks > 0
    forked = engine._requests[rids[0]]
    assert len(forked.seqs) == 2 and all(s.seq_id in engine.cache for s in forked.seqs)
    engine.abort(rids[0])
    engine.check_invariants()
    assert all(s.seq_id not in engine.cache and s.finish_reason == "abort" for s in forked.seqs)
    waiting = engine.add_request(PROMPTS[0])  # aborted while still waiting
    engine.abort(waiting)
    for r in rids[1:]:
        engine.abort(r)
    engine.check_invariants()
    assert engine.stats().used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.cache.seq_ids == []
    with pytest.raises(SequenceError):
        engine.abort("no-such-request")


def test_streaming_snapshots_add_up(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    engine = small(folder, max_num_batched_tokens=8)
    pieces: dict[str, list[int]] = {}
    finals = {}
    for snap in engine.stream(PROMPTS, SamplingParams(max_tokens=9)):
        pieces.setdefault(snap.request_id, []).extend(snap.outputs[0].new_token_ids)
        if snap.finished:
            finals[snap.request_id] = snap
    assert len(finals) == 3
    for rid, snap in finals.items():
        assert pieces[rid] == snap.token_ids
    expected = {tuple(hf_greedy(model, p, 9)) for p in PROMPTS}
    assert {tuple(s.token_ids) for s in finals.values()} == expected


def test_stats_and_timings(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0])
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6))
    st = engine.stats()
    assert st.num_generated_tokens == 18 and st.num_finished_requests == 3
    assert st.num_prompt_tokens_computed == sum(map(len, PROMPTS))
    assert st.max_concurrent_seqs == 3 and st.used_blocks == 0 and st.peak_used_blocks > 0
    assert st.cache_usage == 0.0 and st.peak_kv_bytes == st.peak_used_blocks * engine.cache.config.bytes_per_block
    assert "prefix hit rate" in st.summary() and isinstance(st.to_dict()["allocation"], dict)
    for o in outs:
        m = o.metrics
        assert m.ttft is not None and m.ttft > 0 and len(m.inter_token_latencies) == 5
        assert m.finish_time is not None and m.finish_time >= m.first_token_time


# -------------------------------------------------------------- scheduler
def test_chunked_prefill_respects_the_budget(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    engine = small(folder, max_num_batched_tokens=8)
    seen: list[int] = []
    run = engine.runner.execute
    engine.runner.execute = lambda step: (seen.append(step.num_tokens), run(step))[1]  # type: ignore[method-assign]
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=5))
    assert max(seen) <= 8 and len(seen) >= sum(map(len, PROMPTS)) // 8
    assert [o.token_ids for o in out] == [hf_greedy(model, p, 5) for p in PROMPTS]


def test_preemption_takes_the_most_recently_admitted(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    engine = small(folder, num_blocks=9)
    sched = engine.scheduler
    victims = []
    preempt = sched._preempt

    def spy(victim, preempted, **kw):  # type: ignore[no-untyped-def]
        assert victim.admit_order == max(s.admit_order for s in sched.running)
        victims.append(victim.seq_id)
        preempt(victim, preempted, **kw)

    sched._preempt = spy  # type: ignore[method-assign]
    rids = [engine.add_request(p, SamplingParams(max_tokens=20)) for p in PROMPTS]
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
    assert victims and engine.stats().num_preemptions == len(victims)
    assert all(engine.cache.seq_ids == [] for _ in rids)


# ----------------------------------------------------------- text and CLI
def _word_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))


def test_text_prompts_with_a_tokenizer(ckpt: tuple[str, object], tmp_path: str) -> None:
    pytest.importorskip("tokenizers")
    folder, model = ckpt
    texted = os.path.join(tmp_path, "texted")
    shutil.copytree(folder, texted)
    _word_tokenizer(texted)
    engine = small(texted)
    assert engine.tokenizer is not None
    out = engine.generate("w5 w17 w99 w3 w42", SamplingParams(max_tokens=6))[0]
    assert out.prompt_token_ids == PROMPTS[0]
    assert out.token_ids == hf_greedy(model, PROMPTS[0], 6)
    assert out.text is not None and out.text.split() == [f"w{t}" for t in out.token_ids]


def test_cli_generate(ckpt: tuple[str, object], tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder, model = ckpt
    jsonl = os.path.join(tmp_path, "prompts.jsonl")
    with open(jsonl, "w") as fh:
        for p in PROMPTS[:2]:
            fh.write(json.dumps({"prompt_token_ids": p}) + "\n")
        fh.write(json.dumps({"prompt_token_ids": PROMPTS[2], "max_tokens": 3}) + "\n")
    code = cli_main(["generate", "--model", folder, "--prompts", jsonl, "--max-tokens", "5", "--num-blocks", "32",
                     "--block-size", "8", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert f"completion (5 tokens, length): {hf_greedy(model, PROMPTS[0], 5)!r}" in text
    assert "completion (3 tokens, length)" in text
    summary = text.strip().splitlines()[-1]
    assert "3 requests, 13 tokens" in summary and "tok/s" in summary and "prefix hit rate" in summary
    assert cli_main(["generate", "--model", folder, "--prompt", "hi", "--num-blocks", "8", "--device", "cpu"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_random_weights_engine(ckpt: tuple[str, object]) -> None:
    cfg = json.load(open(os.path.join(ckpt[0], "config.json")))
    a = Engine.from_config(cfg, num_blocks=32, block_size=8, seed=3).generate(PROMPTS, SamplingParams(max_tokens=4))
    b = Engine.from_config(cfg, num_blocks=32, block_size=8, seed=3).generate(PROMPTS, SamplingParams(max_tokens=4))
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and all(len(o.token_ids) == 4 for o in a)


def test_bfloat16_on_cpu_runs(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0], dtype="bfloat16")
    assert engine.cache.config.dtype == torch.bfloat16
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=4))
    assert all(len(o.token_ids) == 4 for o in out)


# ------------------------------------------------------------ review fixes
def test_kv_budget_as_the_second_argument(ckpt: tuple[str, object]) -> None:
    folder, _ = ckpt
    by_str = Engine(folder, "64KiB", block_size=8)
    per_block = by_str.cache.config.bytes_per_block
    assert by_str.cache.config.num_blocks == 64 * 1024 // per_block
    assert Engine(folder, 10 * per_block, block_size=8).cache.config.num_blocks == 10
    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    assert Engine.from_config(cfg, 12 * per_block, block_size=8).cache.config.num_blocks == 12
    for bad, match in ((2.5, "CacheConfig or a KV memory budget"), (True, "CacheConfig or a KV memory budget"),
                       ("lots", "byte size"), (0, "positive")):
        with pytest.raises(ConfigError, match=match):
            Engine(folder, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="given twice"):
        Engine(folder, "1MiB", kv_memory="2MiB")


def test_out_of_range_seeds_are_refused_and_extreme_ones_sample(ckpt: tuple[str, object]) -> None:
    for seed in (2**63, -1, 10**30, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            SamplingParams(seed=seed)  # type: ignore[arg-type]
    engine = small(ckpt[0])
    outs = engine.generate(PROMPTS[:2], [SamplingParams(max_tokens=3, temperature=1.0, seed=2**63 - 1, n=2),
                                         SamplingParams(max_tokens=3, temperature=1.0, top_k=2**70, seed=0)])
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [3, 3, 3]
    engine.check_invariants()


def test_a_failing_step_leaves_the_engine_consistent(ckpt: tuple[str, object],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder, model = ckpt
    engine = small(folder)
    execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(inputs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected kernel failure")
        return execute(inputs)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    rids = [engine.add_request(p, SamplingParams(max_tokens=6, n=2 if i == 0 else 1)) for i, p in enumerate(PROMPTS)]
    engine.step()
    engine.step()
    assert engine.stats().used_blocks > 0
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.check_invariants()
    assert engine.cache.seq_ids == [] and engine.stats().used_blocks == 0  # everything went back to waiting
    # the prompts' full blocks computed before the failed step stay cached (1 of prompt 2, 3 of
    # prompt 3); the failed step's tokens filled no block, so nothing else is cached
    assert engine.cache.prefix_stats().cached_blocks == 4
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
    for rid, p in zip(rids, PROMPTS):
        assert all(c.token_ids == hf_greedy(model, p, 6) for c in done[rid].outputs)
    assert len(done[rids[0]].outputs) == 2

    # generate: the step raises, its requests are aborted, a later generate works
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    engine.check_invariants()
    assert not engine.has_unfinished_requests() and engine.stats().used_blocks == 0 and not engine._requests
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=4))
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 4) for p in PROMPTS]


def test_bad_params_in_a_batch_queue_nothing(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0])
    for params in ([SamplingParams(), {"max_tokens": 3}], {"max_tokens": 3}, [SamplingParams(), None, 3]):
        with pytest.raises(ConfigError, match="SamplingParams"):
            engine.generate([PROMPTS[0], PROMPTS[1]] + ([PROMPTS[2]] if len(params) == 3 else []),
                            params)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="token ids"):
        engine.generate([PROMPTS[0], [1.5, 2.0]])
    with pytest.raises(ConfigError, match="SamplingParams"):
        engine.add_request(PROMPTS[0], {"max_tokens": 3})  # type: ignore[arg-type]
    assert not engine._requests and not engine.has_unfinished_requests() and engine.stats().num_requests == 0


def test_corrupt_or_truncated_weights_name_the_file(ckpt: tuple[str, object], tmp_path: str) -> None:
    for name, cut in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00" * 64)):
        bad = os.path.join(tmp_path, name)
        shutil.copytree(ckpt[0], bad)
        path = os.path.join(bad, "model.safetensors")
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(cut(data))
        with pytest.raises(ModelError, match="model.safetensors"):
            Engine(bad, num_blocks=8, block_size=8)


def test_unused_checkpoint_tensors_are_refused(ckpt: tuple[str, object], tmp_path: str) -> None:
    from safetensors.torch import load_file, save_file

    bad = os.path.join(tmp_path, "extra")
    shutil.copytree(ckpt[0], bad)
    path = os.path.join(bad, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(64)  # config says mlp_bias=False
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"2 tensor\(s\).*model\.layers\.0\.mlp\.down_proj\.bias"):
        Engine(bad, num_blocks=8, block_size=8)


def test_jsonl_prompt_fields_are_checked(ckpt: tuple[str, object], tmp_path: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ('{"prompt_token_ids": [5, 6], "max_tokens": "x"}', '{"prompt_token_ids": [5, 6], "max_tokens": 2.5}',
                '{"prompt_token_ids": [5, 6], "max_tokens": 0}', '{"prompt_token_ids": "56"}', '{"prompt": 7}'):
        jsonl = os.path.join(tmp_path, "p.jsonl")
        with open(jsonl, "w") as fh:
            fh.write('{"prompt_token_ids": [3, 4]}\n' + bad + "\n")
        code = cli_main(["generate", "--model", ckpt[0], "--prompts", jsonl, "--num-blocks", "8",
                         "--block-size", "8", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and f"{jsonl}:2:" in err and "Traceback" not in err, (bad, err)


def test_closing_a_stream_aborts_its_requests(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0])
    it = engine.stream(PROMPTS, SamplingParams(max_tokens=40))
    first = next(it)
    assert not first.finished and engine.stats().used_blocks > 0
    it.close()
    engine.check_invariants()
    assert engine.stats().used_blocks == 0 and not engine.has_unfinished_requests() and not engine._requests

    engine.check_invariants()
    for _ in engine.stream([PROMPTS[0]], SamplingParams(max_tokens=40)):
        break  # a `break` drops the generator: CPython closes it at once
    assert engine.stats().used_blocks == 0 and not engine._requests


def test_a_request_aborted_during_a_stream_gets_a_final_snapshot(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0])
    finals = {}
    aborted = None
    for snap in engine.stream(PROMPTS, SamplingParams(max_tokens=6)):
        if aborted is None:
            aborted = snap.request_id
            engine.abort(aborted)
        if snap.finished:
            assert snap.request_id not in finals
            finals[snap.request_id] = snap
    assert len(finals) == 3
    assert finals[aborted].finish_reason == "abort" and finals[aborted].finished
    assert all(s.finish_reason == "length" for r, s in finals.items() if r != aborted)
    engine.check_invariants()
    assert engine.stats().used_blocks == 0 and not engine._requests


def test_stats_read_as_a_mapping(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0])
    engine.generate([PROMPTS[2], PROMPTS[2]], SamplingParams(max_tokens=2))
    st = engine.stats()
    assert st["prefix_hit_rate"] == st.prefix_hit_rate > 0
    assert "memory_efficiency" in st.keys() and "num_evictions" in st and "nope" not in st
    assert dict(st.items())["num_generated_tokens"] == 4 and len(st) == len(list(st))
    assert st.memory_efficiency == pytest.approx(engine.cache.memory_efficiency())
    assert st.num_evictions == engine.cache.prefix_stats().evictions == 0
    assert st.to_dict()["memory_efficiency"] == st.memory_efficiency
    with pytest.raises(KeyError, match="no field 'nope'") as info:
        st["nope"]
    from kvforge.errors import KVForgeError
    assert isinstance(info.value, KVForgeError)


def test_stats_count_prefix_evictions(ckpt: tuple[str, object]) -> None:
    engine = small(ckpt[0], num_blocks=6)  # 48 token slots: later prompts evict earlier cached blocks
    for start in (3, 40, 80):
        engine.generate([list(range(start, start + 30))], SamplingParams(max_tokens=2))
    st = engine.stats()
    assert st.num_evictions == engine.cache.prefix_stats().evictions > 0


def test_tensor_and_array_prompts(ckpt: tuple[str, object]) -> None:
    import numpy as np

    folder, model = ckpt
    engine = small(folder)
    want = hf_greedy(model, PROMPTS[0], 3)
    params = SamplingParams(max_tokens=3)
    for prompt in (torch.tensor(PROMPTS[0]), np.array(PROMPTS[0]), [np.int64(t) for t in PROMPTS[0]],
                   torch.tensor(PROMPTS[0], dtype=torch.int32)):
        outs = engine.generate(prompt, params)
        assert len(outs) == 1 and outs[0].token_ids == want
    outs = engine.generate([torch.tensor(PROMPTS[0]), np.array(PROMPTS[1])], params)
    assert [o.token_ids for o in outs] == [want, hf_greedy(model, PROMPTS[1], 3)]
    stacked = engine.generate(np.array([PROMPTS[0], PROMPTS[0]]), params)  # 2-D: one prompt per row
    assert [o.token_ids for o in stacked] == [want, want]
    for bad in (torch.tensor([5.0, 6.0]), np.array(5), np.array([True, False])):
        with pytest.raises(ConfigError, match="1-D integer"):
            engine.generate(bad, params)
    assert not engine._requests


def test_a_failed_step_drops_only_the_blocks_it_never_computed(ckpt: tuple[str, object],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery keeps what is good: the step's own sequences are preempted, the block its
    decode filled (registered, never written) leaves the prefix cache, the computed block
    stays, and every request still completes with the right tokens."""
    folder, model = ckpt
    engine = small(folder, max_num_batched_tokens=16)
    prompt = list(range(10, 25))                      # 15 tokens: block 0 full, block 1 holds 7
    other = list(range(40, 60))                       # 20 tokens: a second chunk waits for a later step
    rid = engine.add_request(prompt, SamplingParams(max_tokens=4))
    engine.step()                                     # prompt computed (15 tokens), first token sampled
    other_rid = engine.add_request(other, SamplingParams(max_tokens=4))
    assert engine.cache.prefix_stats().cached_blocks == 1
    execute = engine.runner.execute

    def failing(out):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(engine.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()                                 # the decode fills block 1; the other prompt's first chunk
    engine.check_invariants()
    # block 1 (filled by the failed decode) is gone; block 0 and nothing of the failed chunk stays
    stats = engine.cache.prefix_stats()
    assert stats.cached_blocks == 1 and engine.cache.seq_ids == []
    monkeypatch.setattr(engine.runner, "execute", execute)
    done = drain_steps(engine)
    assert done[rid] == hf_greedy(model, prompt, 4) and done[other_rid] == hf_greedy(model, other, 4)

