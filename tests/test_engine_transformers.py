"""The engine over transformers models (``model_impl="transformers"``): greedy tokens equal ``generate``.

Every family of :data:`tests.hf_models.FAMILIES` (Phi-3 at head dim 96) is
written as a tiny random checkpoint with ``save_pretrained`` and run by the
engine through its own transformers model, in float32 on the CPU: a batch of
prompts of different lengths, then prompts sharing a prefix in a cache so small
that sequences are preempted (prefix hits and preemptions asserted, chunked
prefill on). Each request's tokens must equal transformers' own greedy
``generate`` of that prompt alone; the engine's invariants are checked after
every step. One family each also runs ``n > 1`` (forks), swaps to the host
tier, and compaction between every two steps; then which implementation
``model_impl="auto"`` picks, and the models that are refused, with why.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.hf_model import TransformersModel  # noqa: E402
from kvforge.engine.testing import hf_greedy, run_steps, save_tiny_checkpoint  # noqa: E402
from kvforge.errors import ConfigError, KVForgeError, ModelError  # noqa: E402
from tests.hf_models import FAMILIES, HEAD_DIM_96, save_tiny_model  # noqa: E402

MAX_NEW = 16
_rng = random.Random(4321)
MIXED = [[_rng.randrange(3, 128) for _ in range(n)] for n in (3, 11, 26, 40)]
_PREFIX = [_rng.randrange(3, 128) for _ in range(37)]
SHARED = [_PREFIX + [_rng.randrange(3, 128) for _ in range(n)] for n in (3, 9, 5, 1)]
#: per family: the tiny config's overrides (Phi-3 at head dim 96)
OVERRIDES: dict[str, dict[str, Any]] = {"phi3": HEAD_DIM_96}


class Reference:
    """A family's checkpoint folder and transformers' greedy outputs, computed once per prompt."""

    def __init__(self, family: str, folder: Path) -> None:
        self.family = family
        self.folder = str(folder)
        self.model = save_tiny_model(family, folder, **OVERRIDES.get(family, {}))
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def expected(self, prompt: list[int], max_tokens: int = MAX_NEW) -> list[int]:
        key = tuple(prompt)
        if key not in self._cache:
            self._cache[key] = hf_greedy(self.model, prompt, MAX_NEW)
        return self._cache[key][:max_tokens]  # greedy: a shorter run is a prefix

    def engine(self, **options: Any) -> Engine:
        engine = Engine(self.folder, model_impl="transformers", **options)
        assert engine.model_impl == "transformers"
        return engine


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    return {}


def ref_of(refs: dict[str, Reference], family: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    if family not in refs:
        refs[family] = Reference(family, tmp_path_factory.mktemp(family))
    return refs[family]


@pytest.fixture(params=list(FAMILIES))
def ref(request: pytest.FixtureRequest, refs: dict[str, Reference],
        tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return ref_of(refs, request.param, tmp_path_factory)


def test_batch_of_different_lengths(ref: Reference) -> None:
    engine = ref.engine(num_blocks=64, block_size=8)
    got = run_steps(engine, MIXED, [SamplingParams(max_tokens=MAX_NEW)] * len(MIXED))
    assert got == [ref.expected(p) for p in MIXED]
    assert len(set(map(tuple, got))) == len(MIXED)  # the rows differ: a row mix-up would show
    assert engine.stats().used_blocks == 0


def test_shared_prefixes_under_preemption(ref: Reference) -> None:
    """Prompts sharing 37 tokens in a cache of 12 blocks of 8: the later prompts hit the
    first one's blocks, chunked prefill (24 tokens a step) and decodes run in the same
    steps, and sequences are preempted and recomputed; the tokens stay transformers'."""
    # Gemma's blocks hold one layer group each (its window layers free theirs): 16 of them
    # hold a whole sequence, prefill chunks included, and still preempt
    grouped = ref.family in ("gemma2", "gemma3")
    engine = ref.engine(num_blocks=16 if grouped else 12, block_size=8, max_num_batched_tokens=24)
    assert (engine.cache.groups is not None) == grouped
    got = run_steps(engine, SHARED, [SamplingParams(max_tokens=MAX_NEW)] * len(SHARED))
    assert got == [ref.expected(p) for p in SHARED]
    stats = engine.stats()
    assert stats.prefix_hit_tokens > 0
    assert stats.num_preemptions > 0


def test_n_completions_fork_the_prompt(refs: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory) -> None:
    ref = ref_of(refs, "gemma2", tmp_path_factory)
    engine = ref.engine(num_blocks=64, block_size=8)
    outs = engine.generate(MIXED[1:3], SamplingParams(max_tokens=MAX_NEW, n=3))
    for prompt, out in zip(MIXED[1:3], outs):
        assert [c.token_ids for c in out.outputs] == [ref.expected(prompt)] * 3
    assert engine.cache.num_cow_copies > 0  # the completions shared the prompt's last block, then copied it
    engine.check_invariants()


def test_swaps_to_the_host_tier(refs: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory) -> None:
    ref = ref_of(refs, "qwen3", tmp_path_factory)
    engine = ref.engine(num_blocks=16, block_size=8, max_num_batched_tokens=24, host_memory="4MiB",
                        preemption_mode="swap")
    prompts = MIXED[1:] + [MIXED[2][::-1]]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=MAX_NEW)] * len(prompts))
    assert got == [ref.expected(p) for p in prompts]
    stats = engine.stats()
    assert stats.num_swaps_out > 0 and stats.num_swaps_in == stats.num_swaps_out


def test_compaction_between_steps(refs: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory) -> None:
    ref = ref_of(refs, "phi3", tmp_path_factory)
    engine = ref.engine(num_blocks=64, block_size=8, enable_compaction=True)
    assert engine.cache.config.head_dim == 96
    prompts = MIXED + SHARED
    max_tokens = [5, MAX_NEW, 9, 12, 3, 14, 10, 7]
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=m) for m in max_tokens], compact=True)
    assert got == [ref.expected(p, m) for p, m in zip(prompts, max_tokens)]
    stats = engine.stats()
    assert stats.num_compactions > 0 and stats.num_blocks_moved > 0


def test_an_already_loaded_transformers_model(refs: dict[str, Reference],
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """``Engine.from_model(TransformersModel(model))``: an engine over a model loaded elsewhere."""
    from transformers import AutoModelForCausalLM

    ref = ref_of(refs, "olmo2", tmp_path_factory)
    model = TransformersModel(AutoModelForCausalLM.from_pretrained(ref.folder, dtype="float32"))
    assert model.hf_model.config._attn_implementation == "kvforge_engine"
    engine = Engine.from_model(model, num_blocks=32, block_size=8)
    assert engine.model_impl == "transformers" and engine.tokenizer is None
    got = [o.token_ids for o in engine.generate(MIXED, SamplingParams(max_tokens=MAX_NEW))]
    assert got == [ref.expected(p) for p in MIXED]
    import torch

    with pytest.raises(KVForgeError, match="'kvforge_engine' runs only inside kvforge's Engine.*'kvforge'"):
        model.hf_model(torch.tensor([MIXED[1]]))  # outside an engine step
    with pytest.raises(ConfigError, match="model must be a LlamaModel or a TransformersModel, got OlmoModel"):
        Engine.from_model(object.__new__(type("OlmoModel", (), {})), num_blocks=8)


def test_auto_keeps_native_for_its_families(refs: dict[str, Reference],
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    for family, impl in (("llama", "native"), ("qwen2", "native"), ("gemma2", "transformers"),
                         ("phi3", "transformers")):
        ref = ref_of(refs, family, tmp_path_factory)
        engine = Engine(ref.folder, num_blocks=32, block_size=8)
        assert engine.model_impl == impl, family
        assert repr(engine).startswith(f"Engine({ref.model.config.architectures[0]}, {impl},")
        out = engine.generate(MIXED[2], SamplingParams(max_tokens=MAX_NEW))
        assert out[0].token_ids == ref.expected(MIXED[2])
    with pytest.raises(ModelError, match="Gemma2ForCausalLM is not supported.*model_impl='native'.*'transformers'"):
        Engine(ref_of(refs, "gemma2", tmp_path_factory).folder, num_blocks=32, model_impl="native")
    with pytest.raises(ConfigError, match="model_impl must be one of auto, native, transformers, got 'hf'"):
        Engine(ref_of(refs, "llama", tmp_path_factory).folder, num_blocks=32, model_impl="hf")


def test_an_option_native_lacks_runs_through_transformers(tmp_path: Path) -> None:
    """A Llama with a RoPE type the native decoder does not implement: "auto" keeps the
    native decoder for Llama and so refuses it, naming model_impl='transformers', which runs it."""
    model = save_tiny_checkpoint("LlamaForCausalLM", tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for impl in ("auto", "native"):
        with pytest.raises(ModelError, match=f"rope_type='dynamic' is not supported.*model_impl='{impl}'; "
                                             f"model_impl='transformers' runs it"):
            Engine(tmp_path, num_blocks=32, model_impl=impl)
    engine = Engine(tmp_path, num_blocks=32, block_size=8, model_impl="transformers")
    out = engine.generate(MIXED[2], SamplingParams(max_tokens=8))
    assert out[0].token_ids == hf_greedy(model, MIXED[2], 8)


def _saved(model: Any, folder: Path) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def test_models_it_cannot_drive_are_refused_with_why(tmp_path: Path) -> None:
    import transformers as tf

    cases = [
        (tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=2)), "T5ForConditionalGeneration .*encoder-decoder"),
        (tf.MambaForCausalLM(tf.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)),
         "MambaForCausalLM .*layers of type linear_attention .*state-space"),
        # ALiBi in its own attention code: no layer goes through transformers' attention interface
        (tf.BloomForCausalLM(tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=2)),
         "BloomForCausalLM .*0 of the model's 2 layers attended.*attention interface.*_supports_attention_backend"),
        (tf.BertModel(tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64)), "BertModel is not one of transformers' causal LMs"),
    ]
    for i, (model, why) in enumerate(cases):
        folder = _saved(model, tmp_path / str(i))
        for impl in ("auto", "transformers"):
            with pytest.raises(ModelError, match=why):
                Engine(folder, num_blocks=8, model_impl=impl)
    bloom = cases[2][0]
    impl = bloom.config._attn_implementation
    with pytest.raises(ModelError, match="0 of the model's 2 layers attended"):
        TransformersModel(bloom.train())
    assert bloom.config._attn_implementation == impl and bloom.training  # handed back as it came
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such"}))
    with pytest.raises(ModelError, match="transformers cannot read the config.*no_such"):
        Engine(bad, num_blocks=8)
    # a config.json whose architecture is not what its model_type builds
    lying = tmp_path / "lying"
    save_tiny_checkpoint("Qwen2ForCausalLM", lying)
    cfg = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**cfg, "architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(ModelError, match="names Gemma2ForCausalLM, whose config is Gemma2Config, but its "
                                         "model_type 'qwen2' reads as Qwen2Config"):
        Engine(lying, num_blocks=8)
    with pytest.raises(ModelError, match="is not a folder"):
        Engine(tmp_path / "missing", model_impl="transformers")


def test_a_checkpoint_missing_a_tensor_is_refused(refs: dict[str, Reference],
                                                  tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = Path(ref_of(refs, "gemma2", tmp_path_factory).folder)
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="has no tensor model.layers.1.mlp.down_proj.weight"):
        Engine(tmp_path, num_blocks=8)


def test_generate_command_takes_model_impl(refs: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvforge.tools.cli import main

    ref = ref_of(refs, "gemma3", tmp_path_factory)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in MIXED[:2]))
    argv = ["generate", "--model", ref.folder, "--prompts", str(prompts), "--max-tokens", str(MAX_NEW),
            "--device", "cpu", "--num-blocks", "32", "--block-size", "8", "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--model-impl", "transformers"]) == 0
    out = capsys.readouterr().out
    for i, p in enumerate(MIXED[:2]):
        want = ref.expected(p)
        assert f"[{i}] completion ({len(want)} tokens, " in out and f"{want!r}" in out
    assert main(argv + ["--model-impl", "native"]) == 2
    assert "Gemma3ForCausalLM is not supported" in capsys.readouterr().err


def test_a_length_dependent_rope_keeps_the_context_where_its_frequencies_are_fixed(tmp_path: Path) -> None:
    """longrope (Phi-3-128k) and dynamic NTK pick their frequencies from the forward's longest
    position; the engine batches sequences into one forward, so its context stops at the
    original length, where they are fixed: a short prompt batched with a longer one gets
    transformers' own tokens, and a prompt past that length is refused, naming it."""
    import transformers as tf

    cfg = tf.Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                        original_max_position_embeddings=16, pad_token_id=0,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    model = tf.Phi3ForCausalLM(cfg).eval()
    folder = _saved(model, tmp_path / "phi3-longrope")
    engine = Engine(folder, num_blocks=16, block_size=4, model_impl="transformers")
    assert engine.max_model_len == 16
    short, longer = [3, 4, 5, 6], list(range(10, 22))
    outs = engine.generate([short, longer], SamplingParams(max_tokens=4))
    assert outs[0].token_ids == hf_greedy(model, short, 4) and outs[1].token_ids == hf_greedy(model, longer, 4)
    with pytest.raises(KVForgeError, match="16"):
        engine.generate([list(range(10, 30))], SamplingParams(max_tokens=2))
