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
    describe_cache,
    paged_decode_attention,
    paged_prefill_attention,
    reference,
    store_kv,
)
from kvforge.kernels.testing import (  # noqa: E402
    in_wide_rows,
    paged_from_dense,
)
from tests.test_head_dims import check_decode, check_prefill  # noqa: E402  (the same cases as on torch)

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


# --------------------------------------------------------------------------- described layers (CacheView)


@pytest.mark.parametrize("num_chunks, num_splits", [(1, None), (1, 3), (3, 1), (3, 4)])
def test_cache_view_decode_equals_chunk_lists(num_chunks, num_splits) -> None:
    gen = torch.Generator().manual_seed(20 + num_chunks)
    lens = [3, 30, 0, 17]
    keys, values = _kv(lens, 2, 16, torch.float16, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=num_chunks, num_layers=2, layer=1, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache)
    query = torch.randn(len(lens), 4, 16, generator=gen).half()
    tables, ctx = paged.block_tables, paged.context_lens
    lists, views = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    paged_decode_attention(query, paged.k_cache, paged.v_cache, tables, ctx, out=lists, num_splits=num_splits,
                           backend="triton")
    paged_decode_attention(query, view, None, tables, ctx, out=views, num_splits=num_splits, backend="triton")
    assert torch.equal(lists, views)  # bit-identical; a NaN left anywhere fails too
    torch.testing.assert_close(views, reference.paged_decode_attention(query, paged.k_cache, paged.v_cache, tables, ctx),
                               **TOL[torch.float16])


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_view_sized_for_more_chunks_reads_the_same(num_chunks) -> None:
    """A view described with ``max_chunks`` (an elastic pool's ceiling) keeps a chunk table
    even for one chunk and pads it for the ceiling; decode and prefill read the same bits."""
    gen = torch.Generator().manual_seed(40 + num_chunks)
    lens, new = [3, 30, 17], [3, 1, 9]
    keys, values = _kv(lens, 2, 16, torch.float16, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=num_chunks, generator=gen)
    plain = describe_cache(paged.k_cache, paged.v_cache)
    wide = describe_cache(paged.k_cache, paged.v_cache, max_chunks=6)
    assert wide.offsets is not None and wide.chunks_pad == 8 and plain.chunks_pad == (1 if num_chunks == 1 else 4)
    tables, ctx = paged.block_tables, paged.context_lens
    query = torch.randn(len(lens), 4, 16, generator=gen).half()
    outs = [torch.full_like(query, float("nan")) for _ in range(2)]
    for view, out in zip((plain, wide), outs):
        paged_decode_attention(query, view, None, tables, ctx, out=out, num_splits=2, backend="triton")
    assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = torch.randn(sum(new), 4, 16, generator=gen).half()
    outs = [torch.full_like(query, float("nan")) for _ in range(2)]
    for view, out in zip((plain, wide), outs):
        paged_prefill_attention(query, view, None, tables, cu, ctx, out=out, backend="triton")
    assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_cache_view_prefill_and_store_equal_chunk_lists(num_chunks) -> None:
    gen = torch.Generator().manual_seed(30 + num_chunks)
    lens, new = [21, 5, 40], [21, 2, 17]
    keys, values = _kv(lens, 2, 16, torch.float16, gen)
    paged = paged_from_dense(keys, values, 16, num_chunks=num_chunks, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = torch.randn(sum(new), 6, 16, generator=gen).half()
    lists, views = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    paged_prefill_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens,
                            out=lists, backend="triton")
    paged_prefill_attention(query, view, None, paged.block_tables, cu, paged.context_lens, out=views,
                            backend="triton")
    assert torch.equal(lists, views)
    make = lambda: [torch.full((1, 2, 4, 8, 2, 16), float("nan"), dtype=torch.float16)  # noqa: E731
                    for _ in range(num_chunks)]
    a, b = make(), make()
    view_b = describe_cache([c[0, 0] for c in b], [c[0, 1] for c in b])
    slots = torch.randperm(num_chunks * 32, generator=gen)[:9]
    slots[1] = -1
    key, value = torch.randn(9, 2, 16, generator=gen).half(), torch.randn(9, 2, 16, generator=gen).half()
    store_kv(key, value, [c[0, 0] for c in a], [c[0, 1] for c in a], slots, backend="triton")
    store_kv(key, value, view_b, None, slots, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))


def test_kernel_module_cache_returns_the_same_module() -> None:
    from kvforge.kernels import ops, triton_decode

    cpu = torch.device("cpu")
    first = ops._triton_module("triton_decode", cpu)
    assert first is triton_decode
    assert ops._triton_module("triton_decode", cpu) is first
    assert ops._TRITON_MODULES[("triton_decode", "cpu")] is first


def test_split_scratch_reuse_across_batch_sizes() -> None:
    from kvforge.kernels import triton_decode

    gen = torch.Generator().manual_seed(40)
    lens = [7, 33, 1, 25, 40]
    keys, values = _kv(lens, 2, 16, torch.float32, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=2, generator=gen)
    view = describe_cache(paged.k_cache, paged.v_cache)
    query = torch.randn(len(lens), 4, 16, generator=gen)
    triton_decode.release_scratch()

    def run(rows: slice) -> torch.Tensor:
        q, tables, ctx = query[rows], paged.block_tables[rows], paged.context_lens[rows]
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, view, None, tables, ctx, out=out, num_splits=3, backend="triton")
        want = reference.paged_decode_attention(q, paged.k_cache, paged.v_cache, tables, ctx)
        torch.testing.assert_close(out, want, **TOL[torch.float32])
        return out

    small = run(slice(0, 2))
    (buf,) = triton_decode._SCRATCH.values()
    run(slice(0, 5))  # a larger batch: the buffer grows
    (grown,) = triton_decode._SCRATCH.values()
    assert grown.numel() > buf.numel()
    grown.fill_(float("nan"))  # stale partials must never leak into a later call
    again = run(slice(0, 2))  # a smaller batch again: the grown buffer, reused
    (same,) = triton_decode._SCRATCH.values()
    assert same is grown
    assert torch.equal(small, again)
    triton_decode.release_scratch()


# --------------------------------------------------------------------------- every head size (padded tiles)

#: (head_dim, block_size, dtype, num_splits): head dims that are not powers of two run in a padded tile
#: (80, 96, 112 -> 128; 192 -> 256; 8 -> 16; 24 -> 32); pages down to one token, on padded and
#: power-of-two head dims; one split (the kernel writes out) and several (the last split merges)
HEAD_DIM_CASES = [
    (80, 16, torch.float16, None), (96, 4, torch.float32, 3), (112, 8, torch.float16, 1),
    (192, 2, torch.float32, 2), (8, 1, torch.float16, 2), (24, 2, torch.float32, 1),
    (64, 1, torch.float16, 3), (16, 4, torch.float32, 1),
]


@pytest.mark.parametrize("head_dim, block_size, dtype, num_splits", HEAD_DIM_CASES)
def test_decode_any_head_dim_matches_dense(head_dim, block_size, dtype, num_splits) -> None:
    check_decode(head_dim, block_size, dtype, "triton", num_splits)


@pytest.mark.parametrize("head_dim, block_size, dtype, num_splits", HEAD_DIM_CASES)
def test_prefill_any_head_dim_matches_dense(head_dim, block_size, dtype, num_splits) -> None:
    del num_splits  # decode only
    check_prefill(head_dim, block_size, dtype, "triton")


@pytest.mark.parametrize("head_dim, block_size", [(80, 1), (96, 2), (192, 4), (8, 8)])
def test_store_kv_any_head_dim_matches_reference(head_dim, block_size) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size)
    make = lambda: [torch.full((1, 2, 5, block_size, 2, head_dim), float("nan"), dtype=torch.float16)  # noqa: E731
                    for _ in range(2)]
    got, want = make(), make()
    slots = torch.randperm(10 * block_size, generator=gen)[:7]
    slots[3] = -1
    key = in_wide_rows(torch.randn(7, 2, head_dim, generator=gen).half())
    value = in_wide_rows(torch.randn(7, 2, head_dim, generator=gen).half())
    store_kv(key, value, [c[0, 0] for c in got], [c[0, 1] for c in got], slots, backend="triton")
    reference.store_kv(key, value, [c[0, 0] for c in want], [c[0, 1] for c in want], slots)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_copy_blocks_odd_head_dim_and_one_token_blocks() -> None:
    gen = torch.Generator().manual_seed(96)
    got = [torch.randn(2, 2, 6, 1, 2, 96, generator=gen).half() for _ in range(2)]
    want = [c.clone() for c in got]
    src, dst = torch.tensor([0, 7, 3]), torch.tensor([11, 2, 5])
    copy_blocks(got, src, dst, backend="triton")
    reference.copy_blocks(want, src, dst)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_remembered_launch_serves_fresh_inputs() -> None:
    """The wrapper keeps one launch per call signature (kvforge.kernels.ops._PLANS); the
    interpreter runs it again for each call, on that call's tensors."""
    from kvforge.kernels import ops

    gen = torch.Generator().manual_seed(11)
    k = torch.randn(6, 8, 2, 16, generator=gen).half()
    v = torch.randn(6, 8, 2, 16, generator=gen).half()
    view = describe_cache(k, v)
    for _ in range(2):
        q = torch.randn(2, 4, 16, generator=gen).half()
        tables = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(2)]).int()
        ctx = torch.tensor([5, 24], dtype=torch.int32)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, view, None, tables, ctx, out=out, num_splits=2, backend="triton")
        want = reference.paged_decode_attention(q, [k], [v], tables, ctx, scale=16**-0.5)
        torch.testing.assert_close(out, want, **TOL[torch.float16])
    assert sum(1 for key in ops._PLANS if key[1] == view.serial) == 1
