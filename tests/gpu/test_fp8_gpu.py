"""The fp8 KV cache on a CUDA/ROCm device: bf16 model dtype, head dim 128, both
read paths (native fp8 casts where the device has them, sm89+; the uint8 bit
decoding everywhere), against the dense float64 oracle on the dequantized
values and against the torch reference, outputs poisoned with NaN first; the
store kernel's bytes against the CPU quantizer bit for bit; the error against
a bf16 cache; copy_blocks, compaction and the host tier moving bytes."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")

from kvforge import CacheConfig, KVCache  # noqa: E402
from kvforge.kernels import (  # noqa: E402
    copy_blocks, describe_cache, paged_decode_attention, paged_prefill_attention, store_kv, triton_fp8,
)
from kvforge.kernels.fp8 import dequantize, quantize  # noqa: E402
from kvforge.kernels.testing import dense_attention, fp8_probe_values, fp8_rne_bytes, paged_from_dense  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
NATIVE = torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(params=["native", "cast", "bits"])
def read_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """native: the automatic native path (e4m3 decode: values as int16 pairs, mode 4); cast: the
    plain fp8 cast of every tile (mode 1); bits: the uint8 bit decoding."""
    if request.param in ("native", "cast") and not NATIVE:
        pytest.skip("native fp8 casts need sm89+ (Ada, Hopper) on CUDA")
    triton_fp8.FORCE_DECODE = request.param
    try:
        yield request.param
    finally:
        triton_fp8.FORCE_DECODE = None


def _fp8_kv(lens, heads, dim, dtype, gen):
    ks = (torch.rand(heads, generator=gen) * 0.02 + 0.005)
    vs = (torch.rand(heads, generator=gen) * 0.02 + 0.005)
    keys = [quantize(torch.randn(n, heads, dim, generator=gen), ks, dtype).to(DEV) for n in lens]
    values = [quantize(torch.randn(n, heads, dim, generator=gen), vs, dtype).to(DEV) for n in lens]
    return keys, values, ks.to(DEV), vs.to(DEV)


def _close(out: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> None:
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    rel = (out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    assert rel < tol / 2, rel


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_store_bytes_match_the_cpu_quantizer(dtype) -> None:
    x = fp8_probe_values(dtype, torch.Generator().manual_seed(3))
    n = -(-x.numel() // 256)
    x = torch.cat([x, torch.zeros(n * 256 - x.numel())]).view(n, 2, 128)
    for model_dtype, scale in ((torch.float32, torch.ones(2)), (BF16, torch.tensor([0.37, 0.0051]))):
        xm = x.to(model_dtype)
        cache = torch.zeros(-(-n // 16), 16, 2, 128, dtype=torch.uint8, device=DEV).view(dtype)
        view = describe_cache(cache, cache.clone(), k_scale=scale.to(DEV), v_scale=scale.to(DEV),
                              model_dtype=model_dtype)
        store_kv(xm.to(DEV), xm.to(DEV), view, None, torch.arange(n, dtype=torch.int32, device=DEV))
        got = view.k_chunks[0].view(torch.uint8).reshape(-1, 2, 128)[:n].cpu()
        assert torch.equal(got, quantize(xm, scale, dtype).view(torch.uint8))
        if model_dtype == torch.float32:
            assert torch.equal(got, fp8_rne_bytes(xm, dtype))


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("block_size, num_splits, options", [
    (16, None, {}), (16, 7, {"sliding_window": 700}), (64, 1, {"soft_cap": 30.0}), (64, None, {}),
])
def test_decode_bf16(read_path, dtype, block_size, num_splits, options) -> None:
    gen = torch.Generator().manual_seed(block_size + (num_splits or 0))
    lens = [1, 17, 1000, 2500, 0, 3001, 64]
    keys, values, ks, vs = _fp8_kv(lens, 8, 128, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=3, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs, model_dtype=BF16)
    query = torch.randn(len(lens), 32, 128, generator=gen).to(DEV, BF16)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, out=out, num_splits=num_splits,
                           **options)
    _close(out, paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, backend="torch",
                                       **options))
    for i in (1, 3):
        want = dense_attention(query[i:i + 1], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.tensor([lens[i] - 1]), **options)
        _close(out[i:i + 1], want)


@pytest.mark.skipif(not NATIVE, reason="the paired-value read needs native fp8 casts (sm89+ on CUDA)")
@pytest.mark.parametrize("model_dtype, head_dim, group, block_size, num_splits, config", [
    (BF16, 128, 4, 16, None, {}),
    (BF16, 64, 8, 16, 3, {}),
    (torch.float16, 96, 2, 8, None, {}),
    (BF16, 80, 4, 32, 1, {}),
    (BF16, 192, 1, 16, 5, {}),
    (BF16, 256, 4, 16, None, {}),
    (BF16, 32, 4, 16, 2, {}),
    (BF16, 128, 4, 16, 4, {"block_n": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 128}),
    (BF16, 64, 8, 16, None, {"block_n": 64, "maxnreg": 0}),
])
def test_decode_paired_values(model_dtype, head_dim, group, block_size, num_splits, config) -> None:
    """The e4m3 decode read that converts values as int16 pairs (mode 4) against the float64
    oracle and against the plain cast (mode 1): every head-dim tile, padded ones included,
    fp16 and bf16 models, chunked caches, split and unsplit launches, capped registers or not."""
    from kvforge.kernels import triton_decode

    gen = torch.Generator().manual_seed(head_dim * 10 + group)
    lens = [1, 33, 700, 1500, 0, 129]
    keys, values, ks, vs = _fp8_kv(lens, 2, head_dim, E4M3, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs,
                          model_dtype=model_dtype)
    query = torch.randn(len(lens), 2 * group, head_dim, generator=gen).to(DEV, model_dtype)
    launch = triton_decode.DecodeLaunch(query, view, paged.block_tables, query, scale=head_dim ** -0.5,
                                        sliding_window=None, soft_cap=None, num_splits=num_splits, **config)
    assert launch.fp8 == 4
    out = torch.full_like(query, float("nan"))
    launch(view, query, paged.block_tables, paged.context_lens, out)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        want = dense_attention(query[i:i + 1], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.tensor([n - 1]))
        _close(out[i:i + 1], want)
    triton_fp8.FORCE_DECODE = "cast"
    try:
        cast = paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, num_splits=num_splits)
    finally:
        triton_fp8.FORCE_DECODE = None
    _close(out, cast, tol=1e-2)


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 300, "soft_cap": 20.0}], ids=["plain", "window-cap"])
def test_prefill_bf16(read_path, dtype, options) -> None:
    gen = torch.Generator().manual_seed(5)
    lens, new = [1500, 700, 64, 9], [1500, 300, 1, 0]
    keys, values, ks, vs = _fp8_kv(lens, 8, 128, dtype, gen)
    paged = paged_from_dense(keys, values, 16, num_chunks=2, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs, model_dtype=BF16)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    query = torch.randn(sum(new), 32, 128, generator=gen).to(DEV, BF16)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, out=out, **options)
    _close(out, paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, backend="torch",
                                        **options))
    i, rows = 1, slice(1500, 1800)
    want = dense_attention(query[rows], dequantize(keys[i], ks, torch.float64), dequantize(values[i], vs, torch.float64),
                           torch.arange(lens[i] - new[i], lens[i]), **options)
    _close(out[rows], want)


@pytest.mark.parametrize("dtype, bound", [(E4M3, 0.06), (E5M2, 0.12)], ids=str)
def test_error_against_the_bf16_cache(dtype, bound) -> None:
    gen = torch.Generator().manual_seed(9)
    lens = [4096] * 8
    keys = [torch.randn(n, 8, 128, generator=gen).to(DEV, BF16) for n in lens]
    values = [torch.randn(n, 8, 128, generator=gen).to(DEV, BF16) for n in lens]
    query = torch.randn(len(lens), 32, 128, generator=gen).to(DEV, BF16)
    bf16 = paged_from_dense(keys, values, 16, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(8, device=DEV)
    q8 = paged_from_dense([quantize(k, ones, dtype) for k in keys], [quantize(v, ones, dtype) for v in values], 16,
                          generator=torch.Generator().manual_seed(0))
    view = describe_cache(q8.k_cache, q8.v_cache, k_scale=ones, v_scale=ones, model_dtype=BF16)
    want = paged_decode_attention(query, bf16.k_cache, bf16.v_cache, bf16.block_tables, bf16.context_lens).double()
    got = paged_decode_attention(query, view, None, q8.block_tables, q8.context_lens).double()
    rel = float((got - want).norm() / want.norm())
    print(f"{dtype}: relative RMS error against the bf16 cache {rel:.4f}")
    assert 0.005 < rel < bound


def test_copy_blocks_moves_fp8_bytes() -> None:
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randint(0, 256, (4, 2, 8, 16, 8, 128), dtype=torch.uint8, generator=gen).to(DEV).view(E4M3)
              for _ in range(2)]
    old = torch.cat([c.view(torch.uint8) for c in chunks], dim=2).clone()
    copy_blocks(chunks, [0, 9, 3], [15, 1, 12])
    got = torch.cat([c.view(torch.uint8) for c in chunks], dim=2)
    want = old.clone()
    want[:, :, 15], want[:, :, 1], want[:, :, 12] = old[:, :, 0], old[:, :, 9], old[:, :, 3]
    assert torch.equal(got, want)


def _raw(cache: KVCache, sid: object) -> torch.Tensor:
    bs, cb = cache.config.block_size, cache.chunk_blocks
    table = cache.block_table(sid)
    return torch.stack([cache.chunks[table[p // bs] // cb][:, :, table[p // bs] % cb, p % bs].view(torch.uint8)
                        for p in range(cache.seq_len(sid))], 2)


def test_cache_write_gather_compaction_and_host_tier_keep_the_bytes() -> None:
    cfg = CacheConfig(block_size=16, num_blocks=64, num_layers=2, num_kv_heads=8, head_dim=128, dtype="fp8_e4m3",
                      model_dtype=BF16, device=DEV, chunk_blocks=8, enable_compaction=True, host_memory="16MiB",
                      kv_scale_granularity="head")
    cache = KVCache(cfg)
    gen = torch.Generator().manual_seed(1)
    for layer in range(2):
        cache.set_kv_scales(layer, torch.rand(8, generator=gen) * 0.05 + 0.01, 0.02)
    data = {}
    for i in range(8):
        r = cache.add_sequence(i, [1000 * i + t for t in range(40)])
        k = torch.randn(40, 8, 128, generator=gen).to(DEV, BF16)
        for layer in range(2):
            cache.write(layer, r.slots, k, -k)
        data[i] = k
    ks, vs = cache.kv_scales(0)
    gk, gv = cache.gather(3, 0)
    assert gk.dtype == BF16
    assert torch.equal(gk, dequantize(quantize(data[3], ks.to(DEV), E4M3), ks.to(DEV), BF16))
    for i in range(8):
        if i % 3:
            cache.free_sequence(i)
    cache.reclaim_unused_blocks()
    raw = {s: _raw(cache, s).clone() for s in (0, 3, 6)}
    assert cache.compact_cache() > 0
    cache.swap_out([3])
    cache.swap_in([3])
    torch.cuda.synchronize()
    for s, b in raw.items():
        assert torch.equal(_raw(cache, s), b)
    cache.check_invariants()
