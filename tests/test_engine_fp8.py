"""The engine with an fp8 KV cache: ``kv_dtype``, its sizing, checkpoint scales, accuracy.

Accuracy is measured against the same engine (the same model object) with a
float32 cache, on the CPU: the model runs float32, only the cache stores fp8.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from kvforge.config import CacheConfig
from kvforge.engine import Engine, EngineConfig, SamplingParams
from kvforge.engine.testing import add_kv_scales, save_tiny_checkpoint, teacher_forced_logits
from kvforge.errors import ConfigError, ModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("transformers")

#: a tiny Llama with the engine's own random weights (normal, initializer_range)
TINY: dict[str, Any] = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.02,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fp8ckpt") / "plain"
    save_tiny_checkpoint("LlamaForCausalLM", folder)
    return folder


def with_scales(ckpt: Path, tmp_path: Path, scales: dict[int, tuple[Any, Any]], names: str = "self_attn.{kv}_scale",
                name: str = "scaled") -> Path:
    """A copy of ``ckpt`` with KV scales added to its safetensors file."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(ckpt, folder)
    add_kv_scales(folder, scales, names)
    return folder


# ------------------------------------------------------------------ kv_dtype
def test_kv_dtype_is_validated_naming_the_value() -> None:
    assert EngineConfig().resolved_kv_dtype is None and EngineConfig(kv_dtype="auto").resolved_kv_dtype is None
    assert EngineConfig(kv_dtype="fp8_e4m3").resolved_kv_dtype == torch.float8_e4m3fn
    assert EngineConfig(kv_dtype="fp8_e5m2").is_fp8 and not EngineConfig(kv_dtype="float32").is_fp8
    for bad in ("fp9", "int8", 8, "fp8_e4m3fnuz"):
        with pytest.raises(ConfigError, match="kv_dtype") as info:
            EngineConfig(kv_dtype=bad)
        assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="'fp9'"):
        Engine.from_config(TINY, device="cpu", num_blocks=8, kv_dtype="fp9")
    # a cache that is not fp8 stores in the model dtype: another one is refused, naming both
    with pytest.raises(ConfigError, match="kv_dtype='float16'.*float32"):
        Engine.from_config(TINY, device="cpu", num_blocks=8, kv_dtype="float16")


def test_the_same_kv_memory_holds_twice_the_blocks() -> None:
    bf16 = Engine.from_config(TINY, device="cpu", dtype="bfloat16", kv_memory="1MiB")
    fp8 = Engine.from_model(bf16.model, kv_memory="1MiB", kv_dtype="fp8_e4m3")
    e5m2 = Engine.from_model(bf16.model, kv_memory="1MiB", kv_dtype="fp8_e5m2")
    b, f = bf16.cache.config, fp8.cache.config
    assert b.dtype == torch.bfloat16 and f.dtype == torch.float8_e4m3fn and e5m2.cache.config.dtype == torch.float8_e5m2
    assert f.resolved_model_dtype == torch.bfloat16 and f.bytes_per_block * 2 == b.bytes_per_block
    assert b.num_blocks == 2**20 // b.bytes_per_block == 256
    assert f.num_blocks == e5m2.cache.config.num_blocks == 2 * b.num_blocks
    assert fp8.max_model_len == bf16.max_model_len and fp8.kv_scales_source == "default"
    assert bf16.kv_scales_source is None
    for layer in range(2):
        assert fp8.cache.kv_scales(layer).k_scale.tolist() == [1.0, 1.0]


def test_a_given_fp8_cache_config_stays_fp8_with_the_model_dtype() -> None:
    """cache_config_for used to replace the dtype by the model's: an fp8 config became bf16."""
    given = CacheConfig(block_size=16, num_blocks=32, num_layers=2, num_kv_heads=2, head_dim=16, dtype="fp8_e5m2")
    e = Engine.from_config(TINY, given, device="cpu")
    c = e.cache.config
    assert c.dtype == torch.float8_e5m2 and c.model_dtype == torch.float32 and c.num_blocks == 32
    assert len(e.generate([PROMPT], GREEDY)[0].token_ids) == 8
    with pytest.raises(ConfigError, match="given twice"):
        Engine.from_config(TINY, given, device="cpu", kv_dtype="fp8_e4m3")
    plain = given.replace(dtype="float16", model_dtype=None)
    assert Engine.from_config(TINY, plain, device="cpu", kv_dtype="fp8").cache.config.dtype == torch.float8_e4m3fn


# ------------------------------------------------------------ checkpoint scales
def test_checkpoint_scales_are_set_before_any_request(ckpt: Path, tmp_path: Path) -> None:
    folder = with_scales(ckpt, tmp_path, {0: (0.5, 0.25), 1: (2.0, 0.125)})
    e = Engine(folder, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3")
    assert e.kv_scales_source == "checkpoint" and e.cache.config.kv_scale_granularity == "tensor"
    got = [tuple(t.tolist() for t in e.cache.kv_scales(i)) for i in range(2)]
    assert got == [([0.5, 0.5], [0.25, 0.25]), ([2.0, 2.0], [0.125, 0.125])]
    scaled = e.generate([PROMPT], GREEDY)[0].token_ids
    default = Engine(ckpt, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3")
    assert default.kv_scales_source == "default"
    # the stored bytes follow the scales: the same keys in both caches, read back within each format step
    for engine in (e, default):
        engine.cache.add_sequence("probe")
        engine.cache.append_tokens("probe", len(PROMPT))
        engine.runner.logits(engine.cache.prepare_step(["probe"], len(PROMPT), input_ids=PROMPT))
    k_scaled, _ = e.cache.gather("probe", 1)
    k_default, _ = default.cache.gather("probe", 1)
    assert not torch.equal(k_scaled, k_default)  # layer 1's keys were stored / 2.0, in other steps
    assert len(scaled) == 8


@pytest.mark.parametrize("names", ["self_attn.{kv}_proj.output_scale", "self_attn.{kv}_proj.{kv}_scale",
                                   "self_attn.attn.{kv}_scale", "self_attn.kv_scale"])
def test_the_other_checkpoint_names_are_read(ckpt: Path, tmp_path: Path, names: str) -> None:
    folder = with_scales(ckpt, tmp_path, {0: (0.5, 0.25), 1: (2.0, 0.125)}, names)
    e = Engine(folder, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3")
    k, v = e.cache.kv_scales(1)
    assert k.tolist() == [2.0, 2.0] and v.tolist() == ([2.0, 2.0] if names == "self_attn.kv_scale" else [0.125] * 2)


def test_per_head_scales_make_a_per_head_cache(ckpt: Path, tmp_path: Path) -> None:
    folder = with_scales(ckpt, tmp_path, {0: (torch.tensor([0.5, 1.5]), 0.25)})
    e = Engine(folder, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3")
    assert e.cache.config.kv_scale_granularity == "head"
    assert e.cache.kv_scales(0).k_scale.tolist() == [0.5, 1.5] and e.cache.kv_scales(0).v_scale.tolist() == [0.25] * 2
    assert e.cache.kv_scales(1).k_scale.tolist() == [1.0, 1.0]  # a layer without scales keeps 1.0


@pytest.mark.parametrize("value,match", [(torch.tensor([0.5, 1.0, 2.0]), r"shape \(3,\)"),
                                         (torch.tensor(-1.0), "positive and finite"),
                                         (torch.tensor(float("inf")), "positive and finite"),
                                         (torch.tensor(1, dtype=torch.int32), "dtype int32")])
def test_bad_scales_are_refused_naming_the_tensor(ckpt: Path, tmp_path: Path, value: Any, match: str) -> None:
    folder = with_scales(ckpt, tmp_path, {1: (value, 0.5)})
    for kv_dtype in ("fp8_e4m3", None):  # checked for every cache: a broken checkpoint is broken
        with pytest.raises(ModelError, match=match) as info:
            Engine(folder, device="cpu", num_blocks=16, kv_dtype=kv_dtype)
        assert "model.layers.1.self_attn.k_scale" in str(info.value)


def test_a_layer_out_of_range_or_a_scale_given_twice_is_refused(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="layer 5.*2 layers"):
        Engine(with_scales(ckpt, tmp_path, {5: (1.0, 1.0)}, name="range"), device="cpu", num_blocks=16)
    twice = with_scales(ckpt, tmp_path, {0: (1.0, 1.0)}, name="twice")
    add_kv_scales(twice, {0: (1.0, 1.0)}, "self_attn.kv_scale")
    with pytest.raises(ModelError, match="given twice"):
        Engine(twice, device="cpu", num_blocks=16, kv_dtype="fp8")


def test_a_float_cache_ignores_the_scales_with_a_warning(ckpt: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    folder = with_scales(ckpt, tmp_path, {0: (0.01, 0.01), 1: (0.01, 0.01)})
    with caplog.at_level(logging.WARNING, logger="kvforge.engine.kv_scales"):
        e = Engine(folder, device="cpu", num_blocks=16)
    assert "not used" in caplog.text and e.cache.config.dtype == torch.float32
    plain = Engine(ckpt, device="cpu", num_blocks=16)
    assert e.generate([PROMPT], GREEDY)[0].token_ids == plain.generate([PROMPT], GREEDY)[0].token_ids


def test_the_transformers_model_runs_on_an_fp8_cache(ckpt: Path, tmp_path: Path) -> None:
    """model_impl="transformers": its attention stores through the cache (which quantizes) and
    reads through the kernels with the scales: the native decoder's tokens, scales included."""
    folder = with_scales(ckpt, tmp_path, {0: (0.5, 0.25), 1: (2.0, 0.125)})
    hf = Engine(folder, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3", model_impl="transformers")
    native = Engine(folder, device="cpu", num_blocks=16, kv_dtype="fp8_e4m3", model_impl="native")
    assert hf.model_impl == "transformers" and hf.cache.config.is_fp8 and hf.kv_scales_source == "checkpoint"
    assert hf.cache.kv_scales(1).k_scale.tolist() == [2.0, 2.0]
    prompts = [PROMPT, PROMPT[3:] + [40, 41, 42]]
    assert hf.generate(prompts, GREEDY) and [o.token_ids for o in hf.generate(prompts, GREEDY)] == \
        [o.token_ids for o in native.generate(prompts, GREEDY)]


# ------------------------------------------------------------------- accuracy
def workload() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(8, 40))] for _ in range(8)]


@pytest.mark.parametrize("kv_dtype,max_rel_rms,max_abs,min_agree", [("fp8_e4m3", 0.03, 0.03, 0.9),
                                                                    ("fp8_e5m2", 0.05, 0.05, 0.9)])
def test_accuracy_against_a_float32_cache(kv_dtype: str, max_rel_rms: float, max_abs: float,
                                          min_agree: float) -> None:
    """Final logits over 9 teacher-forced steps of 8 prompts (measured: e4m3 1.2% relative RMS,
    max |error| 0.012 for logits up to 0.67; e5m2 2.5%, 0.019; next-token agreement 97% for
    both): the bounds hold them with margin, and the error is not zero (the cache quantized)."""
    ref = Engine.from_config(TINY, device="cpu", kv_memory="4MiB")
    fp8 = Engine.from_model(ref.model, kv_memory="4MiB", kv_dtype=kv_dtype)
    prompts = workload()
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    ref_out = [o.token_ids for o in ref.generate(prompts, greedy)]
    num = den = worst = 0.0
    agree = []
    for p, toks in zip(prompts, ref_out):
        a, b = teacher_forced_logits(ref, p, toks[:8]), teacher_forced_logits(fp8, p, toks[:8])
        num += float(((a - b) ** 2).sum())
        den += float((a ** 2).sum())
        worst = max(worst, float((a - b).abs().max()))
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    rel_rms = (num / den) ** 0.5
    assert 0.002 < rel_rms < max_rel_rms and 0 < worst < max_abs
    assert sum(agree) / len(agree) >= min_agree
    fp8_out = [o.token_ids for o in fp8.generate(prompts, greedy)]
    same = sum(x == y for r, f in zip(ref_out, fp8_out) for x, y in zip(r, f)) / (16 * len(prompts))
    assert same >= 0.6  # free-running: measured 82% (a first difference changes every later token)
    fp8.check_invariants()
