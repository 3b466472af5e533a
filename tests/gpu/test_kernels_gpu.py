"""The Triton kernels on a CUDA/ROCm device against the torch reference:
bf16 (and fp16/fp32 spot checks), head_dim 128, block sizes 16 and 64,
contexts up to a few thousand tokens, outputs poisoned with NaN first."""
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
                                                    (BF16, 256, 8), (BF16, 32, 4)])
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


@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 64), (torch.float32, 128), (BF16, 256)])
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


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_store_kv_bf16(num_chunks) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    make = lambda: [torch.full((2, 2, 200, 16, 8, 128), float("nan"), dtype=BF16, device=DEV)  # noqa: E731
                    for _ in range(num_chunks)]
    got, want = make(), make()
    slots = torch.randperm(num_chunks * 200 * 16, generator=gen)[:3000].to(DEV)
    slots[::7] = -1
    key = torch.randn(3000, 8, 128, generator=gen).to(DEV, BF16)
    value = torch.randn(3000, 8, 128, generator=gen).to(DEV, BF16)
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
