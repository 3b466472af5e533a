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
from kvforge.engine.cli import main as cli_main  # noqa: E402
from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint, tiny_hf_model  # noqa: E402
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
    engine.runner.execute = lambda step: (seen.append(len(step.input_ids)), run(step))[1]  # type: ignore[method-assign]
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=5))
    assert max(seen) <= 8 and len(seen) >= sum(map(len, PROMPTS)) // 8
    assert [o.token_ids for o in out] == [hf_greedy(model, p, 5) for p in PROMPTS]


def test_preemption_takes_the_most_recently_admitted(ckpt: tuple[str, object]) -> None:
    folder, model = ckpt
    engine = small(folder, num_blocks=9)
    sched = engine.scheduler
    victims = []
    preempt = sched._preempt

    def spy(victim, preempted):  # type: ignore[no-untyped-def]
        assert victim.admit_order == max(s.admit_order for s in sched.running)
        victims.append(victim.seq_id)
        preempt(victim, preempted)

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
