"""Pure-torch references of the four kernels.

Clear rather than fast, but vectorized enough to serve tiny models on the
CPU; they are also the oracles the Triton kernels are tested against. Every
function computes in float32 and takes its inputs as the public wrappers in
:mod:`kvforge.kernels.ops` have validated them (shapes, dtypes, ids in
range). Caches are one tensor ``[num_blocks, block_size, num_kv_heads,
head_dim]`` or a sequence of chunk views of that shape; block id ``b`` lives
in chunk ``b // chunk_blocks`` at local index ``b % chunk_blocks``.

fp8 chunks come with ``k_scale`` / ``v_scale`` (float32 ``[num_kv_heads]``):
:func:`store_kv` quantizes into them (:func:`kvforge.kernels.fp8.quantize`),
the attention functions read ``stored * scale`` in float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from kvforge.kernels.fp8 import is_fp8, quantize
from kvforge.kernels.layout import KVCacheArg

__all__ = ["store_kv", "paged_decode_attention", "paged_prefill_attention", "copy_blocks", "gather_blocks"]


def _chunks(cache: KVCacheArg) -> tuple[Tensor, ...]:
    return (cache,) if isinstance(cache, Tensor) else tuple(cache)


def _bytes(t: Tensor) -> Tensor:
    """fp8 as uint8 (indexing moves bytes: every device indexes uint8, not every one fp8)."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def gather_blocks(chunks: Sequence[Tensor], block_ids: Tensor) -> Tensor:
    """Gathers whole blocks: ``block_ids`` int ``[...]`` of valid ids.

    ``chunks``: tensors ``[chunk_blocks, *rest]``. Returns ``[..., *rest]``
    (a copy, in the chunks' dtype).
    """
    if is_fp8(chunks[0].dtype):
        return _gather_blocks([c.view(torch.uint8) for c in chunks], block_ids).view(chunks[0].dtype)
    return _gather_blocks(chunks, block_ids)


def _gather_blocks(chunks: Sequence[Tensor], block_ids: Tensor) -> Tensor:
    ids = block_ids.long()
    if len(chunks) == 1:
        return chunks[0][ids]
    chunk_blocks = chunks[0].shape[0]
    rest = tuple(chunks[0].shape[1:])
    flat = ids.reshape(-1).tolist()
    if len(flat) <= 512:  # a few blocks: index them one by one (cheaper than a mask per chunk)
        parts = [chunks[b // chunk_blocks][b % chunk_blocks] for b in flat]
        out = torch.stack(parts) if parts else chunks[0].new_empty((0,) + rest)
        return out.reshape(tuple(ids.shape) + rest)
    out = chunks[0].new_empty(tuple(ids.shape) + rest)
    which, local = ids // chunk_blocks, ids % chunk_blocks
    for j in sorted({b // chunk_blocks for b in flat}):
        sel = which == j
        out[sel] = chunks[j][local[sel]]
    return out


def _soft_cap(scores: Tensor, soft_cap: float | None) -> Tensor:
    return scores if soft_cap is None else soft_cap * torch.tanh(scores / soft_cap)


def _read(chunks: Sequence[Tensor], ids: Tensor, scale: Tensor | None) -> Tensor:
    """Blocks ``ids`` ``[...]`` as float32 ``[..., block_size, num_kv_heads, head_dim]``,
    dequantized with ``scale`` ``[num_kv_heads]`` when given (fp8)."""
    x = gather_blocks(chunks, ids).float()
    return x if scale is None else x * scale.to(x.device)[:, None]


def store_kv(key: Tensor, value: Tensor, k_cache: KVCacheArg, v_cache: KVCacheArg, slot_mapping: Tensor, *,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Writes ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` to
    slots ``slot_mapping`` ``[num_tokens]`` (``block_id * block_size +
    offset``; -1 = padding, skipped). An fp8 cache stores them quantized with
    ``k_scale`` / ``v_scale``."""
    kc, vc = _chunks(k_cache), _chunks(v_cache)
    chunk_blocks, block_size = kc[0].shape[0], kc[0].shape[1]
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    keep = slots >= 0
    slots, key, value = slots[keep], key[keep], value[keep]
    if is_fp8(kc[0].dtype):
        assert k_scale is not None and v_scale is not None
        key = quantize(key, k_scale, kc[0].dtype).view(torch.uint8)
        value = quantize(value, v_scale, kc[0].dtype).view(torch.uint8)
        kc, vc = tuple(_bytes(c) for c in kc), tuple(_bytes(c) for c in vc)
    block, offset = slots // block_size, slots % block_size
    which, local = block // chunk_blocks, block % chunk_blocks
    for j in range(len(kc)):
        sel = which == j
        kc[j][local[sel], offset[sel]] = key[sel]
        vc[j][local[sel], offset[sel]] = value[sel]


def paged_decode_attention(
    query: Tensor,
    k_cache: KVCacheArg,
    v_cache: KVCacheArg,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """One query token per sequence at position ``context_lens[i] - 1``.

    ``query`` ``[batch, num_q_heads, head_dim]``; ``block_tables`` int
    ``[batch, max_blocks]``; ``context_lens`` int ``[batch]``. Returns
    ``[batch, num_q_heads, head_dim]`` in the query dtype; rows with context
    length 0 are zeros.
    """
    kc, vc = _chunks(k_cache), _chunks(v_cache)
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = kc[0].shape[1], kc[0].shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    ctx = context_lens.to(device=query.device, dtype=torch.long)
    max_ctx = int(ctx.max()) if batch else 0
    if max_ctx == 0:
        return torch.zeros_like(query)
    num_blocks = math.ceil(max_ctx / block_size)
    used = torch.arange(num_blocks, device=query.device)[None, :] < (ctx[:, None] + block_size - 1) // block_size
    # -1 (padding, or a block a sliding window released) is never visible: read block 0 in its place
    ids = torch.where(used, block_tables[:, :num_blocks].to(query.device).long(), 0).clamp_min(0)
    k = _read(kc, ids, k_scale).reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    v = _read(vc, ids, v_scale).reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    pos = torch.arange(num_blocks * block_size, device=query.device)[None, :]
    visible = pos < ctx[:, None]
    if sliding_window is not None:
        visible &= pos > (ctx[:, None] - 1 - sliding_window)
    v = v.masked_fill(~visible[:, :, None, None], 0.0)  # unwritten slots may hold NaN
    q = query.float().reshape(batch, num_kv_heads, group, head_dim)
    scores = _soft_cap(torch.einsum("bhgd,bnhd->bhgn", q, k) * scale, soft_cap)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of context 0 are all -inf
    out = torch.einsum("bhgn,bnhd->bhgd", probs, v)
    return out.reshape(batch, num_q_heads, head_dim).to(query.dtype)


def paged_prefill_attention(
    query: Tensor,
    k_cache: KVCacheArg,
    v_cache: KVCacheArg,
    block_tables: Tensor,
    cu_query_lens: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Ragged causal attention of new tokens against their paged context.

    ``query`` ``[total_new_tokens, num_q_heads, head_dim]``; sequence i's new
    tokens are rows ``cu_query_lens[i]:cu_query_lens[i+1]``; ``context_lens[i]``
    counts them too, and new token j sits at position ``context_lens[i] -
    q_len_i + j``. Returns ``[total_new_tokens, num_q_heads, head_dim]``.
    """
    kc, vc = _chunks(k_cache), _chunks(v_cache)
    total, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = kc[0].shape[1], kc[0].shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(total, num_q_heads, head_dim, dtype=torch.float32, device=query.device)
    cu = cu_query_lens.tolist()
    ctx_list = context_lens.tolist()
    for i, ctx in enumerate(ctx_list):
        start, end = cu[i], cu[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        ids = block_tables[i, : math.ceil(ctx / block_size)].to(query.device).long().clamp_min(0)
        k = _read(kc, ids, k_scale).reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = _read(vc, ids, v_scale).reshape(-1, num_kv_heads, head_dim)[:ctx]
        if sliding_window is not None:  # keys no row sees (a released block reads as block 0): zero
            v[: max(0, ctx - q_len - sliding_window + 1)] = 0.0
        q = query[start:end].float().reshape(q_len, num_kv_heads, group, head_dim)
        scores = _soft_cap(torch.einsum("thgd,nhd->thgn", q, k) * scale, soft_cap)
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device)[:, None]
        k_pos = torch.arange(ctx, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("thgn,nhd->thgd", probs, v).reshape(q_len, num_q_heads, head_dim)
    return out.to(query.dtype)


def copy_blocks(chunks: Sequence[Tensor], src: Tensor, dst: Tensor) -> None:
    """Copies every layer's keys and values of block ``src[i]`` to ``dst[i]``.

    ``chunks``: tensors ``[num_layers, 2, chunk_blocks, block_size,
    num_kv_heads, head_dim]``; ``src``/``dst`` int ``[n]``, ``dst`` free of
    duplicates and disjoint from ``src`` (so the order of copies is moot).
    """
    chunk_blocks = chunks[0].shape[2]
    src = src.to(chunks[0].device).long()
    dst = dst.to(chunks[0].device).long()
    # staged in batches of at most one chunk's worth of blocks: the extra memory
    # a compaction needs stays within one chunk, however many blocks move
    for start in range(0, src.numel(), chunk_blocks):
        s_ids, d_ids = src[start:start + chunk_blocks], dst[start:start + chunk_blocks]
        data = chunks[0].new_empty((chunks[0].shape[0], 2, s_ids.numel()) + tuple(chunks[0].shape[3:]))
        for j, chunk in enumerate(chunks):
            sel = s_ids // chunk_blocks == j
            if bool(sel.any()):
                data[:, :, sel] = chunk[:, :, s_ids[sel] % chunk_blocks]
        for j, chunk in enumerate(chunks):
            sel = d_ids // chunk_blocks == j
            if bool(sel.any()):
                chunk[:, :, d_ids[sel] % chunk_blocks] = data[:, :, sel]