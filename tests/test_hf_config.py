"""Malformed ``config.json`` files: every one is a ConfigError naming the field.

Both readers of a checkpoint's config are fed the same list of malformed
files: the shape reader of the config layer (``model_shape``, which
``kvforge plan``, ``kvforge simulate --model`` and ``CacheConfig.for_model``
use) and the engine's (``read_config`` + ``ModelConfig.from_hf``). Each must
raise :class:`~kvforge.errors.ConfigError` (the engine's is also a
:class:`~kvforge.errors.ModelError`) whose message names the field, never a
TypeError, KeyError, ZeroDivisionError or UnicodeDecodeError. Well-formed
real-world configs must still be read.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kvforge.config import CacheConfig
from kvforge.engine.model_config import ModelConfig, ModelConfigError, read_config
from kvforge.errors import ConfigError, ModelError
from kvforge.model_shapes import MODEL_SHAPES, check_hf_config, model_shape, read_json_object
from kvforge.tools.cli import main as cli_main

#: a well-formed tiny Llama config.json (no head_dim: hidden_size / heads = 16)
BASE: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, torch_dtype="float32",
    tie_word_embeddings=False, eos_token_id=2, hidden_act="silu")
DROP = object()


def with_(**changes: Any) -> bytes:
    """BASE with fields changed (DROP removes one), as config.json bytes."""
    cfg = {k: v for k, v in {**BASE, **changes}.items() if v is not DROP}
    return json.dumps(cfg).encode()


def raw_field(name: str, literal: str) -> bytes:
    """BASE with ``name`` set to a JSON literal that json.dumps would not write (NaN, 10**5000)."""
    text = json.dumps({k: v for k, v in BASE.items() if k != name})
    return (text[:-1] + f', "{name}": {literal}}}').encode()


#: (case id, config.json bytes, a pattern the message must contain: the field, or the file's fault)
MALFORMED: list[tuple[str, bytes, str]] = [
    # the file itself
    ("not-utf8", b'{"hidden_size": 64, "model_type": "ll\xffama"}', "not UTF-8"),
    ("latin1", '{"model_type": "llamé", "hidden_size": 64}'.encode("latin-1"), "not UTF-8"),
    ("utf16", json.dumps(BASE).encode("utf-16"), "not UTF-8"),
    ("not-json", b"{not json", "not valid JSON"),
    ("truncated-json", with_()[:40], "not valid JSON"),
    ("empty-file", b"", "not valid JSON"),
    ("trailing-garbage", with_() + b" {}", "not valid JSON"),
    ("top-level-list", b"[1, 2]", "expected a JSON object, got list"),
    ("top-level-str", b'"LlamaForCausalLM"', "expected a JSON object, got str"),
    ("top-level-number", b"4096", "expected a JSON object, got int"),
    ("top-level-null", b"null", "expected a JSON object, got null"),
    ("top-level-bool", b"true", "expected a JSON object, got bool"),
    ("duplicate-key", with_()[:-1] + b', "hidden_size": 128}', "'hidden_size' is given twice"),
    ("nested-too-deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    # strings, null, bools and floats where integers belong
    ("hidden-size-str", with_(hidden_size="4096"), "hidden_size"),
    ("hidden-size-null", with_(hidden_size=None), "hidden_size"),
    ("hidden-size-missing", with_(hidden_size=DROP), "hidden_size"),
    ("heads-null", with_(num_attention_heads=None), "num_attention_heads"),
    ("heads-missing", with_(num_attention_heads=DROP), "num_attention_heads"),
    ("layers-null", with_(num_hidden_layers=None), "num_hidden_layers"),
    ("layers-missing", with_(num_hidden_layers=DROP), "num_hidden_layers"),
    ("kv-heads-str", with_(num_key_value_heads="2"), "num_key_value_heads"),
    ("heads-bool", with_(num_attention_heads=True), "num_attention_heads"),
    ("layers-bool", with_(num_hidden_layers=False), "num_hidden_layers"),
    ("layers-float", with_(num_hidden_layers=2.0), "num_hidden_layers"),
    ("heads-fraction", with_(num_attention_heads=4.5), "num_attention_heads"),
    ("head-dim-str", with_(head_dim="16"), "head_dim"),
    ("head-dim-list", with_(head_dim=[16]), "head_dim"),
    ("max-pos-str", with_(max_position_embeddings="big"), "max_position_embeddings"),
    ("vocab-str", with_(vocab_size="128"), "vocab_size"),
    ("intermediate-float", with_(intermediate_size=128.0), "intermediate_size"),
    ("sliding-window-str", with_(sliding_window="4096"), "sliding_window"),
    # zero, negative and huge values
    ("heads-zero", with_(num_attention_heads=0), "num_attention_heads"),
    ("heads-negative", with_(num_attention_heads=-4), "num_attention_heads"),
    ("layers-zero", with_(num_hidden_layers=0), "num_hidden_layers"),
    ("layers-negative", with_(num_hidden_layers=-2), "num_hidden_layers"),
    ("kv-heads-zero", with_(num_key_value_heads=0), "num_key_value_heads"),
    ("head-dim-negative", with_(head_dim=-16), "head_dim"),
    ("hidden-size-zero", with_(hidden_size=0), "hidden_size"),
    ("max-pos-zero", with_(max_position_embeddings=0), "max_position_embeddings"),
    ("sliding-window-negative", with_(sliding_window=-1), "sliding_window"),
    ("heads-2**62", with_(num_attention_heads=2**62, num_key_value_heads=2**62), "num_attention_heads"),
    ("layers-2**62", with_(num_hidden_layers=2**62), "num_hidden_layers"),
    ("kv-heads-2**40", with_(num_key_value_heads=2**40), "num_key_value_heads"),
    ("head-dim-2**62", with_(head_dim=2**62), "head_dim"),
    ("vocab-2**40", with_(vocab_size=2**40), "vocab_size"),
    ("max-pos-2**63", with_(max_position_embeddings=2**63), "max_position_embeddings"),
    ("layers-5000-digits", raw_field("num_hidden_layers", "1" + "0" * 5000), "num_hidden_layers"),
    # fields that must agree
    ("heads-not-divisible-by-kv", with_(num_key_value_heads=3), "num_key_value_heads"),
    ("kv-more-than-heads", with_(num_key_value_heads=8), "num_key_value_heads"),
    ("hidden-not-divisible-by-heads", with_(hidden_size=65), "hidden_size"),
    ("layer-types-too-short", with_(layer_types=["full_attention"]), "layer_types"),
    ("layer-types-not-names", with_(layer_types=[1, 2]), "layer_types"),
    # numbers, bools, strings, objects of the wrong kind
    ("eps-nan", raw_field("rms_norm_eps", "NaN"), "rms_norm_eps"),
    ("eps-str", with_(rms_norm_eps="1e-6"), "rms_norm_eps"),
    ("eps-negative", with_(rms_norm_eps=-1e-6), "rms_norm_eps"),
    ("rope-theta-str", with_(rope_theta="10000"), "rope_theta"),
    ("rope-theta-infinity", raw_field("rope_theta", "Infinity"), "rope_theta"),
    ("rope-theta-zero", with_(rope_theta=0), "rope_theta"),
    ("tie-str", with_(tie_word_embeddings="false"), "tie_word_embeddings"),
    ("attention-bias-int", with_(attention_bias=1), "attention_bias"),
    ("dtype-number", with_(torch_dtype=16), "torch_dtype"),
    ("model-type-list", with_(model_type=["llama"]), "model_type"),
    ("hidden-act-list", with_(hidden_act=["silu"]), "hidden_act"),
    ("architectures-str", with_(architectures="LlamaForCausalLM"), "architectures"),
    ("architectures-numbers", with_(architectures=[1]), "architectures"),
    ("text-config-list", with_(text_config=[1]), "text_config"),
    ("quantization-config-str", with_(quantization_config="gptq"), "quantization_config"),
    # RoPE scaling
    ("rope-scaling-unknown-type", with_(rope_scaling={"rope_type": "banana", "factor": 2.0}),
     "rope_scaling.rope_type"),
    ("rope-scaling-type-number", with_(rope_scaling={"type": 3, "factor": 2.0}), "rope_scaling.rope_type"),
    ("rope-scaling-linear-no-factor", with_(rope_scaling={"type": "linear"}), "rope_scaling.factor"),
    ("rope-scaling-llama3-missing-keys", with_(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling.low_freq_factor"),
    ("rope-scaling-factor-str", with_(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope_scaling.factor"),
    ("rope-scaling-factor-negative", with_(rope_scaling={"rope_type": "linear", "factor": -2.0}),
     "rope_scaling.factor"),
    ("rope-scaling-str", with_(rope_scaling="linear"), "rope_scaling"),
    ("rope-scaling-original-max-str", with_(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": "8192"}), "rope_scaling.original_max_position_embeddings"),
    ("rope-parameters-theta-negative", with_(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
     "rope_parameters.rope_theta"),
    ("rope-parameters-list", with_(rope_parameters=[10000.0]), "rope_parameters"),
    ("rope-parameters-longrope-factors-str", with_(rope_parameters={
        "rope_type": "longrope", "short_factor": "1", "long_factor": [1.0]}), "rope_parameters.short_factor"),
    # end-of-sequence ids
    ("eos-str", with_(eos_token_id="2"), "eos_token_id"),
    ("eos-list-with-str", with_(eos_token_id=[2, "</s>"]), "eos_token_id"),
    ("eos-bool", with_(eos_token_id=True), "eos_token_id"),
    ("eos-negative", with_(eos_token_id=-1), "eos_token_id"),
    ("eos-float", with_(eos_token_id=2.0), "eos_token_id"),
    ("eos-object", with_(eos_token_id={"id": 2}), "eos_token_id"),
]
assert len(MALFORMED) >= 25


def write(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "config.json").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("data, field", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_both_readers_refuse_a_malformed_config_naming_the_field(tmp_path: Path, data: bytes, field: str) -> None:
    folder = write(tmp_path, data)
    pattern = re.escape(field)
    # the config layer's reader: kvforge plan / simulate --model, CacheConfig.for_model
    with pytest.raises(ConfigError, match=pattern):
        model_shape(folder)
    with pytest.raises(ConfigError, match=pattern):
        model_shape(folder / "config.json")
    with pytest.raises(ConfigError, match=pattern):
        CacheConfig.for_model(folder, vram_budget="1GiB")
    # the engine's reader: a ModelConfigError is a ConfigError and a ModelError
    with pytest.raises(ConfigError, match=pattern) as caught:
        ModelConfig.from_hf(read_config(folder))
    assert isinstance(caught.value, ModelError) and isinstance(caught.value, ModelConfigError)
    # a parsed dict goes to both readers directly too (the file-level faults have no dict)
    try:
        parsed = read_json_object(folder / "config.json")
    except ConfigError:
        return
    with pytest.raises(ConfigError, match=pattern):
        model_shape(parsed)
    with pytest.raises(ModelConfigError, match=pattern):
        ModelConfig.from_hf(parsed)


@pytest.mark.parametrize("value", [[1, 2], "llama", 4096, None, 2.5, True])
def test_a_parsed_config_that_is_not_an_object_is_refused(value: Any) -> None:
    with pytest.raises(ModelConfigError, match="expected a JSON object"):
        ModelConfig.from_hf(value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        model_shape(value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected a JSON object"):
        check_hf_config(value)


def test_huge_python_values_are_refused_without_overflow() -> None:
    """Dicts made in Python can hold integers JSON would not parse; repr() of them may itself fail."""
    for value in (10**5000, 2**62, float("inf"), float("nan")):
        with pytest.raises(ModelConfigError, match="num_hidden_layers"):
            ModelConfig.from_hf({**BASE, "num_hidden_layers": value})
        with pytest.raises(ConfigError, match="num_hidden_layers"):
            model_shape({**BASE, "num_hidden_layers": value})


def test_the_cli_reports_a_malformed_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write(tmp_path, with_(num_attention_heads="32"))
    assert cli_main(["plan", "--model", str(folder)]) == 2
    assert "num_attention_heads must be an integer, got '32' (a string)" in capsys.readouterr().err
    assert cli_main(["simulate", "--model", str(folder), "--no-plots", "--no-progress"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


# ---------------------------------------------------------- generation_config.json
@pytest.mark.parametrize("data, match", [
    (b"{broken", "generation_config.json: not valid JSON"),
    (b"\xff\xfe", "generation_config.json: not UTF-8"),
    (b"[2]", "generation_config.json: expected a JSON object, got list"),
    (b'{"eos_token_id": "2"}', "eos_token_id"),
    (b'{"eos_token_id": [2, null]}', "eos_token_id"),
])
def test_a_malformed_generation_config_is_refused(tmp_path: Path, data: bytes, match: str) -> None:
    from kvforge.engine.loader import load_checkpoint

    write(tmp_path, with_())
    (tmp_path / "generation_config.json").write_bytes(data)
    with pytest.raises(ModelConfigError, match=re.escape(match)):
        load_checkpoint(tmp_path, tokenizer=False)
    if data.startswith(b"{\"eos"):
        with pytest.raises(ModelConfigError, match="generation_config.json: eos_token_id"):
            ModelConfig.from_hf(BASE, json.loads(data))


# ------------------------------------------------- well-formed but not for the engine
def test_valid_but_unsupported_options_are_model_errors() -> None:
    with pytest.raises(ModelError, match="quantization_config.*quant_method='gptq'.*none yet"):
        ModelConfig.from_hf({**BASE, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(ModelError, match="yarn"):
        ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelError, match="partial_rotary_factor"):
        ModelConfig.from_hf({**BASE, "partial_rotary_factor": 0.5})
    with pytest.raises(ModelError, match="hidden_act='gelu'"):
        ModelConfig.from_hf({**BASE, "hidden_act": "gelu"})
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "n_layer": 12})
    with pytest.raises(ModelConfigError, match="head_dim=15 is odd"):
        ModelConfig.from_hf({**BASE, "head_dim": 15})
    with pytest.raises(ModelConfigError, match=re.escape("layer_types[1]='linear_attention'")):
        ModelConfig.from_hf({**BASE, "layer_types": ["full_attention", "linear_attention"]})
    # the shape reader sizes a cache for any of them: they are well-formed
    assert model_shape({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})["head_dim"] == 16
    assert model_shape({**BASE, "quantization_config": {"quant_method": "gptq"}})["num_layers"] == 2


# --------------------------------------------------------- well-formed configs still read
LLAMA31 = dict(BASE, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
               torch_dtype="bfloat16", eos_token_id=[128001, 128008, 128009], pad_token_id=None,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"})
QWEN25 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, num_attention_heads=28,
              num_key_value_heads=4, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
              max_position_embeddings=32768, max_window_layers=28, sliding_window=131072,
              use_sliding_window=False, rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-6,
              torch_dtype="bfloat16", tie_word_embeddings=False, eos_token_id=151643, hidden_act="silu")
MISTRAL01 = dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                 num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, intermediate_size=14336,
                 vocab_size=32000, max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-5, torch_dtype="bfloat16", head_dim=None)
QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560, head_dim=128,
             num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=36, intermediate_size=9728,
             vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, rope_scaling=None,
             sliding_window=None, layer_types=["full_attention"] * 36, dtype="bfloat16", tie_word_embeddings=True,
             eos_token_id=151645, attention_bias=False)


@pytest.mark.parametrize("cfg, shape", [
    (LLAMA31, (8, 128, 32, torch.bfloat16)),
    (QWEN25, (4, 128, 28, torch.bfloat16)),
    (MISTRAL01, (8, 128, 32, torch.bfloat16)),
    (QWEN3, (8, 128, 36, torch.bfloat16)),
], ids=["llama-3.1", "qwen2.5", "mistral-0.1", "qwen3"])
def test_real_world_configs_are_read_by_both(tmp_path: Path, cfg: dict[str, Any], shape: tuple) -> None:
    folder = write(tmp_path, json.dumps(cfg).encode())
    s = model_shape(folder)
    assert (s["num_kv_heads"], s["head_dim"], s["num_layers"], s["dtype"]) == shape
    m = ModelConfig.from_hf(read_config(folder))
    assert (m.num_kv_heads, m.head_dim, m.num_layers, m.dtype) == shape
    assert m.max_position_embeddings == cfg["max_position_embeddings"]


def test_real_world_details_are_kept() -> None:
    m = ModelConfig.from_hf(LLAMA31)
    assert m.rope_theta == 500000.0 and m.rope_scaling is not None and m.rope_scaling["rope_type"] == "llama3"
    assert m.eos_token_ids == (128001, 128008, 128009)
    assert ModelConfig.from_hf(QWEN25).sliding_windows == (None,) * 28
    assert ModelConfig.from_hf(MISTRAL01).sliding_windows == (4096,) * 32
    assert ModelConfig.from_hf(QWEN3).qk_norm and ModelConfig.from_hf(QWEN3).tie_word_embeddings
    # null means "absent" where transformers writes null: kv heads = heads, no head_dim, no window
    m = ModelConfig.from_hf({**BASE, "num_key_value_heads": None, "head_dim": None, "sliding_window": None,
                             "rope_scaling": None, "eos_token_id": None, "torch_dtype": None})
    assert (m.num_kv_heads, m.head_dim, m.sliding_windows, m.eos_token_ids, m.dtype) == (
        4, 16, (None, None), (), torch.float32)
    # a config dict made in Python may hold a torch dtype
    assert ModelConfig.from_hf({**BASE, "torch_dtype": torch.bfloat16}).dtype is torch.bfloat16
    # multimodal: read through text_config
    vl = {"model_type": "qwen2_vl", "text_config": {"num_hidden_layers": 28, "num_attention_heads": 28,
                                                    "num_key_value_heads": 4, "hidden_size": 3584},
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    assert model_shape(vl)["head_dim"] == 128
    with pytest.raises(ConfigError, match=r"\(text_config\): num_key_value_heads must be an integer"):
        model_shape({**vl, "text_config": {**vl["text_config"], "num_key_value_heads": "4"}})


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_every_builtin_shape_passes_the_check(name: str) -> None:
    check_hf_config(MODEL_SHAPES[name], name, required=("num_hidden_layers", "num_attention_heads"))


def test_the_tiny_checkpoints_configs_pass(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kvforge.engine.testing import TINY_CONFIGS, save_tiny_checkpoint

    for arch in TINY_CONFIGS:
        folder = tmp_path / arch
        save_tiny_checkpoint(arch, folder)
        assert ModelConfig.from_hf(read_config(folder)).architecture == arch
        assert model_shape(folder)["head_dim"] == 16
