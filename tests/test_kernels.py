"""Kernel tests on the CPU: the torch reference against a dense float64
oracle, the argument checks, and (in a subprocess, under the Triton
interpreter) the Triton kernels against the reference.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvforge.errors import KernelError
from kvforge.kernels import (
    CacheView,
    chunk_offsets,
    copy_blocks,
    describe_cache,
    paged_decode_attention,
    paged_prefill_attention,
    reference,
    store_kv,
)
from kvforge.kernels.testing import dense_attention, paged_from_dense
from tests.interpreter import run_under_interpreter

F32 = torch.float32


def _kv(lens: list[int], heads: int, dim: int, gen: torch.Generator, dtype: torch.dtype = F32):
    keys = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    return keys, values


# --------------------------------------------------------------------------- reference vs dense


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"soft_cap": 3.0}, {"scale": 0.3, "sliding_window": 1}])
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_reference_decode_matches_dense(group: int, options: dict, num_chunks: int) -> None:
    gen = torch.Generator().manual_seed(group * 100 + num_chunks)
    lens = [1, 7, 8, 23, 0, 40]
    keys, values = _kv(lens, 2, 16, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=num_chunks, num_layers=2, layer=1, generator=gen)
    query = torch.randn(len(lens), 2 * group, 16, generator=gen)
    out = paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, **options)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        want = dense_attention(query[i : i + 1], keys[i], values[i], torch.tensor([n - 1]), **options)
        torch.testing.assert_close(out[i : i + 1].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 6}, {"soft_cap": 2.5}])
@pytest.mark.parametrize("num_chunks", [1, 2])
def test_reference_prefill_matches_dense(group: int, options: dict, num_chunks: int) -> None:
    gen = torch.Generator().manual_seed(7 + group + 10 * num_chunks)
    lens = [9, 16, 31, 4, 12]
    new = [9, 5, 13, 0, 1]  # first: no cached prefix; fourth: nothing new
    keys, values = _kv(lens, 2, 32, gen)
    paged = paged_from_dense(keys, values, 16, num_chunks=num_chunks, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = torch.randn(sum(new), 2 * group, 32, generator=gen)
    out = paged_prefill_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens,
                                  **options)
    for i, (n, q_len) in enumerate(zip(lens, new)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense_attention(query[rows], keys[i], values[i], torch.arange(n - q_len, n), **options)
        torch.testing.assert_close(out[rows].double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.integers(0, 70), min_size=1, max_size=5),
    block_size=st.sampled_from([8, 16, 32]),
    group=st.sampled_from([1, 2, 3, 4]),
    window=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_reference_decode_property(lens: list[int], block_size: int, group: int, window: int | None, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    keys, values = _kv(lens, 1, 16, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=1 + seed % 2, generator=gen, pad_value=seed % 3 - 1)
    query = torch.randn(len(lens), group, 16, generator=gen)
    out = paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens,
                                 sliding_window=window)
    for i, n in enumerate(lens):
        want = dense_attention(query[i : i + 1], keys[i], values[i], torch.tensor([n - 1]), sliding_window=window)
        torch.testing.assert_close(out[i : i + 1].double(), want, rtol=1e-5, atol=1e-5)


def test_reference_decode_half_precision_output_dtype() -> None:
    gen = torch.Generator().manual_seed(3)
    keys, values = _kv([20, 3], 2, 64, gen, torch.bfloat16)
    paged = paged_from_dense(keys, values, 8, generator=gen)
    query = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16)
    out = torch.full_like(query, float("nan"))
    got = paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, out=out)
    assert got is out and got.dtype == torch.bfloat16
    for i, n in enumerate([20, 3]):
        want = dense_attention(query[i : i + 1], keys[i], values[i], torch.tensor([n - 1]))
        torch.testing.assert_close(out[i : i + 1].double(), want, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- store / copy / offsets


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_writes_slots_and_skips_padding(num_chunks: int, slot_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    chunks = [torch.zeros(2, 2, 4, 8, 2, 16) for _ in range(num_chunks)]
    k_cache, v_cache = [c[1, 0] for c in chunks], [c[1, 1] for c in chunks]
    num_slots = 4 * num_chunks * 8
    slots = torch.randperm(num_slots, generator=gen)[:10].to(slot_dtype)
    slots[3] = -1
    key, value = torch.randn(10, 2, 16, generator=gen), torch.randn(10, 2, 16, generator=gen)
    store_kv(key, value, k_cache if num_chunks > 1 else k_cache[0], v_cache if num_chunks > 1 else v_cache[0], slots)
    flat_k = torch.cat([c[1, 0] for c in chunks]).reshape(num_slots, 2, 16)
    flat_v = torch.cat([c[1, 1] for c in chunks]).reshape(num_slots, 2, 16)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep].long()], key[keep])
    assert torch.equal(flat_v[slots[keep].long()], value[keep])
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[keep].long()] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()
    assert not any(c[0].any() for c in chunks)  # layer 0 untouched


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_copy_blocks_copies_all_layers(num_chunks: int) -> None:
    gen = torch.Generator().manual_seed(5)
    chunks = [torch.randn(3, 2, 5, 8, 2, 16, generator=gen) for _ in range(num_chunks)]
    before = torch.cat(chunks, dim=2).clone()
    # with two chunks of 5 blocks, pairs cross chunks both ways
    src, dst = ([0, 1, 1, 7], [4, 8, 2, 9]) if num_chunks > 1 else ([0, 1, 1], [4, 2, 3])
    copy_blocks(chunks if num_chunks > 1 else chunks[0], np.array(src), dst)
    after = torch.cat(chunks, dim=2)
    want = before.clone()
    for s, d in zip(src, dst):
        want[:, :, d] = before[:, :, s]
    assert torch.equal(after, want)


def test_copy_blocks_empty_is_noop() -> None:
    storage = torch.randn(1, 2, 3, 8, 1, 16)
    before = storage.clone()
    copy_blocks(storage, [], [])
    assert torch.equal(storage, before)


def test_chunk_offsets_between_allocations() -> None:
    chunks = [torch.zeros(2, 2, 3, 8, 1, 16) for _ in range(3)]
    offsets = chunk_offsets(chunks)
    assert offsets.dtype == torch.int64 and offsets[0] == 0
    for c, off in zip(chunks, offsets.tolist()):
        assert c.data_ptr() - chunks[0].data_ptr() == off * 4
    assert chunk_offsets(chunks[0]).tolist() == [0]


def test_given_chunk_offsets_are_used_and_checked() -> None:
    gen = torch.Generator().manual_seed(1)
    keys, values = _kv([12, 30], 1, 16, gen)
    paged = paged_from_dense(keys, values, 8, num_chunks=2, generator=gen)
    q = torch.randn(2, 1, 16, generator=gen)
    a = paged_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens,
                               chunk_offsets=paged.chunk_offsets)
    b = reference.paged_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    assert torch.equal(a, b)
    with pytest.raises(KernelError, match="chunk_offsets"):
        paged_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens,
                               chunk_offsets=paged.chunk_offsets + 1)


# --------------------------------------------------------------------------- errors


def _decode_args(**over):
    gen = torch.Generator().manual_seed(0)
    keys, values = _kv([10, 17], 2, 16, gen)
    paged = paged_from_dense(keys, values, 8, generator=gen)
    args = dict(query=torch.randn(2, 4, 16, generator=gen), k_cache=paged.k_cache[0], v_cache=paged.v_cache[0],
                block_tables=paged.block_tables, context_lens=paged.context_lens)
    args.update(over)
    return args


def _call_decode(**over):
    args = _decode_args(**over)
    return paged_decode_attention(args.pop("query"), args.pop("k_cache"), args.pop("v_cache"),
                                  args.pop("block_tables"), args.pop("context_lens"), **args)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"query": torch.randn(2, 4, 16).half()}, "query dtype"),
        ({"query": torch.randn(2, 3, 16)}, "multiple of num_kv_heads"),
        ({"query": torch.randn(2, 4, 32)}, "head_dim"),
        ({"query": torch.randn(2, 4)}, "3 dims"),
        ({"query": torch.randn(2, 16, 4).transpose(1, 2)}, "stride 1"),
        ({"k_cache": torch.zeros(7, 8, 2, 16).half(), "v_cache": torch.zeros(7, 8, 2, 16)}, "v_cache dtype"),
        ({"k_cache": torch.zeros(5, 8, 2, 16, dtype=torch.float64), "v_cache": torch.zeros(5, 8, 2, 16, dtype=torch.float64),
          "query": torch.randn(2, 4, 16, dtype=torch.float64)}, "cache dtype"),
        ({"k_cache": torch.zeros(5, 6, 2, 16), "v_cache": torch.zeros(5, 6, 2, 16)}, "block_size"),
        ({"k_cache": torch.zeros(5, 3, 2, 16), "v_cache": torch.zeros(5, 3, 2, 16)}, "power of two.*got 3"),
        ({"k_cache": torch.zeros(5, 8, 2, 20), "v_cache": torch.zeros(5, 8, 2, 20),
          "query": torch.randn(2, 4, 20)}, "head_dim: expected a multiple of 8 from 8 to 256, got 20"),
        ({"k_cache": torch.zeros(5, 8, 2, 16), "v_cache": torch.zeros(6, 8, 2, 16)}, "v_cache shape"),
        ({"k_cache": [torch.zeros(5, 8, 2, 16), torch.zeros(4, 8, 2, 16)]}, "differ from chunk 0"),
        ({"k_cache": []}, "at least one chunk"),
        ({"k_cache": "nope"}, "k_cache"),
        ({"block_tables": torch.zeros(2, 4, dtype=torch.int64)}, "block_tables dtype"),
        ({"block_tables": torch.zeros(3, 4, dtype=torch.int32)}, "block_tables shape"),
        ({"block_tables": torch.zeros(2, 2, dtype=torch.int32)}, "hold 16 tokens"),
        ({"block_tables": torch.full((2, 4), 99, dtype=torch.int32)}, "outside the pool"),
        ({"block_tables": torch.full((2, 4), -1, dtype=torch.int32)}, "outside the pool"),
        ({"context_lens": torch.tensor([1, 2])}, "context_lens dtype"),
        ({"context_lens": torch.tensor([1, 2, 3], dtype=torch.int32)}, "context_lens shape"),
        ({"context_lens": torch.tensor([1, -2], dtype=torch.int32)}, ">= 0"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": 2.5}, "sliding_window"),
        ({"soft_cap": -1.0}, "soft_cap"),
        ({"num_splits": 0}, "num_splits"),
        ({"out": torch.empty(2, 4, 16).half()}, "out"),
        ({"out": torch.empty(2, 4, 8)}, "out"),
        ({"backend": "cuda"}, "backend"),
        ({"chunk_offsets": torch.zeros(2, dtype=torch.int64)}, "chunk_offsets"),
        ({"chunk_offsets": torch.zeros(1, dtype=torch.int32)}, "chunk_offsets"),
    ],
)
def test_decode_errors(over: dict, match: str) -> None:
    with pytest.raises(KernelError, match=match):
        _call_decode(**over)


def test_decode_value_checks_can_be_skipped_and_forced() -> None:
    # validate=False skips value checks (the GPU default); the shape checks still run
    with pytest.raises(KernelError, match="hold 16 tokens"):
        _call_decode(block_tables=torch.zeros(2, 2, dtype=torch.int32), validate=True)
    with pytest.raises(KernelError, match="block_tables dtype"):
        _call_decode(block_tables=torch.zeros(2, 4, dtype=torch.int64), validate=False)


@pytest.mark.parametrize("given", [False, True])
def test_mismatched_kv_chunk_offsets_raise(given: bool) -> None:
    # keys and values from different chunk tensors: one offset table cannot serve both,
    # even when the caller passes a (key) table, so this is checked without reading it
    a = [torch.zeros(1, 2, 3, 8, 1, 16) for _ in range(2)]
    b = [torch.zeros(1, 2, 3, 8, 1, 16) for _ in range(2)]
    k_cache, v_cache = [c[0, 0] for c in a], [b[0][0, 1], a[1][0, 1]]
    offsets = chunk_offsets(k_cache) if given else None
    q = torch.randn(1, 1, 16)
    with pytest.raises(KernelError, match="offsets differ"):
        paged_decode_attention(q, k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32), chunk_offsets=offsets)


def _prefill(**over):
    gen = torch.Generator().manual_seed(0)
    keys, values = _kv([10, 17], 2, 16, gen)
    paged = paged_from_dense(keys, values, 8, generator=gen)
    args = dict(query=torch.randn(7, 4, 16, generator=gen), k_cache=paged.k_cache, v_cache=paged.v_cache,
                block_tables=paged.block_tables, cu_query_lens=torch.tensor([0, 3, 7], dtype=torch.int32),
                context_lens=paged.context_lens)
    args.update(over)
    return paged_prefill_attention(args.pop("query"), args.pop("k_cache"), args.pop("v_cache"),
                                   args.pop("block_tables"), args.pop("cu_query_lens"), args.pop("context_lens"), **args)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"cu_query_lens": torch.tensor([0, 3, 7])}, "cu_query_lens dtype"),
        ({"cu_query_lens": torch.tensor([0, 7], dtype=torch.int32)}, "cu_query_lens shape"),
        ({"cu_query_lens": torch.tensor([0, 3, 6], dtype=torch.int32)}, "run from 0 to 7"),
        ({"cu_query_lens": torch.tensor([1, 3, 7], dtype=torch.int32)}, "run from 0 to 7"),
        ({"cu_query_lens": torch.tensor([0, 8, 7], dtype=torch.int32)}, "non-decreasing"),
        ({"context_lens": torch.tensor([2, 17], dtype=torch.int32)}, "shorter than its 3 new tokens"),
        ({"context_lens": torch.tensor([10, 40], dtype=torch.int32)}, "hold 32 tokens"),
        ({"query": torch.randn(7, 4, 16).bfloat16()}, "query dtype"),
        ({"block_tables": torch.zeros(2, 3, dtype=torch.int16)}, "block_tables dtype"),
        ({"soft_cap": 0}, "soft_cap"),
    ],
)
def test_prefill_errors(over: dict, match: str) -> None:
    with pytest.raises(KernelError, match=match):
        _prefill(**over)


@pytest.mark.parametrize(
    "key, slots, match",
    [
        (torch.randn(3, 2, 16), torch.tensor([0, 1, 40]), "outside"),
        (torch.randn(3, 2, 16), torch.tensor([0, -2, 4]), "outside"),
        (torch.randn(3, 2, 16), torch.tensor([0.0, 1.0, 2.0]), "slot_mapping dtype"),
        (torch.randn(3, 2, 16), torch.tensor([0, 1]), "slot_mapping shape"),
        (torch.randn(3, 2, 16).half(), torch.tensor([0, 1, 2]), "key dtype"),
        (torch.randn(3, 1, 16), torch.tensor([0, 1, 2]), "key shape"),
        (torch.randn(3, 32), torch.tensor([0, 1, 2]), "3 dims"),
    ],
)
def test_store_kv_errors(key: torch.Tensor, slots: torch.Tensor, match: str) -> None:
    k_cache, v_cache = torch.zeros(5, 8, 2, 16), torch.zeros(5, 8, 2, 16)
    value = torch.randn(3, 2, 16)
    with pytest.raises(KernelError, match=match):
        store_kv(key, value, k_cache, v_cache, slots)
    assert not k_cache.any()  # nothing written


@pytest.mark.parametrize(
    "src, dst, match",
    [
        ([0, 1], [2, 10], "outside the pool"),
        ([-1], [2], "outside the pool"),
        ([0, 1], [2, 2], "distinct"),
        ([0, 1], [1, 3], "also a source"),
        ([0, 1], [2], "same length"),
        ([0.5], [2], "sequence of ints"),
        (torch.tensor([0.0]), torch.tensor([1.0]), "int32/int64"),
        ([[0]], [[1]], "1-D"),
    ],
)
def test_copy_blocks_errors(src: object, dst: object, match: str) -> None:
    storage = torch.randn(2, 2, 5, 8, 1, 16)
    before = storage.clone()
    with pytest.raises(KernelError, match=match):
        copy_blocks(storage, src, dst)
    assert torch.equal(storage, before)


def test_copy_blocks_storage_errors() -> None:
    with pytest.raises(KernelError, match="size 2"):
        copy_blocks(torch.zeros(2, 3, 5, 8, 1, 16), [0], [1])
    with pytest.raises(KernelError, match="6 dims"):
        copy_blocks(torch.zeros(2, 5, 8, 1, 16), [0], [1])
    with pytest.raises(KernelError, match="contiguous"):
        copy_blocks(torch.zeros(2, 2, 5, 16, 1, 8).transpose(3, 5), [0], [1])


def test_triton_backend_on_cpu_without_interpreter_raises() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    pytest.importorskip("triton")
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        _call_decode(backend="triton")


# --------------------------------------------------------------------------- Triton (interpreter)


def test_triton_kernels_under_interpreter() -> None:
    """Runs tests/test_kernels_triton.py in a fresh interpreter with
    TRITON_INTERPRET=1: the flag must be set before triton is first imported,
    which other test modules (or torch) may already have done here."""
    pytest.importorskip("triton")
    run_under_interpreter("test_kernels_triton.py")


# --------------------------------------------------------------------------- described layers (CacheView)


def _layer(num_chunks: int, seed: int, dtype: torch.dtype = F32):
    gen = torch.Generator().manual_seed(seed)
    lens = [5, 0, 23, 17]
    keys, values = _kv(lens, 2, 16, gen, dtype)
    paged = paged_from_dense(keys, values, 8, num_chunks=num_chunks, num_layers=2, layer=1, generator=gen)
    return paged, gen


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_describe_cache_carries_the_offset_table(num_chunks: int) -> None:
    paged, _ = _layer(num_chunks, 1)
    view = describe_cache(paged.k_cache, paged.v_cache)
    assert isinstance(view, CacheView) and view.num_chunks == num_chunks
    if num_chunks == 1:
        assert view.offsets is None
        assert describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets).offsets is None
    else:
        assert view.offsets.dtype == torch.int64 and view.offsets.tolist() == paged.chunk_offsets.tolist()
        given = describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets)
        assert given.offsets is paged.chunk_offsets  # a given table is kept, not copied
        with pytest.raises(KernelError, match="chunk_offsets: expected"):
            describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets + 16)


def test_describe_cache_max_chunks_keeps_a_table_for_the_ceiling() -> None:
    paged, gen = _layer(1, 2)
    view = describe_cache(paged.k_cache, paged.v_cache, max_chunks=5)
    assert view.offsets is not None and view.offsets.tolist() == [0] and view.chunks_pad == 8
    assert describe_cache(paged.k_cache, paged.v_cache, max_chunks=1).offsets is None
    numpy_count = describe_cache(paged.k_cache, paged.v_cache, max_chunks=np.int64(5))  # any integer
    assert numpy_count.max_chunks == 5 and type(numpy_count.max_chunks) is int
    three, _ = _layer(3, 3)
    for bad in (2, 0, True, 4.0):  # below the chunks given, not an int
        with pytest.raises(KernelError, match="max_chunks: expected an int >= the 3 chunk"):
            describe_cache(three.k_cache, three.v_cache, max_chunks=bad)
    query = torch.randn(4, 4, 16, generator=gen)
    want = reference.paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables,
                                            paged.context_lens)
    got = paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, backend="torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 6, "soft_cap": 2.0}])
def test_cache_view_decode_and_prefill_equal_chunk_lists(num_chunks: int, options: dict) -> None:
    paged, gen = _layer(num_chunks, 10 + num_chunks)
    view = describe_cache(paged.k_cache, paged.v_cache, chunk_offsets=paged.chunk_offsets)
    query = torch.randn(4, 4, 16, generator=gen)
    lists, views = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens,
                           out=lists, backend="torch", **options)
    paged_decode_attention(query, view, None, paged.block_tables, paged.context_lens, out=views,
                           backend="torch", **options)
    assert torch.equal(lists, views)  # NaN anywhere would fail this too
    new = [3, 0, 9, 17]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    pq = torch.randn(sum(new), 4, 16, generator=gen)
    lists, views = torch.full_like(pq, float("nan")), torch.full_like(pq, float("nan"))
    paged_prefill_attention(pq, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens,
                            out=lists, backend="torch", **options)
    paged_prefill_attention(pq, view, None, paged.block_tables, cu, paged.context_lens, out=views,
                            chunk_offsets=view.offsets, backend="torch", **options)  # its own table is accepted
    assert torch.equal(lists, views)


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_cache_view_store_kv_equals_chunk_lists(num_chunks: int) -> None:
    gen = torch.Generator().manual_seed(num_chunks)
    make = lambda: [torch.full((2, 2, 4, 8, 2, 16), float("nan")) for _ in range(num_chunks)]  # noqa: E731
    a, b = make(), make()
    view = describe_cache([c[1, 0] for c in b], [c[1, 1] for c in b])
    slots = torch.randperm(num_chunks * 32, generator=gen)[:11]
    slots[4] = -1
    key, value = torch.randn(11, 2, 16, generator=gen), torch.randn(11, 2, 16, generator=gen)
    store_kv(key, value, [c[1, 0] for c in a], [c[1, 1] for c in a], slots, backend="torch")
    store_kv(key, value, view, None, slots, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    assert int((~b[0][1].isnan()).sum()) > 0  # something was written


def test_cache_view_misuse_raises() -> None:
    paged, gen = _layer(3, 2)
    view = describe_cache(paged.k_cache, paged.v_cache)
    q = torch.randn(4, 2, 16, generator=gen)
    args = (paged.block_tables, paged.context_lens)
    with pytest.raises(KernelError, match="v_cache: expected None"):
        paged_decode_attention(q, view, paged.v_cache, *args)
    with pytest.raises(KernelError, match="in place of k_cache"):
        paged_decode_attention(q, paged.k_cache, view, *args)
    with pytest.raises(KernelError, match="own offset table"):
        paged_decode_attention(q, view, None, *args, chunk_offsets=paged.chunk_offsets)  # equal values, another table
    with pytest.raises(KernelError, match="describe_cache"):
        paged_decode_attention(q, view._replace(offsets=None), None, *args)
    with pytest.raises(KernelError, match="v_cache: expected None"):
        store_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), view, paged.v_cache, torch.tensor([0]))
    cu = torch.tensor([0, 1, 1, 2, 3], dtype=torch.int32)
    with pytest.raises(KernelError, match="own offset table"):
        paged_prefill_attention(torch.randn(3, 2, 16), view, None, *args[:1], cu, args[1],
                                chunk_offsets=paged.chunk_offsets)
    # a one-chunk view takes no table, or a correct [1] table
    one, _ = _layer(1, 3)
    view1 = describe_cache(one.k_cache, one.v_cache)
    paged_decode_attention(q, view1, None, one.block_tables, one.context_lens, chunk_offsets=one.chunk_offsets)
    with pytest.raises(KernelError, match="chunk_offsets"):
        paged_decode_attention(q, view1, None, one.block_tables, one.context_lens,
                               chunk_offsets=torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize(
    "over, match",
    [
        ({"query": torch.randn(4, 2, 16).half()}, "query dtype"),
        ({"query": torch.randn(4, 3, 16)}, "multiple of num_kv_heads"),
        ({"block_tables": torch.zeros(4, 4, dtype=torch.int64)}, "block_tables dtype"),
        ({"context_lens": torch.tensor([1, 2, 3, 4])}, "context_lens dtype"),
        ({"block_tables": torch.full((4, 4), 99, dtype=torch.int32)}, "outside the pool"),
    ],
)
def test_cache_view_still_checks_per_call_tensors(over: dict, match: str) -> None:
    paged, gen = _layer(2, 4)
    view = describe_cache(paged.k_cache, paged.v_cache)
    args = dict(query=torch.randn(4, 2, 16, generator=gen), block_tables=paged.block_tables,
                context_lens=paged.context_lens)
    args.update(over)
    with pytest.raises(KernelError, match=match):
        paged_decode_attention(args["query"], view, None, args["block_tables"], args["context_lens"])


def test_kernel_module_is_bound_once() -> None:
    pytest.importorskip("triton")
    from kvforge.kernels import ops

    cuda = torch.device("cuda", 0)  # device type "cuda": bound without the interpreter check, launches nothing
    first = ops._triton_module("triton_decode", cuda)
    assert ops._triton_module("triton_decode", cuda) is first
    assert ops._TRITON_MODULES[("triton_decode", "cuda")] is first
    if os.environ.get("TRITON_INTERPRET") != "1":  # a refused bind is not remembered: it raises again
        for _ in range(2):
            with pytest.raises(KernelError, match="TRITON_INTERPRET"):
                ops._triton_module("triton_prefill", torch.device("cpu"))
        assert ("triton_prefill", "cpu") not in ops._TRITON_MODULES


def test_choose_num_splits_is_memoized() -> None:
    pytest.importorskip("triton")
    from kvforge.kernels.triton_decode import choose_num_splits

    args = (3, 8, 4096 + 16 * 7, 132, 64)
    first = choose_num_splits(*args)
    hits = choose_num_splits.cache_info().hits
    assert choose_num_splits(*args) == first and choose_num_splits.cache_info().hits == hits + 1
    assert 1 <= first <= 64


def test_split_scratch_grows_and_is_reused() -> None:
    pytest.importorskip("triton")
    from kvforge.kernels import triton_decode

    cpu = torch.device("cpu")
    triton_decode.release_scratch()
    out, lse = triton_decode.split_scratch(2, 4, 3, 16, cpu)
    assert out.shape == (2, 4, 3, 16) and lse.shape == (2, 4, 3) and out.is_contiguous() and lse.is_contiguous()
    assert out.dtype == lse.dtype == torch.float32
    assert lse.data_ptr() == out.data_ptr() + out.numel() * 4  # one buffer, no overlap
    base = out.data_ptr()
    out2, _ = triton_decode.split_scratch(1, 4, 2, 16, cpu)  # smaller: the same buffer
    assert out2.data_ptr() == base
    big, big_lse = triton_decode.split_scratch(9, 4, 5, 16, cpu)  # larger: grown
    assert big.shape == (9, 4, 5, 16) and big_lse.shape == (9, 4, 5)
    again, _ = triton_decode.split_scratch(2, 4, 3, 16, cpu)
    assert again.data_ptr() == big.data_ptr()
    triton_decode.release_scratch()
    assert not triton_decode._SCRATCH


def test_fp8_decode_read_mode_and_launch_config(monkeypatch) -> None:
    """Which fp8 read the decode kernel takes (paired values, mode 4, only for a native e4m3
    read of a 16-bit model on CUDA with a tile of 32+ columns; ``FORCE_DECODE="cast"`` keeps
    mode 1) and the launch config each mode gets (capped registers on CUDA only)."""
    pytest.importorskip("triton")
    from kvforge.kernels import triton_decode, triton_fp8

    e4m3, e5m2, cuda = torch.float8_e4m3fn, torch.float8_e5m2, torch.device("cuda", 0)
    bf16, f16 = torch.bfloat16, torch.float16
    assert triton_fp8.decode_mode(e4m3, torch.device("cpu")) == 1  # the interpreter reads natively
    if torch.version.hip is None:
        assert triton_fp8.paired_values(1, e4m3, cuda, 128, bf16) == 4
        assert triton_fp8.paired_values(1, e4m3, cuda, 32, f16) == 4
        odd = torch.zeros(4, 16, 2, 41, dtype=torch.uint8).view(e4m3)  # strides 41 bytes apart: no int16 view
        assert triton_fp8.paired_values(1, e4m3, cuda, 64, bf16, odd[..., :40]) == 1
        assert triton_fp8.paired_values(1, e4m3, cuda, 32, bf16, odd[..., 1:33]) == 1
        assert triton_fp8.paired_values(1, e4m3, cuda, 64, bf16, odd[..., :40].contiguous()) == 4
        monkeypatch.setattr(triton_fp8, "FORCE_DECODE", "cast")
        assert triton_fp8.paired_values(1, e4m3, cuda, 128, bf16) == 1
        monkeypatch.setattr(triton_fp8, "FORCE_DECODE", None)
    for args in ((1, e4m3, torch.device("cpu"), 128, bf16), (1, e4m3, cuda, 16, bf16),
                 (1, e4m3, cuda, 128, torch.float32), (1, e5m2, cuda, 128, bf16), (2, e4m3, cuda, 128, bf16),
                 (3, e5m2, cuda, 128, bf16)):
        assert triton_fp8.paired_values(*args) == args[0], args
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert triton_fp8.paired_values(1, e4m3, cuda, 128, bf16) == 1
    for block_d in (32, 64, 128, 256):
        block_n, warps, stages, maxnreg = triton_decode._config_for(True, True, block_d, False, 4)
        assert maxnreg == 128 and warps == 4
        bf16_n = triton_decode._config_for(True, True, block_d, False, 0)[0]
        # never fewer tokens than the bf16 tile; at 128 and 256 columns as many bytes (twice the tokens)
        assert block_n == 2 * bf16_n if block_d >= 128 else block_n >= bf16_n
        for fp8 in (0, 1, 2, 3):  # ROCm (on_cuda False): never a register cap
            assert triton_decode._config_for(False, True, block_d, False, fp8)[3] is None
    assert triton_decode._config_for(True, True, 128, True, 1)[3] is None  # fp32 tiles are never capped
    assert triton_decode._config_for(False, False, 128, False, 4) == (16, 4, 1, None)  # the interpreter
