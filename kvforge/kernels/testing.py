"""Builders for tests and benchmarks: paged caches from dense K/V, and a
dense float64 attention oracle.

Nothing here runs on the hot path; it exists so that every test (CPU,
interpreter, GPU) and the benchmark build paged inputs the same way,
independently of :func:`~kvforge.kernels.store_kv`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from kvforge.kernels.layout import chunk_offsets

__all__ = ["PagedKV", "paged_from_dense", "dense_attention", "in_wide_rows", "wide_rows_untouched",
           "fp8_values", "fp8_probe_values", "fp8_rne_bytes"]


class PagedKV(NamedTuple):
    """A paged copy of per-sequence keys/values, for one layer of a chunked store."""

    chunks: tuple[Tensor, ...]  # [num_layers, 2, chunk_blocks, block_size, H, D] each (views with row_pad)
    k_cache: list[Tensor]  # chunk[layer, 0] views [chunk_blocks, block_size, H, D]
    v_cache: list[Tensor]
    block_tables: Tensor  # int32 [batch, max_blocks]; entries past a context hold pad_value
    context_lens: Tensor  # int32 [batch]
    chunk_offsets: Tensor  # int64 [num_chunks]
    num_blocks: int


def paged_from_dense(
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    block_size: int,
    *,
    num_chunks: int = 1,
    num_layers: int = 1,
    layer: int = 0,
    spare_blocks: int = 2,
    table_pad: int = 1,
    pad_value: int = -1,
    poison: bool = True,
    row_pad: int = 0,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """Scatters ``keys[i]``/``values[i]`` ``[ctx_i, num_kv_heads, head_dim]``
    into randomly chosen (shuffled) blocks of a fresh chunked store.

    The store has ``num_chunks`` separate allocations; every slot not holding
    a token is NaN when ``poison`` (so a kernel that reads one shows it).
    Each block table row gets ``table_pad`` extra ``pad_value`` entries.
    ``row_pad`` > 0 stores every head's row in ``head_dim + row_pad`` elements
    (poisoned past ``head_dim`` like every unused slot) and hands out views of
    the first ``head_dim``: a kernel that reads past a head's row shows it.
    """
    ref = keys[0]
    _, num_kv_heads, head_dim = ref.shape
    lens = [int(k.shape[0]) for k in keys]
    needed = [math.ceil(n / block_size) for n in lens]
    chunk_blocks = max(1, math.ceil((sum(needed) + spare_blocks) / num_chunks))
    num_blocks = chunk_blocks * num_chunks
    shape = (num_layers, 2, chunk_blocks, block_size, num_kv_heads, head_dim + row_pad)
    fill = float("nan") if poison else 0.0
    if ref.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # 0x7F is NaN in both formats
        chunks = tuple(torch.full(shape, 0x7F if poison else 0, dtype=torch.uint8, device=ref.device)
                       .view(ref.dtype)[..., :head_dim] for _ in range(num_chunks))
    else:
        chunks = tuple(torch.full(shape, fill, dtype=ref.dtype, device=ref.device)[..., :head_dim]
                       for _ in range(num_chunks))
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(needed, default=0) + table_pad
    tables = torch.full((len(keys), width), pad_value, dtype=torch.int32)
    token_blocks, token_offsets = [], []
    cursor = 0
    for i, n in enumerate(lens):
        ids = perm[cursor : cursor + needed[i]]
        cursor += needed[i]
        tables[i, : needed[i]] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(n)
        token_blocks.append(torch.tensor(ids, dtype=torch.long)[pos // block_size] if n else pos)
        token_offsets.append(pos % block_size)
    block = torch.cat(token_blocks).to(ref.device)
    offset = torch.cat(token_offsets).to(ref.device)
    fp8 = ref.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)  # moved as bytes: every device handles uint8
    raw = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)
    all_k, all_v = torch.cat([raw(k) for k in keys]), torch.cat([raw(v) for v in values])
    for j, chunk in enumerate(chunks):
        sel = block // chunk_blocks == j
        raw(chunk[layer, 0])[block[sel] % chunk_blocks, offset[sel]] = all_k[sel]
        raw(chunk[layer, 1])[block[sel] % chunk_blocks, offset[sel]] = all_v[sel]
    return PagedKV(
        chunks=chunks,
        k_cache=[c[layer, 0] for c in chunks],
        v_cache=[c[layer, 1] for c in chunks],
        block_tables=tables.to(ref.device),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=ref.device),
        chunk_offsets=chunk_offsets(chunks),
        num_blocks=num_blocks,
    )


def in_wide_rows(t: Tensor, row_pad: int = 8) -> Tensor:
    """A copy of ``t`` ``[..., D]`` whose last dim is the front of NaN-filled
    rows of ``D + row_pad`` elements (unit stride on it, ``stride(-2) = D +
    row_pad``). As an input, a kernel that reads past ``D`` gets NaN; as an
    ``out``, :func:`wide_rows_untouched` shows whether it wrote past ``D``."""
    wide = torch.full(tuple(t.shape[:-1]) + (t.shape[-1] + row_pad,), float("nan"), dtype=t.dtype, device=t.device)
    view = wide[..., : t.shape[-1]]
    view.copy_(t)
    return view


def wide_rows_untouched(t: Tensor) -> bool:
    """True when the padding columns of a tensor from :func:`in_wide_rows`
    (everything past its last dim, up to its row stride) are still all NaN."""
    d, row = t.shape[-1], t.stride(-2)
    wide = t.as_strided(tuple(t.shape[:-1]) + (row,), t.stride()[:-1] + (1,))
    return bool(wide[..., d:].isnan().all())


def dense_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """Plain softmax attention in float64, the oracle of every kernel test.

    ``query`` ``[T, num_q_heads, head_dim]`` at ``positions`` ``[T]``;
    ``keys``/``values`` ``[N, num_kv_heads, head_dim]`` at positions 0..N-1.
    Query t sees keys ``n <= positions[t]`` (and ``n > positions[t] - w``).
    Returns float64 ``[T, num_q_heads, head_dim]``; rows that see nothing are 0.
    """
    q, k, v = query.double(), keys.double(), values.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("thd,nhd->htn", q, k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    n = torch.arange(k.shape[0], device=q.device)[None, :]
    pos = positions.to(q.device).long()[:, None]
    visible = n <= pos
    if sliding_window is not None:
        visible &= n > pos - sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("htn,nhd->thd", probs, v)


def fp8_values(dtype: torch.dtype) -> Tensor:
    """Every finite non-negative value of an fp8 format in byte order (float64): byte ``i``
    holds ``fp8_values(dtype)[i]`` up to the largest finite one (0x7E for e4m3, 0x7B for
    e5m2), so the values are increasing."""
    last = 0x7E if dtype == torch.float8_e4m3fn else 0x7B
    return torch.arange(last + 1, dtype=torch.uint8).view(dtype).double()


def fp8_probe_values(dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """float32 inputs that exercise every rounding case of a quantizer, both signs: every
    finite value, every midpoint between neighbours (ties), a float32 ulp to each side of
    them, values beyond the largest finite one (inf included), -0.0, and log-uniform random
    values from far below the subnormals to far above the range."""
    vals = fp8_values(dtype)
    mids = (vals[1:] + vals[:-1]) / 2
    top = float(vals[-1])
    beyond = torch.tensor([top * 1.01, top * 1.0625, top * 1.2, top * 2, 1e30, float("inf")], dtype=torch.float64)
    rand = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(-25.0, 13.0, generator=generator))
    pos = torch.cat([vals, mids, beyond, rand]).float()
    near = torch.cat([torch.nextafter(mids.float(), torch.tensor(0.0)),
                      torch.nextafter(mids.float(), torch.tensor(float("inf")))])
    pos = torch.cat([pos, near])
    return torch.cat([pos, -pos, torch.tensor([-0.0])])


def fp8_rne_bytes(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The oracle of fp8 quantization: the bytes of ``x`` (float, already divided by its
    scale) rounded to the nearest finite fp8 value, ties to the even byte, saturated at the
    largest finite value; NaN -> 0x7F. Computed in float64 by search over
    :func:`fp8_values`, independently of any cast."""
    vals = fp8_values(dtype)
    a = x.double().abs().reshape(-1)
    nan = torch.isnan(a)
    a = torch.where(nan, 0.0, a).clamp(max=float(vals[-1]))
    hi = torch.searchsorted(vals, a).clamp(max=len(vals) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - vals[lo], vals[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    byte = torch.where(pick_hi, hi, lo)
    byte = torch.where(a == vals[hi], hi, byte)
    sign = torch.signbit(x.reshape(-1)).long() << 7
    out = torch.where(nan, torch.tensor(0x7F), byte | sign)
    return out.to(torch.uint8).reshape(x.shape)
