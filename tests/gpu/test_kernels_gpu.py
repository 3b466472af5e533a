"""The Triton kernels on a CUDA/ROCm device against the torch reference:
bf16 (and fp16/fp32 spot checks), head_dim 128, block sizes 16 and 64,
contexts up to a few thousand tokens, outputs poisoned with NaN first; the
other head dims (padded tiles for 80, 96, 192) and block sizes down to 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")

from kvforge.errors import KernelError  # noqa: E402
from kvforge.kernels import (  # noqa: E402
    copy_blocks,
    describe_cache,
    paged_decode_attention,
    paged_prefill_attention,
    reference,
    store_kv,
)
from kvforge.kernels.testing import dense_attention, paged_from_dense  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16


def _kv(lens, heads, dim, dtype, gen):
    keys = [torch.randn(n, heads, dim, generator=gen).to(DEV, dtype) for n in lens]
    values = [torch.randn(n, heads, dim, generator=gen).to(DEV, dtype) for n in lens]
    return keys, values


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any()
    tol = {BF16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    rel = (out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    assert rel < tol / 2, rel


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 700}, {"soft_cap": 30.0}])
def test_decode_bf16(block_size, num_splits, options) -> None:
    gen = torch.Generator().manual_seed(block_size + (num_splits or 0))
    lens = [1, 17, 1000, 2500, 0, 3001, 64]
    keys, values = _kv(lens, 8, 128, BF16, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=1 + (block_size == 16) * 2, generator=gen)
    query = torch.randn(len(lens), 32, 128, generator=gen).to(DEV, BF16)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(*args, out=out, num_splits=num_splits, chunk_offsets=paged.chunk_offsets, **options)
    _close(out, reference.paged_decode_attention(*args, **options), BF16)
    # and the reference against the dense float64 oracle, for one long row
    i = 3
    dense = dense_attention(query[i : i + 1], keys[i], values[i], torch.tensor([lens[i] - 1]), **options)
    _close(out[i : i + 1], dense, BF16)


@pytest.mark.parametrize("dtype, head_dim, group", [(torch.float16, 64, 1), (torch.float32, 128, 2),
                                                    (BF16, 256, 8), (BF16, 32, 4), (BF16, 80, 4),
                                                    (torch.float16, 96, 3), (BF16, 192, 2), (torch.float32, 80, 1)])
def test_decode_other_dtypes_and_dims(dtype, head_dim, group) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    lens = [int(x) for x in torch.randint(1, 2000, (40,), generator=gen)]
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, 32, generator=gen)
    query = torch.randn(len(lens), 2 * group, head_dim, generator=gen).to(DEV, dtype)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(*args, out=out)
    _close(out, reference.paged_decode_attention(*args), dtype)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 300}, {"soft_cap": 20.0}])
def test_prefill_bf16(block_size, options) -> None:
    gen = torch.Generator().manual_seed(block_size)
    lens = [1500, 3000, 64, 129]
    new = [1500, 700, 1, 0]
    keys, values = _kv(lens, 8, 128, BF16, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    query = torch.randn(sum(new), 32, 128, generator=gen).to(DEV, BF16)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(*args, out=out, **options)
    _close(out, reference.paged_prefill_attention(*args, **options), BF16)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 64), (torch.float32, 128), (BF16, 256), (BF16, 80),
                                             (torch.float16, 96), (BF16, 192), (torch.float32, 96)])
def test_prefill_other_dtypes_and_dims(dtype, head_dim) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    lens, new = [700, 260], [300, 260]
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, 16, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    query = torch.randn(sum(new), 6, head_dim, generator=gen).to(DEV, dtype)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(*args, out=out)
    _close(out, reference.paged_prefill_attention(*args), dtype)


@pytest.mark.parametrize("block_size, head_dim", [(1, 128), (2, 96), (4, 80), (8, 192)])
def test_decode_small_blocks(block_size, head_dim) -> None:
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim)
    lens = [int(x) for x in torch.randint(1, 600, (12,), generator=gen)]
    keys, values = _kv(lens, 2, head_dim, BF16, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, generator=gen)
    query = torch.randn(len(lens), 8, head_dim, generator=gen).to(DEV, BF16)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    for num_splits in (None, 1, 5):
        out = torch.full_like(query, float("nan"))
        paged_decode_attention(*args, out=out, num_splits=num_splits, chunk_offsets=paged.chunk_offsets)
        _close(out, reference.paged_decode_attention(*args), BF16)


@pytest.mark.parametrize("block_size, head_dim", [(1, 128), (2, 96), (4, 80), (8, 192)])
def test_prefill_small_blocks(block_size, head_dim) -> None:
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim)
    lens, new = [500, 300, 40], [500, 100, 1]
    keys, values = _kv(lens, 2, head_dim, BF16, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    query = torch.randn(sum(new), 8, head_dim, generator=gen).to(DEV, BF16)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(*args, out=out, chunk_offsets=paged.chunk_offsets)
    _close(out, reference.paged_prefill_attention(*args), BF16)


@pytest.mark.parametrize("group", [1, 4, 6])
def test_prefill_many_short_prompts(group) -> None:
    # short prompts pick a small tile (BLOCK_M 32/64); some sequences have a long cached prefix
    gen = torch.Generator().manual_seed(group)
    new = [int(x) for x in torch.randint(0, 20, (30,), generator=gen)]
    lens = [n + (300 if i % 3 == 0 else 0) for i, n in enumerate(new)]
    keys, values = _kv(lens, 2, 128, BF16, gen)
    paged = paged_from_dense(keys, values, 16, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    query = torch.randn(sum(new), 2 * group, 128, generator=gen).to(DEV, BF16)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(*args, out=out)
    _close(out, reference.paged_prefill_attention(*args), BF16)


@pytest.mark.parametrize("num_chunks, head_dim", [(1, 128), (3, 128), (2, 80), (1, 96), (2, 192)])
def test_store_kv_bf16(num_chunks, head_dim) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    make = lambda: [torch.full((2, 2, 200, 16, 8, head_dim), float("nan"), dtype=BF16, device=DEV)  # noqa: E731
                    for _ in range(num_chunks)]
    got, want = make(), make()
    slots = torch.randperm(num_chunks * 200 * 16, generator=gen)[:3000].to(DEV)
    slots[::7] = -1
    key = torch.randn(3000, 8, head_dim, generator=gen).to(DEV, BF16)
    value = torch.randn(3000, 8, head_dim, generator=gen).to(DEV, BF16)
    store_kv(key, value, [c[1, 0] for c in got], [c[1, 1] for c in got], slots)
    reference.store_kv(key, value, [c[1, 0] for c in want], [c[1, 1] for c in want], slots)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_copy_blocks_bf16(num_chunks) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    got = [torch.randn(4, 2, 600, 16, 8, 128, generator=gen).to(DEV, BF16) for _ in range(num_chunks)]
    want = [c.clone() for c in got]
    pool = torch.randperm(600 * num_chunks, generator=gen)
    src, dst = pool[:250].to(DEV), pool[250:500].to(DEV)
    copy_blocks(got, src, dst)
    reference.copy_blocks(want, src, dst)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_gpu_value_checks_run_when_asked() -> None:
    gen = torch.Generator().manual_seed(0)
    keys, values = _kv([40, 9], 2, 128, BF16, gen)
    paged = paged_from_dense(keys, values, 16, generator=gen)
    query = torch.randn(2, 4, 128, device=DEV, dtype=BF16)
    bad = paged.block_tables.clone()
    bad[0, 1] = 10_000
    with pytest.raises(KernelError, match="outside the pool"):
        paged_decode_attention(query, paged.k_cache, paged.v_cache, bad, paged.context_lens, validate=True)
    with pytest.raises(KernelError, match="outside"):
        store_kv(keys[0][:2], values[0][:2], paged.k_cache, paged.v_cache,
                 torch.tensor([0, 10**6], device=DEV), validate=True)
    with pytest.raises(KernelError, match="also a source"):
        copy_blocks(paged.chunks, torch.tensor([0, 1], device=DEV), torch.tensor([1, 2], device=DEV), validate=True)


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_cache_view_equals_chunk_lists_bf16(num_chunks) -> None:
    gen = torch.Generator().manual_seed(50 + num_chunks)
    lens = [1, 900, 33, 2048]
    keys, values = _kv(lens, 8, 128, BF16, gen)
    paged = paged_from_dense(keys, values, 16, num_chunks=num_chunks, generator=gen)
    offsets = paged.chunk_offsets if num_chunks > 1 else None
    view = describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=offsets)
    assert (view.offsets is offsets) if num_chunks > 1 else view.offsets is None
    query = torch.randn(len(lens), 32, 128, generator=gen).to(DEV, BF16)
    tables, ctx = paged.block_tables, paged.context_lens
    for num_splits in (None, 1, 5):
        lists, views = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
        paged_decode_attention(query, paged.k_cache, paged.v_cache, tables, ctx, out=lists, num_splits=num_splits,
                               chunk_offsets=offsets)
        paged_decode_attention(query, view, None, tables, ctx, out=views, num_splits=num_splits)
        assert torch.equal(lists, views)
    new = [1, 300, 33, 0]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32, device=DEV)
    pq = torch.randn(sum(new), 32, 128, generator=gen).to(DEV, BF16)
    lists, views = torch.full_like(pq, float("nan")), torch.full_like(pq, float("nan"))
    paged_prefill_attention(pq, paged.k_cache, paged.v_cache, tables, cu, ctx, out=lists, chunk_offsets=offsets)
    paged_prefill_attention(pq, view, None, tables, cu, ctx, out=views)
    assert torch.equal(lists, views)


def test_decode_scratch_is_fresh_under_cuda_graph_capture() -> None:
    """A captured decode keeps its own split-KV scratch: replacing and freeing the
    reusable buffer after capture (a larger eager call, then a release) must not
    change what the graph computes."""
    from kvforge.kernels import triton_decode

    gen = torch.Generator().manual_seed(60)
    lens = [300, 1000, 7, 512]
    keys, values = _kv(lens, 8, 128, BF16, gen)
    paged = paged_from_dense(keys, values, 16, num_chunks=2, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets)
    query = torch.randn(len(lens), 32, 128, generator=gen).to(DEV, BF16)
    tables, ctx = paged.block_tables, paged.context_lens
    want = reference.paged_decode_attention(query, paged.k_cache, paged.v_cache, tables, ctx)
    out = torch.full_like(query, float("nan"))

    def call() -> None:
        paged_decode_attention(query, view, None, tables, ctx, out=out, num_splits=4)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture, as torch.cuda.graphs asks
        call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    triton_decode.release_scratch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    assert not triton_decode._SCRATCH  # the capture did not take (or create) a reusable buffer
    # an eager call grows a reusable buffer; then it is freed and its memory overwritten
    big_q = torch.randn(64, 32, 128, generator=gen).to(DEV, BF16)
    rows = torch.arange(64, device=DEV) % 4
    big_t, big_c = tables[rows], ctx[rows]
    paged_decode_attention(big_q, view, None, big_t, big_c, num_splits=16)
    triton_decode.release_scratch()
    torch.cuda.empty_cache()
    junk = torch.full((1 << 24,), float("nan"), device=DEV)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, want, BF16)
    del junk, graph


@pytest.mark.parametrize("validate", [None, True])
def test_prefill_with_only_empty_queries_returns_empty(validate) -> None:
    """A batch whose query lengths are all zero gives an empty result (no launch, no error)."""
    k = torch.randn(8, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.empty(0, 4, 64, device="cuda", dtype=torch.bfloat16)
    tables = torch.zeros(3, 4, dtype=torch.int32, device="cuda")
    cu = torch.zeros(4, dtype=torch.int32, device="cuda")
    ctx = torch.tensor([5, 0, 17], dtype=torch.int32, device="cuda")
    out = paged_prefill_attention(q, k, v, tables, cu, ctx, validate=validate)
    assert out.shape == (0, 4, 64)
    empty = paged_prefill_attention(q, k, v, tables[:0], cu[:1], ctx[:0], validate=validate)
    assert empty.shape == (0, 4, 64)
