"""The fp8 KV cache (issue 13, items 1 and 2) on the torch backend, and its sizing.

Quantization against an independent float64 oracle (round to nearest even,
saturation); the torch kernels against the dense float64 oracle on the
*dequantized* values (fresh random inputs, outputs poisoned with NaN) and
against the unquantized cache with the error bounded; ``KVCache`` writes,
gathers, scales and refusals; compaction, copy-on-write and the host tier
moving bytes unchanged; and every sizing figure halving bf16's. The Triton
kernels run the same checks under the interpreter in
``tests/fp8_triton_cases.py`` (a subprocess: see the last test).
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from kvforge import CacheConfig, CachePreset, KVCache
from kvforge.errors import ConfigError, KernelError, KVForgeError
from kvforge.kernels import copy_blocks, describe_cache, paged_decode_attention, paged_prefill_attention, store_kv
from kvforge.kernels.fp8 import FP8_MAX, dequantize, quantize, scale_for_amax
from kvforge.kernels.testing import dense_attention, fp8_probe_values, fp8_rne_bytes, fp8_values, paged_from_dense
from tests.interpreter import run_under_interpreter

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny tensors: one intra-op thread (conftest's fixture)."""


def _scales(per_head: bool, heads: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if per_head:
        return (torch.rand(heads, generator=gen) * 0.5 + 0.01, torch.rand(heads, generator=gen) * 0.5 + 0.01)
    return torch.full((heads,), 0.03), torch.full((heads,), 0.02)


def _quantized_kv(lens, heads, dim, dtype, ks, vs, gen, spread: float = 3.0):
    """fp8 keys/values per sequence (quantized from random values that reach the saturation range)."""
    keys = [quantize(torch.randn(n, heads, dim, generator=gen) * spread, ks, dtype) for n in lens]
    values = [quantize(torch.randn(n, heads, dim, generator=gen) * spread, vs, dtype) for n in lens]
    return keys, values


# ------------------------------------------------------------------ formats, quantization
@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_quantize_rounds_to_nearest_even_and_saturates(dtype):
    x = fp8_probe_values(dtype, torch.Generator().manual_seed(1))
    got = quantize(x[:, None, None], torch.ones(1), dtype).view(torch.uint8).reshape(-1)
    assert torch.equal(got, fp8_rne_bytes(x, dtype))
    m = FP8_MAX[dtype]
    q = quantize(torch.tensor([[[float("inf"), -float("inf"), 1e30, -m * 1.2, m]]]), torch.ones(1), dtype).float()
    assert q.tolist() == [[[m, -m, m, -m, m]]]  # saturated: never inf or NaN
    assert bool(quantize(torch.tensor([[[float("nan")]]]), torch.ones(1), dtype).float().isnan().all())


def test_the_oracle_knows_the_formats():
    # independent of torch's casts: the first and last bytes of each format by hand
    assert fp8_values(E4M3)[[0, 1, 8, 0x38, 0x7E]].tolist() == [0.0, 2**-9, 2**-6, 1.0, 448.0]
    assert fp8_values(E5M2)[[0, 1, 4, 0x3C, 0x7B]].tolist() == [0.0, 2**-16, 2**-14, 1.0, 57344.0]
    ties = torch.tensor([1.0625, 1.1875, 2**-10, 3 * 2**-10, 464.0])  # halfway: to the even byte
    assert fp8_rne_bytes(ties, E4M3).tolist() == [0x38, 0x3A, 0x00, 0x02, 0x7E]


def test_scale_for_amax_maps_amax_to_the_largest_value_and_keeps_one_for_nothing():
    s = scale_for_amax(torch.tensor([448.0, 0.0, float("inf"), 44.8]), E4M3)
    assert s.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])


# ----------------------------------------------------------------------- kernels (torch)
@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "head"])
def test_decode_matches_float64_on_the_dequantized_cache(dtype, model_dtype, per_head):
    gen = torch.Generator().manual_seed(7 + per_head)
    lens, heads, dim = [19, 1, 0, 33], 2, 32
    ks, vs = _scales(per_head, heads, gen)
    keys, values = _quantized_kv(lens, heads, dim, dtype, ks, vs, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=2, generator=gen)  # unused slots NaN
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs,
                          model_dtype=model_dtype)
    query = torch.randn(len(lens), 4, dim, generator=gen).to(model_dtype)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, out=out, backend="torch")
    for i, n in enumerate(lens):
        want = dense_attention(query[i:i + 1], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.tensor([n - 1]))
        torch.testing.assert_close(out[i:i + 1].double(), want, **TOL[model_dtype])


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 5, "soft_cap": 4.0}], ids=["plain", "window-cap"])
def test_prefill_matches_float64_on_the_dequantized_cache(dtype, options):
    gen = torch.Generator().manual_seed(11)
    lens, q_lens, heads, dim = [12, 5, 20], [3, 5, 1], 2, 16
    ks, vs = _scales(True, heads, gen)
    keys, values = _quantized_kv(lens, heads, dim, dtype, ks, vs, gen)
    paged = paged_from_dense(keys, values, 4, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, k_scale=ks, v_scale=vs, model_dtype=torch.float32)
    query = torch.randn(sum(q_lens), 6, dim, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, out=out, backend="torch",
                            **options)
    for i, (n, t) in enumerate(zip(lens, q_lens)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense_attention(query[rows], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.arange(n - t, n), **options)
        torch.testing.assert_close(out[rows].double(), want, **TOL[torch.float32])


#: fp8 decode against the unquantized bf16 cache (keys and values N(0, 1), scale 1.0, bf16 model dtype,
#: head dim 64, context 256, GQA 4:1): relative RMS error of the output, measured 3.8% (e4m3) and 7.5%
#: (e5m2) here (docs/fp8.md states the figures); the bounds leave headroom and fail if quantization is skipped.
ERROR_BOUNDS = {E4M3: (0.015, 0.06), E5M2: (0.03, 0.12)}


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_error_against_the_bf16_cache_is_what_docs_state(dtype):
    gen = torch.Generator().manual_seed(3)
    lens, heads, dim = [256, 256], 2, 64
    keys = [torch.randn(n, heads, dim, generator=gen).bfloat16() for n in lens]
    values = [torch.randn(n, heads, dim, generator=gen).bfloat16() for n in lens]
    query = torch.randn(len(lens), 8, dim, generator=gen).bfloat16()
    ones = torch.ones(heads)
    bf16 = paged_from_dense(keys, values, 16, generator=torch.Generator().manual_seed(0))
    q8 = paged_from_dense([quantize(k, ones, dtype) for k in keys], [quantize(v, ones, dtype) for v in values], 16,
                          generator=torch.Generator().manual_seed(0))
    view = describe_cache(q8.k_cache, q8.v_cache, k_scale=1.0, v_scale=1.0, model_dtype=torch.bfloat16)
    want = paged_decode_attention(query, bf16.k_cache, bf16.v_cache, bf16.block_tables, bf16.context_lens,
                                  backend="torch").double()
    got = paged_decode_attention(query, view, None, q8.block_tables, q8.context_lens, backend="torch").double()
    rel = float((got - want).norm() / want.norm())
    lo, hi = ERROR_BOUNDS[dtype]
    assert lo < rel < hi, f"{dtype}: relative RMS error {rel:.4f} outside ({lo}, {hi})"


def test_store_quantizes_with_the_views_scales_and_skips_padding():
    gen = torch.Generator().manual_seed(5)
    kc = torch.full((4, 4, 2, 16), float("nan"), dtype=E4M3)
    vc = kc.clone()
    ks, vs = torch.tensor([0.5, 0.01]), torch.tensor([2.0, 0.25])
    view = describe_cache(kc, vc, k_scale=ks, v_scale=vs, model_dtype=torch.float16)
    k = (torch.randn(5, 2, 16, generator=gen) * 4).half()
    slots = torch.tensor([3, -1, 0, 9, 15], dtype=torch.int32)
    store_kv(k, -k, view, None, slots, backend="torch")
    flat_k, flat_v = kc.view(16, 2, 16), vc.view(16, 2, 16)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep].long()].view(torch.uint8), quantize(k[keep], ks, E4M3).view(torch.uint8))
    assert torch.equal(flat_v[slots[keep].long()].view(torch.uint8), quantize(-k[keep], vs, E4M3).view(torch.uint8))
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots[keep].long()] = False
    assert bool(flat_k[untouched].float().isnan().all())  # padding (-1) and other slots not written


def test_copy_blocks_moves_fp8_bytes_unchanged():
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randint(0, 256, (2, 2, 4, 2, 1, 16), dtype=torch.uint8, generator=gen).view(E5M2)
              for _ in range(2)]  # every byte pattern, NaN and inf encodings included
    before = [c.view(torch.uint8).clone() for c in chunks]
    copy_blocks(chunks, [0, 5, 6], [7, 1, 2], backend="torch")
    flat = lambda cs: torch.cat([c.view(torch.uint8) for c in cs], dim=2)  # noqa: E731
    got, old = flat(chunks), flat(before)
    for s, d in [(0, 7), (5, 1), (6, 2)]:
        assert torch.equal(got[:, :, d], old[:, :, s])
    for b in (0, 3, 4, 5, 6):
        assert torch.equal(got[:, :, b], old[:, :, b])


@pytest.mark.parametrize("call, match", [
    (lambda k: describe_cache(k, k), "needs its dequantization scales"),
    (lambda k: describe_cache(k, k, k_scale=1.0, v_scale=1.0), "model_dtype"),
    (lambda k: describe_cache(k, k, k_scale=1.0, v_scale=1.0, model_dtype=E4M3), "model_dtype"),
    (lambda k: describe_cache(k, k, k_scale=0.0, v_scale=1.0, model_dtype=torch.float16), "k_scale"),
    (lambda k: describe_cache(k, k, k_scale=1.0, v_scale=float("nan"), model_dtype=torch.float16), "v_scale"),
    (lambda k: describe_cache(k, k, k_scale=torch.ones(3), v_scale=1.0, model_dtype=torch.float16), r"\[2\]"),
    (lambda k: describe_cache(k, k, k_scale=torch.tensor([1.0, -1.0]), v_scale=1.0, model_dtype=torch.float16),
     "positive"),
    (lambda k: describe_cache(k.float(), k.float(), k_scale=1.0, v_scale=1.0), "no scales"),
    (lambda k: paged_decode_attention(torch.zeros(1, 2, 16, dtype=torch.float16), k, k,
                                      torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)),
     "needs its dequantization scales"),
    (lambda k: store_kv(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16),
                        describe_cache(k, k, k_scale=1.0, v_scale=1.0, model_dtype=torch.float16), None,
                        torch.zeros(1, dtype=torch.int32)), "model dtype"),
], ids=["no-scales", "no-model-dtype", "fp8-model-dtype", "zero-scale", "nan-scale", "scale-shape",
        "negative-scale", "scales-on-fp32", "chunks-without-view", "store-wrong-dtype"])
def test_kernel_refusals_name_what_is_wrong(call, match):
    k = torch.zeros(2, 4, 2, 16, dtype=E4M3)
    with pytest.raises(KernelError, match=match):
        call(k)


# ----------------------------------------------------------------------------- the config
def test_config_fields_and_refusals():
    base = dict(block_size=16, num_blocks=8, num_layers=2, num_kv_heads=2, head_dim=64)
    c = CacheConfig(**base, dtype="fp8_e4m3")
    assert (c.dtype, c.resolved_model_dtype, c.model_dtype, c.kv_scale_granularity) == (
        E4M3, torch.bfloat16, None, "tensor")
    assert CacheConfig(**base, dtype=E5M2, model_dtype="fp16").resolved_model_dtype is torch.float16
    assert CacheConfig(**base, dtype="bf16").resolved_model_dtype is torch.bfloat16
    assert CacheConfig(**base, dtype="fp16", model_dtype="fp16").resolved_model_dtype is torch.float16
    for kw, match in [(dict(dtype="fp8_e4m3fnuz"), "fnuz.*fp8_e4m3"), (dict(dtype=torch.float8_e4m3fnuz), "fnuz"),
                      (dict(dtype="fp16", model_dtype="bf16"), "model_dtype"),
                      (dict(dtype="fp8", model_dtype="fp8"), "model_dtype"),
                      (dict(dtype="fp8", kv_scale_granularity="channel"), "kv_scale_granularity"),
                      (dict(dtype="bf16", kv_scale_granularity="head"), "fp8 caches only")]:
        with pytest.raises(ConfigError, match=match):
            CacheConfig(**base, **kw)


# --------------------------------------------------------------------------------- KVCache
def _cache(dtype=E4M3, **kw) -> KVCache:
    args = dict(block_size=4, num_blocks=32, num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype,
                model_dtype=torch.float16, device="cpu", chunk_blocks=4)
    args.update(kw)
    return KVCache(CacheConfig(**args))


def _raw(cache: KVCache, sid: object) -> torch.Tensor:
    """A sequence's stored bytes, ``[num_layers, 2, num_tokens, heads, head_dim]`` uint8."""
    bs, cb = cache.config.block_size, cache.chunk_blocks
    table = cache.block_table(sid)
    rows = [cache.chunks[table[p // bs] // cb][:, :, table[p // bs] % cb, p % bs].view(torch.uint8)
            for p in range(cache.seq_len(sid))]
    return torch.stack(rows, 2)


def _write(cache: KVCache, slots, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = len(slots)
    k = (torch.randn(n, 2, 16, generator=gen) * 2).half()
    v = (torch.randn(n, 2, 16, generator=gen) * 2).half()
    for layer in range(cache.config.num_layers):
        cache.write(layer, slots, k + layer, v - layer)
    return k, v


def test_write_then_gather_returns_the_dequantized_values_in_the_model_dtype():
    cache = _cache(kv_scale_granularity="head")
    cache.set_kv_scales(0, torch.tensor([0.05, 0.5]), 0.02)
    cache.set_kv_scales(1, 0.1, torch.tensor([1.0, 0.003]))
    r = cache.add_sequence("a", list(range(10)))
    k, v = _write(cache, r.slots, 0)
    for layer in range(2):
        ks, vs = cache.kv_scales(layer)
        gk, gv = cache.gather("a", layer)
        assert gk.dtype is torch.float16 and gv.dtype is torch.float16
        assert torch.equal(gk, dequantize(quantize(k + layer, ks, E4M3), ks, torch.float16))
        assert torch.equal(gv, dequantize(quantize(v - layer, vs, E4M3), vs, torch.float16))
    assert torch.isfinite(cache.gather("a", 1)[1]).all()  # 0.003 * 448 saturates: finite
    cache.check_invariants()


def test_out_of_range_writes_saturate_and_a_refused_write_changes_nothing():
    cache = _cache()
    r = cache.add_sequence("a", list(range(3)))
    big = torch.tensor([float("inf"), -float("inf"), 1e4]).view(3, 1, 1).expand(3, 2, 16).half()
    cache.write(0, r.slots, big, big)
    gk, _ = cache.gather("a", 0)
    assert gk[:, 0, 0].tolist() == [448.0, -448.0, 448.0]
    before = _raw(cache, "a").clone()
    with pytest.raises(KernelError, match="model dtype"):
        cache.write(0, r.slots, big.float(), big.float())
    assert torch.equal(_raw(cache, "a"), before)


def test_set_kv_scales_refusals_change_nothing():
    cache = _cache()
    for args, match in [((0, torch.ones(2), 1.0), "kv_scale_granularity='head'"), ((0, 0.0, 1.0), "positive"),
                        ((0, 1.0, float("inf")), "positive"), ((0, 1.0, torch.tensor([float("nan")])), "positive"),
                        ((0, "1.0", 1.0), "k_scale"), ((0, torch.ones(2, 2), 1.0), "k_scale")]:
        with pytest.raises(ConfigError, match=match):
            cache.set_kv_scales(*args)
    with pytest.raises(KVForgeError, match="layer 2 out of range"):
        cache.set_kv_scales(2, 1.0, 1.0)
    assert [s.tolist() for s in cache.kv_scales(0)] == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ConfigError, match=r"\[2\]"):
        _cache(kv_scale_granularity="head").set_kv_scales(0, torch.ones(3), 1.0)
    cache.set_kv_scales(0, torch.tensor(0.5), torch.tensor([0.25]))
    r = cache.add_sequence("a", [1, 2, 3, 4, 5])  # one full block: cached when the sequence is freed
    _write(cache, r.slots, 1)
    with pytest.raises(ConfigError, match="holds keys and values"):
        cache.set_kv_scales(1, 2.0, 2.0)
    assert [s.tolist() for s in cache.kv_scales(0)] == [[0.5, 0.5], [0.25, 0.25]]
    assert [s.tolist() for s in cache.kv_scales(1)] == [[1.0, 1.0], [1.0, 1.0]]
    cache.free_sequence("a")
    with pytest.raises(ConfigError, match=r"holds keys and values \(1 device block"):  # cached for reuse
        cache.set_kv_scales(1, 2.0, 2.0)
    cache.reclaim_unused_blocks()
    cache.set_kv_scales(1, 2.0, 2.0)
    assert cache.kv_scales(1).k_scale.tolist() == [2.0, 2.0]
    with pytest.raises(ConfigError, match="no scales"):
        _cache(dtype=torch.float16, model_dtype=None).kv_scales(0)
    with pytest.raises(ConfigError, match="unscaled"):
        _cache(dtype=torch.float16, model_dtype=None).set_kv_scales(0, 1.0, 1.0)


def test_calibrate_kv_scales_from_a_sample():
    cache = _cache()
    k = torch.zeros(5, 2, 16, dtype=torch.float16)
    k[2, 1, 3] = -112.0
    got = cache.calibrate_kv_scales(0, k, torch.zeros_like(k))
    assert got.k_scale.tolist() == [0.25, 0.25] and got.v_scale.tolist() == [1.0, 1.0]
    heads = _cache(kv_scale_granularity="head", dtype=E5M2)
    got = heads.calibrate_kv_scales(1, k, k * 2)
    assert got.k_scale.tolist() == [1.0, 112 / 57344] and got.v_scale.tolist() == [1.0, 224 / 57344]
    with pytest.raises(ConfigError, match=r"\[num_tokens, 2, 16\]"):
        cache.calibrate_kv_scales(0, k[:, :1], k)


def test_kernels_read_the_caches_scales():
    cache = _cache(num_layers=1, kv_scale_granularity="head")
    cache.set_kv_scales(0, torch.tensor([0.02, 0.3]), torch.tensor([0.01, 0.05]))
    r = cache.add_sequence("a", list(range(9)))
    k, v = _write(cache, r.slots, 4)
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0)).half()
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, cache.layer_view(0), None, cache.block_tables(["a"]), cache.context_lens(["a"]), out=out)
    gk, gv = cache.gather("a", 0)
    torch.testing.assert_close(out.double(), dense_attention(q, gk, gv, torch.tensor([8])), **TOL[torch.float16])


def test_compaction_moves_fp8_bytes_unchanged():
    cache = _cache(num_blocks=32, enable_compaction=True)
    cache.set_kv_scales(0, 0.04, 0.07)
    for i in range(8):
        r = cache.add_sequence(i, [100 * i + t for t in range(10)])
        _write(cache, r.slots, i)
    for i in range(8):
        if i % 3:
            cache.free_sequence(i)
    cache.reclaim_unused_blocks()
    live = [0, 3, 6]
    raw = {s: _raw(cache, s).clone() for s in live}
    kv = {s: cache.gather(s, 0) for s in live}
    released = cache.compact_cache()
    assert released > 0 and cache.stats.total_blocks_moved > 0
    for s in live:
        assert torch.equal(_raw(cache, s), raw[s])
        assert all(torch.equal(a, b) for a, b in zip(cache.gather(s, 0), kv[s]))
    cache.check_invariants()


def test_copy_on_write_copies_fp8_bytes_unchanged():
    cache = _cache()
    r = cache.add_sequence("p", list(range(6)))  # 1 full block + 2 tokens of a shared tail
    _write(cache, r.slots, 9)
    cache.fork("p", "c")
    cache.append_tokens("c", 1)
    assert cache.num_cow_copies == 1 and cache.block_table("c")[1] != cache.block_table("p")[1]
    assert torch.equal(_raw(cache, "c")[:, :, :6], _raw(cache, "p"))


def test_host_tier_round_trip_moves_fp8_bytes_unchanged():
    cache = _cache(num_blocks=8, chunk_blocks=None, host_memory="8KiB")  # 512-byte blocks: 16 on the host
    cache.set_kv_scales(1, 0.5, 0.125)
    r = cache.add_sequence("a", list(range(11)))
    _write(cache, r.slots, 3)
    raw, kv = _raw(cache, "a").clone(), cache.gather("a", 1)
    cache.swap_out(["a"])
    assert cache.is_swapped("a")
    other = cache.add_sequence("b", list(range(500, 528)))  # reuses (overwrites) the freed device blocks
    _write(cache, other.slots, 8)
    cache.free_sequence("b")
    cache.reclaim_unused_blocks()
    cache.swap_in(["a"])
    assert torch.equal(_raw(cache, "a"), raw)
    assert all(torch.equal(x, y) for x, y in zip(cache.gather("a", 1), kv))
    cache.check_invariants()


# ----------------------------------------------------------------------------- sizing
LLAMA = dict(num_kv_heads=8, head_dim=128, num_layers=32)


@pytest.mark.parametrize("fp8", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_halves_every_size_of_bf16(fp8):
    one = dict(block_size=16, num_blocks=1000, **LLAMA)
    a, b = CacheConfig(**one, dtype=fp8), CacheConfig(**one, dtype="bf16")
    assert (a.dtype_bytes, b.dtype_bytes) == (1, 2)
    assert a.bytes_per_token * 2 == b.bytes_per_token == 128 * 1024
    assert a.bytes_per_block * 2 == b.bytes_per_block
    assert a.estimated_memory_bytes() * 2 == b.estimated_memory_bytes()
    for preset in CachePreset.builtin():
        pa = CacheConfig.from_preset(preset, **LLAMA, dtype=fp8)
        assert pa.num_blocks == 2 * CacheConfig.from_preset(preset, **LLAMA, dtype="bf16").num_blocks
        assert pa.estimated_memory_bytes() == preset.kv_budget_bytes
    ctx = CacheConfig.for_context_length(8192, **LLAMA, vram_budget="1GiB", num_sequences=4, dtype=fp8)
    assert ctx.num_blocks == 2 * CacheConfig.for_context_length(8192, **LLAMA, vram_budget="1GiB", num_sequences=4,
                                                                dtype="bf16").num_blocks
    assert CacheConfig.for_memory("2GiB", 32, 8, 128, dtype=fp8).num_blocks == 2 * CacheConfig.for_memory(
        "2GiB", 32, 8, 128, dtype="bf16").num_blocks
    m = CacheConfig.for_model("llama-3-8b", "24GiB", dtype=fp8)
    assert m.num_blocks == 2 * CacheConfig.for_model("llama-3-8b", "24GiB").num_blocks == 24576
    assert m.resolved_model_dtype is torch.bfloat16  # the checkpoint's dtype
    assert CacheConfig.for_model("llama-2-7b", "1GiB", dtype=fp8).resolved_model_dtype is torch.float16


def test_plan_and_simulate_count_one_byte_an_element():
    from kvforge.tools.cli import build_parser
    from kvforge.tools.plan import plan_rows
    from kvforge.tools.simulate.cli import _config_from_args

    title8, rows8 = plan_rows("llama-3-8b", 24 * 2**30, 8192, kv_dtype="fp8_e4m3")
    title, rows = plan_rows("llama-3-8b", 24 * 2**30, 8192)
    assert "float8_e4m3fn; 64.00 KiB per token" in title8 and "bfloat16; 128.00 KiB per token" in title
    for r8, r in zip(rows8, rows):
        if r[0].startswith("for_context_length"):  # one sequence of the context: same blocks, half the bytes
            assert r8[2] == r[2] and r8[5] == "512.00 MiB" and r[5] == "1.00 GiB"
        else:  # the same memory holds twice the blocks, tokens and sequences
            assert (r8[2], r8[3], r8[4], r8[5]) == (2 * r[2], 2 * r[3], 2 * r[4], r[5])
    with pytest.raises(ConfigError, match="--kv-dtype='fp8_e4m3fnuz'.*fnuz"):
        plan_rows("llama-3-8b", 2**30, 8192, kv_dtype="fp8_e4m3fnuz")

    def sim(*extra: str) -> argparse.Namespace:
        args = build_parser().parse_args(["simulate", "--vram", "4GiB", "--host-memory", "8GiB", *extra])
        return _config_from_args(args)

    s8, s = sim("--kv-dtype", "fp8_e5m2"), sim()
    assert s8.bytes_per_token * 2 == s.bytes_per_token
    assert (s8.num_blocks, s8.num_host_blocks) == (2 * s.num_blocks, 2 * s.num_host_blocks)


def test_memory_profile_counts_one_byte_an_element():
    shape = dict(block_size=4, num_blocks=16, num_layers=2, num_kv_heads=2, head_dim=16, device="cpu")
    c8, c16 = KVCache(CacheConfig(**shape, dtype="fp8_e4m3")), KVCache(CacheConfig(**shape, dtype="bf16"))
    for c in (c8, c16):
        c.add_sequence("a", list(range(9)))
    p8, p16 = c8.memory_profile(), c16.memory_profile()
    assert (p8.total_bytes * 2, p8.used_bytes * 2, p8.live_kv_bytes * 2, p8.bytes_per_token * 2) == (
        p16.total_bytes, p16.used_bytes, p16.live_kv_bytes, p16.bytes_per_token)
    assert p8.total_bytes == sum(t.numel() for t in c8.chunks) == c8.config.estimated_memory_bytes()
    assert p8.kv_dtype == "float8_e4m3fn" and p16.kv_dtype == "bfloat16"
    assert "128 B / 512 B (float8_e4m3fn)" in p8.report(echo=False)
    assert "(bfloat16)" not in p16.report(echo=False)


# ------------------------------------------------------------------ Triton (interpreter)
def test_fp8_triton_kernels_under_interpreter() -> None:
    """Runs tests/fp8_triton_cases.py with TRITON_INTERPRET=1 in a fresh interpreter (the flag
    must be set before triton is first imported)."""
    pytest.importorskip("triton")
    run_under_interpreter("fp8_triton_cases.py", timeout=900)
