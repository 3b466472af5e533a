"""The fp8 paths of the Triton kernels under the Triton interpreter (CPU).

The store kernel's bytes against the float64 rounding oracle and the torch
quantizer, bit for bit; decode and prefill, on both read paths (native fp8
casts and the uint8 bit decoding that hardware without OCP fp8 runs), against
the dense float64 oracle on the dequantized values, with every cache row and
output row inside a wider NaN-filled one; ``copy_blocks`` moving bytes; and a
``KVCache`` on the Triton backend storing what the torch backend stores.
Model dtypes are float16 and float32, and bfloat16 on the native read path:
with a bfloat16 model that path computes in float16, so the interpreter
(which mishandles bfloat16 arithmetic) runs it too; the bits path keeps
bfloat16 dots and runs in ``tests/gpu/test_fp8_gpu.py``.

Runs only with ``TRITON_INTERPRET=1`` set before triton is first imported:
``tests/test_fp8.py::test_fp8_triton_kernels_under_interpreter`` runs it so
(the file is named so that pytest does not collect it on its own). Directly:
``TRITON_INTERPRET=1 python -m pytest tests/fp8_triton_cases.py``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/fp8_triton_cases.py needs TRITON_INTERPRET=1 before triton is imported "
                       "(tests/test_fp8.py runs it so)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvforge import CacheConfig, KVCache  # noqa: E402
from kvforge.kernels import (  # noqa: E402
    copy_blocks, describe_cache, paged_decode_attention, paged_prefill_attention, store_kv,
)
from kvforge.kernels import triton_fp8  # noqa: E402
from kvforge.kernels.fp8 import dequantize, quantize  # noqa: E402
from kvforge.kernels.testing import (  # noqa: E402
    dense_attention, fp8_probe_values, fp8_rne_bytes, in_wide_rows, paged_from_dense, wide_rows_untouched,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3)}  # bf16: its output's rounding


@pytest.fixture(params=["native", "bits"])
def read_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways the attention kernels read fp8 (kvforge.kernels.triton_fp8)."""
    triton_fp8.FORCE_DECODE = request.param
    try:
        yield request.param
    finally:
        triton_fp8.FORCE_DECODE = None


def test_interpreter_runs_the_native_path_by_default() -> None:
    assert triton_fp8.decode_mode(E4M3, torch.device("cpu")) == 1
    triton_fp8.FORCE_DECODE = "bits"
    try:
        assert [triton_fp8.decode_mode(d, torch.device("cpu")) for d in FP8] == [2, 3]
    finally:
        triton_fp8.FORCE_DECODE = None


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.float32], ids=str)
def test_store_bytes_are_the_rounding_oracles(dtype, model_dtype) -> None:
    """Every rounding case (ties, subnormals, saturation, inf, -0.0, NaN) through the store
    kernel with scale 1: the bytes the float64 oracle and torch's quantizer give."""
    x = torch.cat([fp8_probe_values(dtype, torch.Generator().manual_seed(4)), torch.tensor([float("nan")])])
    x = x.to(model_dtype)
    heads, dim = 2, 16
    n = -(-x.numel() // (heads * dim))
    x = torch.cat([x, torch.zeros(n * heads * dim - x.numel(), dtype=model_dtype)]).view(n, heads, dim)
    cache = torch.zeros(-(-n // 8), 8, heads, dim, dtype=dtype)
    view = describe_cache(cache, cache.clone(), k_scale=1.0, v_scale=1.0, model_dtype=model_dtype)
    store_kv(x, x, view, None, torch.arange(n, dtype=torch.int32), backend="triton")
    got = view.k_chunks[0].view(torch.uint8).reshape(-1, heads, dim)[:n]
    assert torch.equal(got, fp8_rne_bytes(x.float(), dtype))
    assert torch.equal(got, quantize(x, torch.ones(heads), dtype).view(torch.uint8))
    assert torch.equal(view.v_chunks[0].view(torch.uint8).reshape(-1, heads, dim)[:n], got)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_store_with_scales_matches_torch_and_writes_only_its_slots(read_path, dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    heads, dim, bs = 3, 24, 4  # 72 columns: a masked tail of the flattened row
    chunks = [torch.full((1, 2, 5, bs, heads, dim), float("nan"), dtype=dtype) for _ in range(2)]
    ks, vs = torch.tensor([0.013, 0.5, 3.0]), torch.tensor([0.07, 1.0, 0.002])
    view = describe_cache([c[0, 0] for c in chunks], [c[0, 1] for c in chunks], k_scale=ks, v_scale=vs,
                          model_dtype=torch.float16)
    slots = torch.randperm(10 * bs, generator=gen)[:17].to(torch.int32)
    slots[[2, 9]] = -1
    k = (torch.randn(17, heads, dim, generator=gen) * 8).half()
    v = (torch.randn(17, heads, dim, generator=gen) * 8).half()
    store_kv(k, v, view, None, slots, backend="triton")
    flat_k = torch.cat([c[0, 0] for c in chunks]).reshape(-1, heads, dim).view(torch.uint8)
    flat_v = torch.cat([c[0, 1] for c in chunks]).reshape(-1, heads, dim).view(torch.uint8)
    keep = slots >= 0
    idx = slots[keep].long()
    assert torch.equal(flat_k[idx], quantize(k[keep], ks, dtype).view(torch.uint8))
    assert torch.equal(flat_v[idx], quantize(v[keep], vs, dtype).view(torch.uint8))
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    written[idx] = True
    assert bool(flat_k[~written].view(dtype).float().isnan().all())


def _fp8_kv(lens, heads, dim, dtype, gen):
    ks = torch.rand(heads, generator=gen) * 0.05 + 0.005
    vs = torch.rand(heads, generator=gen) * 0.05 + 0.005
    keys = [quantize(torch.randn(n, heads, dim, generator=gen), ks, dtype) for n in lens]
    values = [quantize(torch.randn(n, heads, dim, generator=gen), vs, dtype) for n in lens]
    return keys, values, ks, vs


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("model_dtype, head_dim, block_size, num_splits, options", [
    (torch.float16, 16, 8, None, {}),
    (torch.float32, 32, 4, 3, {"sliding_window": 7}),
    (torch.float16, 80, 2, 2, {"soft_cap": 3.0}),
    (torch.float32, 24, 8, 1, {"scale": 0.4}),
], ids=["fp16-16", "fp32-32-window", "fp16-80-cap", "fp32-24-scale"])
def test_decode_matches_float64_on_the_dequantized_cache(read_path, dtype, model_dtype, head_dim, block_size,
                                                        num_splits, options) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size)
    lens, heads = [13, 1, 0, 26], 2
    keys, values, ks, vs = _fp8_kv(lens, heads, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, row_pad=8, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs,
                          model_dtype=model_dtype)
    query = in_wide_rows(torch.randn(len(lens), 6, head_dim, generator=gen).to(model_dtype))
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, out=out, num_splits=num_splits,
                           backend="triton", **options)
    assert wide_rows_untouched(out)
    for i, n in enumerate(lens):
        want = dense_attention(query[i:i + 1], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.tensor([n - 1]), **options)
        torch.testing.assert_close(out[i:i + 1].double(), want, **TOL[model_dtype])


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("model_dtype, head_dim, block_size, options", [
    (torch.float16, 16, 4, {}),
    (torch.float32, 48, 8, {"sliding_window": 5, "soft_cap": 6.0}),
], ids=["fp16-16", "fp32-48-window-cap"])
def test_prefill_matches_float64_on_the_dequantized_cache(read_path, dtype, model_dtype, head_dim, block_size,
                                                         options) -> None:
    gen = torch.Generator().manual_seed(head_dim * 3 + block_size)
    lens, new, heads = [21, 9, 4], [21, 3, 0], 2
    keys, values, ks, vs = _fp8_kv(lens, heads, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, row_pad=8, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs,
                          model_dtype=model_dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = in_wide_rows(torch.randn(sum(new), 4, head_dim, generator=gen).to(model_dtype))
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, out=out,
                            backend="triton", **options)
    assert wide_rows_untouched(out)
    for i, (n, q_len) in enumerate(zip(lens, new)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense_attention(query[rows], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.arange(n - q_len, n), **options)
        torch.testing.assert_close(out[rows].double(), want, **TOL[model_dtype])


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_a_bfloat16_model_reads_fp8_natively_through_float16_dots(dtype) -> None:
    """Decode and prefill with a bfloat16 model over an fp8 cache, native reads (their dots run
    in float16), against float64 on the dequantized values."""
    gen = torch.Generator().manual_seed(77)
    lens, new, heads, dim = [13, 1, 0, 26], [13, 1, 0, 5], 2, 32
    keys, values, ks, vs = _fp8_kv(lens, heads, dim, dtype, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=2, row_pad=8, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, paged.chunk_offsets, k_scale=ks, v_scale=vs,
                          model_dtype=torch.bfloat16)
    assert triton_fp8.decode_mode(dtype, torch.device("cpu")) == 1
    query = in_wide_rows((torch.randn(len(lens), 6, dim, generator=gen) * 3).bfloat16())
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, out=out, num_splits=2,
                           backend="triton")
    assert wide_rows_untouched(out)
    for i, n in enumerate(lens):
        want = dense_attention(query[i:i + 1], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.tensor([n - 1]))
        torch.testing.assert_close(out[i:i + 1].double(), want, **TOL[torch.bfloat16])
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = in_wide_rows((torch.randn(sum(new), 6, dim, generator=gen) * 3).bfloat16())
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, out=out,
                            backend="triton", sliding_window=6)
    assert wide_rows_untouched(out)
    for i, (n, q_len) in enumerate(zip(lens, new)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense_attention(query[rows], dequantize(keys[i], ks, torch.float64),
                               dequantize(values[i], vs, torch.float64), torch.arange(n - q_len, n),
                               sliding_window=6)
        torch.testing.assert_close(out[rows].double(), want, **TOL[torch.bfloat16])


def test_copy_blocks_moves_fp8_bytes_unchanged() -> None:
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randint(0, 256, (2, 2, 3, 4, 2, 16), dtype=torch.uint8, generator=gen).view(E4M3)
              for _ in range(2)]  # every byte pattern, NaN encodings included
    old = torch.cat([c.view(torch.uint8) for c in chunks], dim=2).clone()
    copy_blocks(chunks, [0, 4], [5, 1], backend="triton")
    got = torch.cat([c.view(torch.uint8) for c in chunks], dim=2)
    want = old.clone()
    want[:, :, 5], want[:, :, 1] = old[:, :, 0], old[:, :, 4]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_a_triton_cache_stores_what_the_torch_cache_stores(dtype) -> None:
    caches = {}
    for backend in ("triton", "torch"):
        cfg = CacheConfig(block_size=4, num_blocks=8, num_layers=1, num_kv_heads=2, head_dim=16, dtype=dtype,
                          model_dtype=torch.float16, device="cpu", kv_scale_granularity="head")
        cache = caches[backend] = KVCache(cfg, backend=backend)
        cache.set_kv_scales(0, torch.tensor([0.01, 0.2]), torch.tensor([0.5, 0.003]))
        gen = torch.Generator().manual_seed(1)
        r = cache.add_sequence("a", list(range(11)))
        cache.write(0, r.slots, (torch.randn(11, 2, 16, generator=gen) * 3).half(),
                    (torch.randn(11, 2, 16, generator=gen) * 3).half())
    a, b = caches["triton"], caches["torch"]
    assert torch.equal(a.chunks[0].view(torch.uint8), b.chunks[0].view(torch.uint8))
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2)).half()
    outs = [paged_decode_attention(q, c.layer_view(0), None, c.block_tables(["a"]), c.context_lens(["a"]),
                                   backend=c.backend) for c in (a, b)]
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float16])


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_a_stored_nan_reads_as_nan_on_the_bits_path_and_keeps_its_sign(dtype) -> None:
    """Garbage in is not hidden: a NaN value stored in the cache makes the output NaN when the
    kernel decodes fp8 by its bits (e4m3's NaN byte would otherwise shift to 480 * scale), and
    the store writes a negative NaN's sign as torch's cast does."""
    h, d, bs = 1, 16, 16
    kc = torch.zeros(2, bs, h, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    view = describe_cache(kc, vc, k_scale=1.0, v_scale=1.0, model_dtype=torch.float32)
    k, v = torch.ones(3, h, d), torch.ones(3, h, d)
    v[1, 0, 3] = float("nan")
    v[2, 0, 5] = -float("nan")
    store_kv(k, v, view, None, torch.tensor([0, 1, 2]), backend="triton")
    stored = vc.view(torch.uint8)[0, :3, 0]
    want = quantize(v, torch.ones(h), dtype).view(torch.uint8)[:, 0]
    assert torch.equal(stored[1:, :], want[1:, :])  # the NaN bytes, signs included
    triton_fp8.FORCE_DECODE = "bits"
    try:
        out = paged_decode_attention(torch.ones(1, h, d), view, None, torch.tensor([[0]], dtype=torch.int32),
                                     torch.tensor([3], dtype=torch.int32), backend="triton")
    finally:
        triton_fp8.FORCE_DECODE = None
    assert torch.isnan(out[0, 0, 3]) and torch.isnan(out[0, 0, 5]) and torch.isfinite(out[0, 0, 0])
