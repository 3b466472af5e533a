"""The Triton kernels against the torch reference, on tiny shapes, under
the Triton interpreter (CPU).

The interpreter is chosen when triton is first imported, so this module runs
only with ``TRITON_INTERPRET=1`` in the environment from the start;
``tests/test_kernels.py::test_triton_kernels_under_interpreter`` runs it that
way in a subprocess. Run directly with
``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py``.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (run via tests/test_kernels.py)",
                allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvforge.kernels import (  # noqa: E402
    copy_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    reference,
    store_kv,
)
from kvforge.kernels.testing import paged_from_dense  # noqa: E402

TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _kv(lens, heads, dim, dtype, gen):
    keys = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    return keys, values


@pytest.mark.parametrize(
    "dtype, block_size, head_dim, group, num_chunks, num_splits, options",
    [
        (torch.float16, 8, 16, 1, 1, None, {}),
        (torch.float16, 16, 32, 4, 1, 1, {}),
        (torch.float16, 8, 16, 2, 3, 3, {"sliding_window": 9}),
        (torch.float32, 32, 16, 4, 2, None, {"soft_cap": 2.0}),
        (torch.float32, 8, 32, 3, 1, 4, {"scale": 0.5, "sliding_window": 1}),
        (torch.float16, 16, 16, 8, 2, 2, {"soft_cap": 5.0, "sliding_window": 20}),
    ],
)
def test_decode_matches_reference(dtype, block_size, head_dim, group, num_chunks, num_splits, options) -> None:
    gen = torch.Generator().manual_seed(block_size + head_dim + group)
    lens = [1, 8, 29, 0, 45]
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=num_chunks, num_layers=2, layer=1, generator=gen)
    query = torch.randn(len(lens), 2 * group, head_dim, generator=gen).to(dtype)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    offsets = paged.chunk_offsets if num_chunks == 3 else None  # precomputed table, or computed per call
    paged_decode_attention(*args, out=out, num_splits=num_splits, chunk_offsets=offsets, backend="triton", **options)
    want = reference.paged_decode_attention(*args, **options)
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize(
    "dtype, block_size, head_dim, group, num_chunks, options",
    [
        (torch.float16, 8, 16, 1, 1, {}),
        (torch.float16, 16, 32, 4, 2, {}),
        (torch.float32, 8, 16, 2, 1, {"sliding_window": 7}),
        (torch.float16, 32, 16, 3, 3, {"soft_cap": 3.0}),
    ],
)
def test_prefill_matches_reference(dtype, block_size, head_dim, group, num_chunks, options) -> None:
    gen = torch.Generator().manual_seed(block_size * group + num_chunks)
    lens = [21, 5, 40, 9]
    new = [21, 2, 17, 0]  # no prefix; short prefix; long prefix; nothing new
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=num_chunks, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = torch.randn(sum(new), 2 * group, head_dim, generator=gen).to(dtype)
    args = (query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(*args, out=out, backend="triton", **options)
    want = reference.paged_prefill_attention(*args, **options)
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("dtype, num_chunks", [(torch.float16, 1), (torch.float32, 3)])
def test_store_kv_matches_reference(dtype, num_chunks) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    make = lambda: [torch.full((2, 2, 4, 8, 3, 16), float("nan"), dtype=dtype) for _ in range(num_chunks)]  # noqa: E731
    got, want = make(), make()
    num_slots = num_chunks * 4 * 8
    slots = torch.randperm(num_slots, generator=gen)[:13]
    slots[[2, 7]] = -1
    key = torch.randn(13, 3, 16, generator=gen).to(dtype)
    value = torch.randn(13, 3, 16, generator=gen).to(dtype)
    store_kv(key, value, [c[1, 0] for c in got], [c[1, 1] for c in got], slots, backend="triton")
    reference.store_kv(key, value, [c[1, 0] for c in want], [c[1, 1] for c in want], slots)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_copy_blocks_matches_reference(num_chunks) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    got = [torch.randn(3, 2, 6, 8, 2, 16, generator=gen).half() for _ in range(num_chunks)]
    want = [c.clone() for c in got]
    pool = torch.randperm(6 * num_chunks, generator=gen)
    src, dst = pool[:3], pool[3:6]
    src = torch.cat([src, src[:1]])
    dst = torch.cat([dst, pool[6:7] if num_chunks > 1 else torch.tensor([])]).long()
    if num_chunks == 1:
        src = src[:3]
    copy_blocks(got, src, dst, backend="triton")
    reference.copy_blocks(want, src, dst)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
