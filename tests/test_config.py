"""CacheConfig, CachePreset and the sizing helpers (ROCmForge's config tests, made exact)."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from kvforge.config import (
    KV_SHARE_OF_VRAM,
    CacheConfig,
    CachePreset,
    format_bytes,
    parse_bytes,
    resolve_dtype,
)
from kvforge.errors import ConfigError, KVForgeError
from kvforge.model_shapes import MODEL_SHAPES, model_shape, read_hf_config, resolve_model

GiB = 2**30
MiB = 2**20


def small(**kw) -> CacheConfig:
    args = dict(block_size=16, num_blocks=100, num_layers=2, num_kv_heads=4, head_dim=64)
    args.update(kw)
    return CacheConfig(**args)


# ------------------------------------------------------------------ creation
def test_config_creation_fields_and_defaults():
    cfg = small()
    assert (cfg.block_size, cfg.num_blocks, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (16, 100, 2, 4, 64)
    assert cfg.dtype is torch.float16
    assert cfg.enable_compaction is False
    assert cfg.compaction_threshold == 0.3
    assert cfg.enable_prefix_caching is True
    assert cfg.initial_blocks is None


def test_new_keeps_rocmforge_positional_order():
    # page_size, max_pages, num_heads, head_dim, num_layers
    cfg = CacheConfig.new(16, 100, 32, 128, 24)
    assert cfg.block_size == 16
    assert cfg.num_blocks == 100
    assert cfg.num_kv_heads == 32
    assert cfg.head_dim == 128
    assert cfg.num_layers == 24


def test_estimated_memory_exact_bytes():
    cfg = CacheConfig.new(16, 100, 32, 128, 24)  # fp16
    assert cfg.dtype_bytes == 2
    assert cfg.bytes_per_token == 2 * 24 * 32 * 128 * 2 == 393_216
    assert cfg.bytes_per_block == 16 * 393_216 == 6_291_456
    assert cfg.estimated_memory_bytes() == 100 * 6_291_456 == 629_145_600
    assert cfg.estimated_memory_human() == "600.00 MiB"


@pytest.mark.parametrize("dtype, nbytes", [
    (torch.float32, 4), ("float32", 4), ("fp32", 4),
    (torch.bfloat16, 2), ("bf16", 2), ("torch.bfloat16", 2), (torch.float16, 2), ("half", 2),
])
def test_estimated_memory_follows_dtype(dtype, nbytes):
    cfg = small(dtype=dtype, num_blocks=10)
    assert cfg.dtype_bytes == nbytes
    assert cfg.estimated_memory_bytes() == 10 * 2 * 2 * 16 * 4 * 64 * nbytes


def test_max_context_length():
    assert CacheConfig.new(16, 100, 32, 128, 24).max_context_length() == 1600
    assert small(block_size=64, num_blocks=7).max_context_length() == 448
    assert small(block_size=1, num_blocks=1).max_context_length() == 1


def test_config_is_frozen_and_builders_return_copies():
    cfg = small()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_blocks = 5  # type: ignore[misc]
    on = cfg.with_compaction(True)
    assert on.enable_compaction is True and cfg.enable_compaction is False
    t = cfg.with_compaction_threshold(0.75)
    assert t.compaction_threshold == 0.75 and cfg.compaction_threshold == 0.3
    assert cfg.with_compaction_threshold(0).compaction_threshold == 0.0
    assert cfg.with_compaction_threshold(1).compaction_threshold == 1.0
    off = cfg.with_prefix_caching(False)
    assert off.enable_prefix_caching is False and cfg.enable_prefix_caching is True
    assert cfg.replace(num_blocks=7).num_blocks == 7 and cfg.num_blocks == 100


# ------------------------------------------------------------ invalid config
INT_FIELDS = ["block_size", "num_blocks", "num_layers", "num_kv_heads", "head_dim"]
BAD_INTS = [0, -1, -16, 1.5, 16.0, "16", None, True, False]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_invalid_int_field_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as exc:
        small(**{field: value})
    assert field in str(exc.value)
    assert repr(value) in str(exc.value)
    assert isinstance(exc.value, KVForgeError) and isinstance(exc.value, ValueError)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = small(block_size=np.int64(8), num_blocks=np.int32(3))
    assert cfg.block_size == 8 and type(cfg.block_size) is int
    assert cfg.num_blocks == 3 and type(cfg.num_blocks) is int


@pytest.mark.parametrize("value", ["int8", "float64x", "", "nonsense", 5, None, torch.int32, torch.float64],
                         ids=repr)
def test_invalid_dtype_names_field_and_value(value):
    with pytest.raises(ConfigError) as exc:
        small(dtype=value)
    assert "dtype" in str(exc.value)
    assert repr(value) in str(exc.value)


@pytest.mark.parametrize("value", [-0.1, 1.0000001, 2, -1, math.nan, math.inf, -math.inf, True, "0.3", None],
                         ids=repr)
def test_invalid_compaction_threshold(value):
    with pytest.raises(ConfigError) as exc:
        small(compaction_threshold=value)
    assert "compaction_threshold" in str(exc.value)
    assert repr(value) in str(exc.value)
    with pytest.raises(ConfigError):
        small().with_compaction_threshold(value)


@pytest.mark.parametrize("field", ["enable_compaction", "enable_prefix_caching", "auto_compact"])
@pytest.mark.parametrize("value", [1, 0, "yes", None], ids=repr)
def test_invalid_bool_fields(field, value):
    with pytest.raises(ConfigError) as exc:
        small(**{field: value})
    assert field in str(exc.value) and repr(value) in str(exc.value)


def test_invalid_builder_arguments():
    with pytest.raises(ConfigError, match="enable_compaction.*1"):
        small().with_compaction(1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="enable_prefix_caching.*'no'"):
        small().with_prefix_caching("no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_blocks"):
        small().replace(num_blocks=0)


def test_invalid_initial_and_chunk_blocks():
    with pytest.raises(ConfigError, match="initial_blocks.*0"):
        small(initial_blocks=0)
    with pytest.raises(ConfigError, match="initial_blocks=101.*num_blocks=100"):
        small(initial_blocks=101)
    assert small(initial_blocks=100).initial_blocks == 100
    with pytest.raises(ConfigError, match="chunk_blocks.*-2"):
        small(chunk_blocks=-2)
    with pytest.raises(ConfigError, match="device"):
        small(device="")


def test_resolve_dtype():
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype(" torch.float16 ") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="torch_dtype='int4'"):
        resolve_dtype("int4", "torch_dtype")


# ------------------------------------------------------------------- presets
# Llama-3-8B shape: 8 KV heads x 128 dims x 32 layers, fp16 -> 128 KiB per token.
LLAMA = dict(num_kv_heads=8, head_dim=128, num_layers=32)


def test_builtin_presets_numbers():
    assert KV_SHARE_OF_VRAM == 0.5
    assert [(p.name, p.page_size, p.vram_target_bytes, p.max_pages) for p in CachePreset.builtin()] == [
        ("small", 16, 4 * GiB, None), ("medium", 32, 12 * GiB, None), ("large", 64, 40 * GiB, None)]
    assert CachePreset.SMALL.kv_budget_bytes == 2 * GiB
    assert CachePreset.MEDIUM.kv_budget_bytes == 6 * GiB
    assert CachePreset.LARGE.kv_budget_bytes == 20 * GiB
    assert CachePreset.custom(8, 10).kv_budget_bytes is None


@pytest.mark.parametrize("preset, block_size, num_blocks", [
    (CachePreset.SMALL, 16, 1024),    # 2 GiB / (16 x 128 KiB)
    (CachePreset.MEDIUM, 32, 1536),   # 6 GiB / (32 x 128 KiB)
    (CachePreset.LARGE, 64, 2560),    # 20 GiB / (64 x 128 KiB)
])
def test_from_preset_gives_kv_half_the_vram(preset, block_size, num_blocks):
    cfg = CacheConfig.from_preset(preset, **LLAMA)
    assert cfg.block_size == block_size
    assert cfg.bytes_per_block == block_size * 131_072
    assert cfg.num_blocks == num_blocks
    assert cfg.estimated_memory_bytes() == preset.vram_target_bytes // 2
    assert cfg.enable_compaction is True
    assert cfg.name == preset.name


def test_from_preset_floors_to_whole_blocks_and_follows_dtype():
    # 2 * 7 layers * 16 * 3 heads * 100 dims * 2 bytes = 134400 bytes per block
    cfg = CacheConfig.from_preset(CachePreset.SMALL, num_kv_heads=3, head_dim=100, num_layers=7)
    assert cfg.bytes_per_block == 134_400
    assert cfg.num_blocks == 2 * GiB // 134_400 == 15_978
    assert cfg.estimated_memory_bytes() <= 2 * GiB < cfg.estimated_memory_bytes() + cfg.bytes_per_block
    assert CacheConfig.from_preset(CachePreset.SMALL, **LLAMA, dtype=torch.float32).num_blocks == 512


def test_custom_preset_honours_max_pages():
    cfg = CacheConfig.from_preset(CachePreset.custom(8, 77), **LLAMA)
    assert (cfg.block_size, cfg.num_blocks, cfg.enable_compaction) == (8, 77, True)
    assert cfg.estimated_memory_bytes() == 77 * 8 * 131_072
    # keyword overrides pass through; compaction can be switched off explicitly
    assert CacheConfig.from_preset(CachePreset.custom(8, 77), **LLAMA, enable_compaction=False).enable_compaction is False


def test_invalid_presets():
    with pytest.raises(ConfigError, match="page_size.*0"):
        CachePreset.custom(0, 10)
    with pytest.raises(ConfigError, match="max_pages.*-1"):
        CachePreset.custom(16, -1)
    with pytest.raises(ConfigError, match="needs a vram_target_bytes or a max_pages"):
        CachePreset("empty", 16)
    with pytest.raises(ConfigError, match="preset must be a CachePreset"):
        CacheConfig.from_preset("small", **LLAMA)  # type: ignore[arg-type]
    # one block (16 tokens x 512 MiB) exceeds SMALL's 2 GiB share
    with pytest.raises(ConfigError, match="less than one block"):
        CacheConfig.from_preset(CachePreset.SMALL, num_kv_heads=1024, head_dim=1024, num_layers=128)


# ------------------------------------------------------- for_context_length
@pytest.mark.parametrize("context, page", [
    (1, 16), (512, 16), (1023, 16), (1024, 32), (2048, 32), (4095, 32), (4096, 64), (32768, 64)])
def test_for_context_length_page_size(context, page):
    cfg = CacheConfig.for_context_length(context, **LLAMA)
    assert cfg.block_size == page
    assert cfg.num_blocks == math.ceil(context / page)
    assert cfg.max_context_length() >= context


def test_for_context_length_sequences_and_budget_cap():
    cfg = CacheConfig.for_context_length(1000, **LLAMA, num_sequences=4)
    assert (cfg.block_size, cfg.num_blocks) == (16, 4 * 63)
    # 4096 tokens -> 64-token pages of 8 MiB; 10 sequences want 640 blocks, 1 GiB holds 128
    capped = CacheConfig.for_context_length(4096, **LLAMA, vram_budget=GiB, num_sequences=10)
    assert (capped.block_size, capped.num_blocks) == (64, 128)
    assert capped.estimated_memory_bytes() == GiB
    # a roomy budget does not inflate the cache beyond what the sequences need
    roomy = CacheConfig.for_context_length(4096, **LLAMA, vram_budget="100GiB", num_sequences=2)
    assert roomy.num_blocks == 128
    # an explicit block size wins over the context rule
    assert CacheConfig.for_context_length(100, **LLAMA, block_size=8).num_blocks == 13


def test_for_context_length_error_names_longest_context_that_fits():
    # 8192 tokens need 128 blocks of 64 tokens (8 MiB each); 256 MiB hold 32 -> 2048 tokens
    with pytest.raises(ConfigError) as exc:
        CacheConfig.for_context_length(8192, **LLAMA, vram_budget="256MiB")
    msg = str(exc.value)
    assert "8192" in msg and "2048 tokens" in msg and "128 blocks" in msg
    with pytest.raises(ConfigError, match="longest context that fits is 0 tokens"):
        CacheConfig.for_context_length(100, **LLAMA, vram_budget=MiB)
    with pytest.raises(ConfigError, match="target_context_len.*0"):
        CacheConfig.for_context_length(0, **LLAMA)
    with pytest.raises(ConfigError, match="vram_budget"):
        CacheConfig.for_context_length(100, **LLAMA, vram_budget=0)


# ----------------------------------------------------------------- for_model
def write_config(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


LLAMA3_JSON = dict(model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                   num_hidden_layers=32, torch_dtype="bfloat16", max_position_embeddings=8192)


def test_for_model_without_head_dim(tmp_path):
    folder = write_config(tmp_path, **LLAMA3_JSON)
    cfg = CacheConfig.for_model(folder, vram_budget="1GiB")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (8, 4096 // 32, 32)
    assert cfg.dtype is torch.bfloat16
    assert cfg.block_size == 16
    assert cfg.bytes_per_block == 2 * 32 * 16 * 8 * 128 * 2 == 2 * MiB
    assert cfg.num_blocks == 512
    # the config.json path and the parsed dict give the same config
    assert CacheConfig.for_model(folder / "config.json", vram_budget=GiB) == cfg
    assert CacheConfig.for_model(LLAMA3_JSON, vram_budget=GiB) == cfg


def test_for_model_with_head_dim_and_torch_dtype(tmp_path):
    # head_dim differs from hidden_size / heads (as in Gemma/Qwen3); MHA fallback when no kv heads
    folder = write_config(tmp_path, hidden_size=2048, num_attention_heads=8, head_dim=256,
                          num_hidden_layers=18, torch_dtype="float32", max_position_embeddings=1000)
    cfg = CacheConfig.for_model(folder, vram_budget=64 * MiB, block_size=32)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (8, 256, 18)
    assert cfg.dtype is torch.float32
    assert cfg.bytes_per_block == 2 * 18 * 32 * 8 * 256 * 4
    assert cfg.num_blocks == 64 * MiB // cfg.bytes_per_block == 7
    # without a budget: one sequence of max_position_embeddings (or context_length) tokens
    one = CacheConfig.for_model(folder)
    assert (one.block_size, one.num_blocks) == (16, 63)
    assert CacheConfig.for_model(folder, context_length=100).num_blocks == 7
    assert CacheConfig.for_model(folder, vram_budget=GiB, dtype="fp16").dtype is torch.float16


def test_for_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        CacheConfig.for_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CacheConfig.for_model(tmp_path)
    write_config(tmp_path, num_attention_heads=8, hidden_size=64)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        CacheConfig.for_model(tmp_path)
    with pytest.raises(ConfigError, match="holds no block"):
        CacheConfig.for_model(LLAMA3_JSON, vram_budget="1MiB")



# ------------------------------------------------------ built-in model shapes
@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_for_model_takes_every_builtin_name(name):
    cfg = CacheConfig.for_model(name, vram_budget=GiB)
    assert cfg == CacheConfig.for_model(MODEL_SHAPES[name], vram_budget=GiB)
    assert CacheConfig.for_model(name.upper(), vram_budget=GiB) == cfg
    shape = model_shape(name)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, cfg.dtype) == (
        shape["num_kv_heads"], shape["head_dim"], shape["num_layers"], shape["dtype"])
    assert cfg.num_blocks == GiB // cfg.bytes_per_block


def test_builtin_shapes_exact():
    assert {"tinyllama-1.1b", "llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2-7b",
            "qwen2.5-7b"} <= set(MODEL_SHAPES)
    s = model_shape("qwen2.5-7b")
    assert (s["num_layers"], s["num_kv_heads"], s["head_dim"], s["dtype"], s["model_type"]) == (
        28, 4, 128, torch.bfloat16, "qwen2")
    s = model_shape("tinyllama-1.1b")
    assert (s["num_layers"], s["num_kv_heads"], s["head_dim"], s["max_position_embeddings"]) == (22, 4, 64, 2048)
    assert model_shape("llama-2-7b")["dtype"] is torch.float16


def test_model_shape_is_still_importable_from_config():
    import kvforge.config

    assert kvforge.config.model_shape is model_shape
    with pytest.raises(AttributeError):
        kvforge.config.no_such_name  # noqa: B018


def test_resolve_model_names_paths_and_errors(tmp_path):
    assert resolve_model("Llama-3-8B") == ("llama-3-8b", MODEL_SHAPES["llama-3-8b"])
    resolve_model("llama-3-8b")[1]["num_hidden_layers"] = 1  # a copy: the table stays as it is
    assert MODEL_SHAPES["llama-3-8b"]["num_hidden_layers"] == 32
    folder = write_config(tmp_path, **LLAMA3_JSON)
    assert resolve_model(str(folder)) == (str(folder), LLAMA3_JSON)
    assert resolve_model(folder / "config.json")[1] == LLAMA3_JSON
    with pytest.raises(ConfigError, match="no-such-model.*neither a built-in.*llama-3-8b"):
        resolve_model("no-such-model")
    with pytest.raises(ConfigError, match="no-such-model"):
        CacheConfig.for_model("no-such-model")


def test_read_hf_config_is_the_one_reader(tmp_path):
    from kvforge.engine.model_config import read_config
    from kvforge.errors import ModelError

    folder = write_config(tmp_path, **LLAMA3_JSON)
    assert read_hf_config(folder) == read_hf_config(folder / "config.json") == read_config(folder) == LLAMA3_JSON
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"no config.json at '{missing / 'config.json'}'")):
        read_hf_config(missing)
    with pytest.raises(ModelError, match="no config.json"):
        read_config(missing)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: not valid JSON")):
        read_hf_config(tmp_path)
    with pytest.raises(ModelError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        read_hf_config(tmp_path / "config.json")


# ------------------------------------------------------------- bytes helpers
@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
    (5 * MiB, "5.00 MiB"), (3 * GiB, "3.00 GiB"), (int(2.5 * GiB), "2.50 GiB"),
    (2 * 2**40, "2.00 TiB"), (2**50, "1024.00 TiB"), (-2048, "-2.00 KiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("text, n", [
    ("24GiB", 24 * GiB), ("24 GiB", 24 * GiB), ("8G", 8 * GiB), ("512MiB", 512 * MiB),
    ("512 MB", 512 * 10**6), ("1.5KiB", 1536), ("2k", 2048), ("3kb", 3000), ("1TiB", 2**40),
    ("100", 100), ("7B", 7), (4096, 4096), (" 1 gb ", 10**9),
])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "abc", "12 XB", "-5GiB", "GiB", "1.2.3G", True], ids=repr)
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="cannot read a byte size"):
        parse_bytes(text)


def test_format_parse_round_trip():
    for n in (1024, 3 * GiB, 7 * MiB, 2**40):
        assert parse_bytes(format_bytes(n).replace(" ", "")) == n


@pytest.mark.parametrize("num_blocks, chunk", [(100, 5), (4096, 256), (32, 2), (17, 1), (67, 1), (10007, 10007), (16, 1), (12288, 768)])
def test_default_chunks_divide_the_pool(num_blocks, chunk):
    cfg = small(num_blocks=num_blocks)
    assert cfg.resolved_chunk_blocks == chunk and num_blocks % chunk == 0


@pytest.mark.parametrize("bad", ["int8", torch.int8, torch.float64, "fp4", "float8_e4m3fnuz", torch.float8_e4m3fnuz,
                                 torch.float8_e5m2fnuz])
def test_dtypes_the_kernels_cannot_store_are_refused(bad):
    with pytest.raises(ConfigError, match="dtype"):
        small(dtype=bad)


@pytest.mark.parametrize("name, dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                         ("float8_e4m3fn", torch.float8_e4m3fn), ("FP8_E5M2", torch.float8_e5m2),
                                         (torch.float8_e5m2, torch.float8_e5m2)])
def test_fp8_dtypes_are_stored_in_one_byte(name, dtype):
    cfg = small(dtype=name)
    assert cfg.dtype is dtype and cfg.dtype_bytes == 1 and cfg.is_fp8
    assert cfg.bytes_per_token * 2 == small(dtype="bf16").bytes_per_token


@pytest.mark.parametrize("bad", ["nonsense", "cuda:x", ""])
def test_bad_device_names_are_refused(bad):
    with pytest.raises(ConfigError, match="device"):
        small(device=bad)


# ------------------------------------------------------- limits of the fields
@pytest.mark.parametrize("field, value", [
    ("num_layers", 2**46), ("num_kv_heads", 2**62), ("head_dim", 2**40), ("block_size", 2**40),
    ("num_blocks", 2**63), ("num_blocks", 2**31), ("num_layers", 2**16 + 1),
])
def test_huge_fields_are_refused_at_construction(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}={value} exceeds the limit of "):
        small(**{field: value})


def test_the_limits_themselves_are_accepted():
    assert small(num_blocks=2**31 - 1, num_layers=1, num_kv_heads=1, head_dim=1, block_size=1).num_blocks == 2**31 - 1
    assert small(block_size=2**20, num_blocks=1).block_size == 2**20
    assert small(num_layers=2**16, num_kv_heads=1, head_dim=1, num_blocks=1).num_layers == 2**16


def test_a_pool_beyond_one_exbibyte_is_refused():
    # every field within its own limit, the product is not: 2**31 - 1 blocks of 2**40 bytes
    with pytest.raises(ConfigError, match=r"^num_blocks=2147483647 blocks of .* beyond the limit of 1 EiB"):
        small(num_blocks=2**31 - 1, num_layers=2**16, num_kv_heads=4, head_dim=2**16)
    exact = small(num_blocks=2**28, num_layers=2**12, num_kv_heads=2**7, head_dim=2**7, block_size=2**4,
                  dtype=torch.float16)
    assert exact.estimated_memory_bytes() == 2**60  # exactly the limit is allowed


@pytest.mark.parametrize("field", ["block_size", "num_blocks", "num_layers", "num_kv_heads", "head_dim",
                                   "initial_blocks", "chunk_blocks"])
@pytest.mark.parametrize("value", [True, 16.0, "16", None, 0, -1], ids=repr)
def test_int_fields_refuse_bools_floats_strings(field, value):
    if value is None and field in ("initial_blocks", "chunk_blocks"):
        return  # None means "not set" for these two
    with pytest.raises(ConfigError, match=rf"^{field} must be a positive integer"):
        small(**{field: value})


def test_int_fields_take_numpy_integers():
    import numpy as np

    cfg = small(num_blocks=np.int64(7), head_dim=np.int32(64))
    assert cfg.num_blocks == 7 and type(cfg.num_blocks) is int and type(cfg.head_dim) is int


@pytest.mark.parametrize("bad", [10**400, float("nan"), float("inf"), -0.1, "0.3", True], ids=repr)
def test_compaction_threshold_refuses_odd_numbers(bad):
    with pytest.raises(ConfigError, match="compaction_threshold"):
        small(compaction_threshold=bad)


@pytest.mark.parametrize("text", ["1e400GiB", "99999999999999999999999PiB", "nan", "-1GiB", "inf", "2EiB",
                                  "1025PiB", float("nan"), float("inf")], ids=repr)
def test_parse_bytes_refuses_huge_and_odd_values_naming_them(text):
    with pytest.raises(ConfigError) as info:
        parse_bytes(text)
    assert repr(text) in str(info.value)


def test_parse_bytes_is_exact_up_to_one_exbibyte():
    assert parse_bytes("1EiB") == 2**60
    assert parse_bytes("1024PiB") == 2**60
    assert parse_bytes("1.5PiB") == 3 * 2**49
    assert parse_bytes("123456789012345678") == 123456789012345678  # no float rounding
    assert parse_bytes("0.1KiB") == 102  # a fraction of a byte rounds down


def test_for_memory_beyond_int32_block_ids_is_a_config_error():
    # 1 EiB of 4-byte blocks would be 2**58 blocks: more ids than the int32 tables hold
    with pytest.raises(ConfigError, match="num_blocks=.* exceeds the limit of 2147483647"):
        CacheConfig.for_memory("1EiB", 1, 1, 1, block_size=1)
