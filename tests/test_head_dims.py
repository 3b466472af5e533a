"""Every head size (issue 13, item 3) on the torch backend: head dims that
are multiples of 8 from 8 to 256, block sizes that are any power of two from
1, checked against the dense float64 oracle on fresh random inputs with the
outputs poisoned, and the shapes outside that set refused up front with a
message that names the value and the allowed set. The same cases run on the
Triton kernels under the interpreter in ``tests/test_kernels_triton.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvforge import CacheConfig, KVCache
from kvforge.errors import ConfigError, KernelError
from kvforge.kernels import describe_cache, paged_decode_attention, paged_prefill_attention, reference, store_kv
from kvforge.kernels.layout import SUPPORTED_HEAD_DIMS, padded_head_dim
from kvforge.kernels.testing import dense_attention, in_wide_rows, paged_from_dense, wide_rows_untouched

TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=1e-5, atol=1e-5)}

#: (head_dim, block_size, dtype): the odd head dims of real models (Phi-3-mini's 96, 80, 112, 192), the
#: smallest ones, and tiny pages on both power-of-two and padded head dims
CASES = [
    (80, 16, torch.float32), (96, 4, torch.float16), (112, 8, torch.float32), (192, 2, torch.float32),
    (8, 1, torch.float32), (24, 2, torch.float16), (64, 1, torch.float16), (16, 4, torch.float32),
]


def _kv(lens, heads, dim, dtype, gen):
    keys = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, heads, dim, generator=gen).to(dtype) for n in lens]
    return keys, values


def test_supported_head_dims_are_the_multiples_of_8_up_to_256() -> None:
    assert SUPPORTED_HEAD_DIMS == tuple(range(8, 257, 8))
    assert {64, 80, 96, 112, 128, 192, 256} <= set(SUPPORTED_HEAD_DIMS)
    assert [padded_head_dim(d) for d in (8, 16, 24, 64, 80, 96, 112, 128, 136, 192, 256)] == \
        [16, 16, 32, 64, 128, 128, 128, 128, 256, 256, 256]


def check_decode(head_dim: int, block_size: int, dtype: torch.dtype, backend: str,
                 num_splits: int | None = None) -> None:
    """Paged decode on ``backend`` against the dense float64 oracle. Every row lives inside a
    wider NaN-filled one (cache, query, out): a load past head_dim poisons the result, a store
    past it shows in the padding. Shared with the Triton cases in test_kernels_triton.py."""
    gen = torch.Generator().manual_seed(head_dim * 10 + block_size)
    lens = [19, 1, 0, 22]
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, num_chunks=2, row_pad=8, generator=gen)
    query = in_wide_rows(torch.randn(len(lens), 4, head_dim, generator=gen).to(dtype))
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, out=out,
                           num_splits=num_splits, backend=backend)
    assert wide_rows_untouched(out)
    for i, n in enumerate(lens):
        want = dense_attention(query[i : i + 1], keys[i], values[i], torch.tensor([n - 1]))
        torch.testing.assert_close(out[i : i + 1].double(), want, **TOL[dtype])


def check_prefill(head_dim: int, block_size: int, dtype: torch.dtype, backend: str) -> None:
    """Paged prefill on ``backend`` against the dense float64 oracle (no prefix; a cached
    prefix; nothing new), in wide NaN-filled rows as :func:`check_decode`."""
    gen = torch.Generator().manual_seed(head_dim * 10 + block_size + 1)
    lens, new = [20, 9, 4], [20, 3, 0]
    keys, values = _kv(lens, 2, head_dim, dtype, gen)
    paged = paged_from_dense(keys, values, block_size, row_pad=8, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    query = in_wide_rows(torch.randn(sum(new), 6, head_dim, generator=gen).to(dtype))
    out = in_wide_rows(torch.full_like(query, float("nan")))
    paged_prefill_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens, out=out,
                            backend=backend)
    assert wide_rows_untouched(out)
    for i, (n, q_len) in enumerate(zip(lens, new)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense_attention(query[rows], keys[i], values[i], torch.arange(n - q_len, n))
        torch.testing.assert_close(out[rows].double(), want, **TOL[dtype])


@pytest.mark.parametrize("head_dim, block_size, dtype", CASES)
def test_decode_any_head_dim_matches_dense(head_dim: int, block_size: int, dtype: torch.dtype) -> None:
    check_decode(head_dim, block_size, dtype, "torch")


@pytest.mark.parametrize("head_dim, block_size, dtype", CASES)
def test_prefill_any_head_dim_matches_dense(head_dim: int, block_size: int, dtype: torch.dtype) -> None:
    check_prefill(head_dim, block_size, dtype, "torch")


@pytest.mark.parametrize("head_dim, block_size", [(80, 1), (96, 2), (192, 4), (8, 8)])
def test_store_kv_any_head_dim_writes_exactly_its_slots(head_dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size)
    chunks = [torch.full((1, 2, 5, block_size, 2, head_dim), float("nan")) for _ in range(2)]
    slots = torch.randperm(10 * block_size, generator=gen)[:7]
    slots[3] = -1
    key, value = torch.randn(7, 2, head_dim, generator=gen), torch.randn(7, 2, head_dim, generator=gen)
    store_kv(key, value, [c[0, 0] for c in chunks], [c[0, 1] for c in chunks], slots, backend="torch")
    flat_k = torch.cat([c[0, 0] for c in chunks]).reshape(-1, 2, head_dim)
    flat_v = torch.cat([c[0, 1] for c in chunks]).reshape(-1, 2, head_dim)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], key[keep]) and torch.equal(flat_v[slots[keep]], value[keep])
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    written[slots[keep]] = True
    assert bool(flat_k[~written].isnan().all()) and bool(flat_v[~written].isnan().all())


@pytest.mark.parametrize("head_dim, block_size", [(96, 1), (80, 2), (112, 4)])
def test_cache_of_any_head_dim_and_block_size_runs(head_dim: int, block_size: int) -> None:
    cfg = CacheConfig(block_size=block_size, num_blocks=64, num_layers=1, num_kv_heads=2, head_dim=head_dim,
                      dtype=torch.float32, device="cpu")
    cache = KVCache(cfg)
    gen = torch.Generator().manual_seed(head_dim)
    cache.add_sequence("a")
    slots = cache.append_tokens("a", 13)
    k, v = torch.randn(13, 2, head_dim, generator=gen), torch.randn(13, 2, head_dim, generator=gen)
    cache.write(0, slots, k, v)
    q = torch.randn(1, 4, head_dim, generator=gen)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, cache.layer_view(0), None, cache.block_tables(["a"]), cache.context_lens(["a"]),
                           out=out)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, torch.tensor([12])), rtol=1e-5, atol=1e-5)
    assert len(cache.block_table("a")) == -(-13 // block_size)
    cache.check_invariants()


# --------------------------------------------------------------------------- refused shapes


@pytest.mark.parametrize("head_dim", [100, 0, 264, 4, 12, 512])
def test_unsupported_head_dim_is_refused(head_dim: int) -> None:
    k = torch.zeros(4, 8, 2, head_dim)
    with pytest.raises(KernelError, match=f"head_dim: expected a multiple of 8 from 8 to 256, got {head_dim}$"):
        describe_cache(k, k.clone())
    q = torch.zeros(1, 2, head_dim)
    with pytest.raises(KernelError, match=f"got {head_dim}$"):
        paged_decode_attention(q, k, k.clone(), torch.zeros(1, 1, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32))


@pytest.mark.parametrize("block_size", [3, 0, 6, 12, 24])
def test_unsupported_block_size_is_refused(block_size: int) -> None:
    k = torch.zeros(4, block_size, 2, 16)
    with pytest.raises(KernelError, match=rf"block_size: expected a power of two \(1, 2, 4, 8, ...\), got {block_size}$"):
        describe_cache(k, k.clone())


@pytest.mark.parametrize("change, match", [
    (dict(head_dim=100), "head_dim: expected a multiple of 8 from 8 to 256, got 100"),
    (dict(head_dim=264), "head_dim: expected a multiple of 8 from 8 to 256, got 264"),
    (dict(block_size=3), r"block_size: expected a power of two \(1, 2, 4, 8, ...\), got 3"),
])
def test_cache_refuses_unsupported_layouts_at_construction(change: dict, match: str) -> None:
    args = dict(block_size=8, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=16, device="cpu")
    args.update(change)
    with pytest.raises(ConfigError, match=match):
        KVCache(CacheConfig(**args))


def test_zero_sizes_are_refused_by_the_config() -> None:
    for change in (dict(head_dim=0), dict(block_size=0)):
        with pytest.raises(ConfigError, match=next(iter(change))):
            CacheConfig(**{**dict(block_size=8, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=16), **change})


def test_reference_store_then_decode_with_block_size_one() -> None:
    """A page per token: every token in its own block, the table as long as the context."""
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.full((12, 1, 1, 40), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    ids = torch.randperm(12, generator=gen)[:9]
    k, v = torch.randn(9, 1, 40, generator=gen), torch.randn(9, 1, 40, generator=gen)
    store_kv(k, v, k_cache, v_cache, ids)  # slot = block id with one slot a block
    q = torch.randn(1, 2, 40, generator=gen)
    out = reference.paged_decode_attention(q, k_cache, v_cache, ids[None].int(), torch.tensor([9]))
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, torch.tensor([8])), rtol=1e-5, atol=1e-5)
