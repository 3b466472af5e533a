"""Triton paged prefill attention: ragged causal queries against paged KV.

Grid ``(num_tiles, num_kv_heads)``, tiles on the axis without the 65535
limit. A tile is ``BLOCK_Q`` consecutive new tokens of one sequence times the
``group`` query heads of one KV head, packed into ``BLOCK_M = BLOCK_Q *
group`` (padded) rows, so each K/V tile gathered through the block table
feeds every query head of the group. The
grid is sized from shapes alone (``total_new_tokens // BLOCK_Q + batch``
tiles bound the ragged tile count), and each program finds its sequence by a
binary search over ``cu_query_lens``; tiles past a sequence's end exit.
Tiles are taken last-first so the longest (latest, most context) start
first. Keys strictly below every row's position run without masks; only the
diagonal tiles (or every tile, under a sliding window) are masked.
A head dim that is not a power of two of at least 16 runs in a ``BLOCK_D``
tile (:func:`padded_head_dim`) with its padding columns masked on every load
and store, as in :mod:`kvforge.kernels.triton_decode`; the constexpr
``HAS_PAD`` keeps those masks out of the power-of-two kernels.
An fp8 cache is read and dequantized as in the decode kernel (``FP8``).
The tile height follows the rows per sequence (:func:`_config`), so a
workload's first short chunks over long cached contexts would compile new
variants mid-serving; :func:`warm_up_prefill` compiles each one up front.
Counts that change from call to call (sequences, storage chunks) are not
specialised (``do_not_specialize``), so a new count compiles nothing.
This module imports triton; :mod:`kvforge.kernels.ops` loads it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvforge.kernels.layout import CacheView, padded_head_dim
from kvforge.kernels.triton_fp8 import decode_mode, fp8_bits_to_f16, raw_mul
from kvforge.kernels.triton_launch import (
    Launch, aligned, attention_scalars, current_device, current_stream, no_launch_hooks, view_chunks, view_pointers,
)

__all__ = ["PrefillLaunch", "launch_prefill", "warm_up_prefill", "KERNELS"]


@triton.jit(do_not_specialize=["num_chunks", "num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, chunk_off_ptr, block_tables_ptr, cu_q_ptr, context_lens_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, scale, soft_cap, sliding_window, chunk_blocks, num_chunks, num_seqs,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MULTI_CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, RAW_MUL: tl.constexpr, HALF_DOTS: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    # sequence i owns tile ids [cu[i] // BLOCK_Q + i, cu[i+1] // BLOCK_Q + i + 1)
    lo_s = 0
    hi_s = num_seqs
    while lo_s < hi_s:
        mid = (lo_s + hi_s) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= tile:
            lo_s = mid + 1
        else:
            hi_s = mid
    seq = lo_s - 1
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    q_start = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if q_start < q_len:
        ctx = tl.load(context_lens_ptr + seq)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        t = q_start + offs_m // GROUP
        heads = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m < BLOCK_Q * GROUP) & (t < q_len)
        token = (q_begin + t).to(tl.int64)
        d_ok = offs_d < HEAD_DIM  # used only with HAS_PAD (all true otherwise)
        if HAS_PAD:
            out_mask = row_ok[:, None] & d_ok[None, :]
        else:
            out_mask = row_ok[:, None]
        q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=out_mask, other=0.0)
        if USE_SOFT_CAP:
            q_scale = scale
        else:
            q_scale = scale * 1.4426950408889634
        if HALF_DOTS:  # fp8 widens to float16 in one instruction (bfloat16 takes several): the dots
            # run in float16, the query converted once (exact for |q| up to 65504, saturated beyond)
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)
        if FP8 != 0:  # dequantize by folding, as in the decode kernel
            q_scale = q_scale * (tl.load(k_scale_ptr + kv_head) * RAW_MUL)
            v_mul = tl.load(v_scale_ptr + kv_head) * RAW_MUL
        pos = ctx - q_len + t  # position of each row's token
        first_pos = ctx - q_len + q_start
        key_end = ctx - q_len + tl.minimum(q_start + BLOCK_Q, q_len)
        key_lo = 0
        if USE_WINDOW:
            key_lo = tl.maximum(first_pos - sliding_window + 1, 0)
            free_end = key_lo  # every tile masked
        else:
            free_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys <= every row's position

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = block_tables_ptr + seq * stride_bt
        head_off = kv_head * stride_ch
        if MULTI_CHUNK:
            offs_c = tl.arange(0, CHUNKS_PAD)
            chunk_table = tl.load(chunk_off_ptr + offs_c, mask=offs_c < num_chunks, other=0)
        for phase in tl.static_range(2):
            if phase == 0:
                n_lo = key_lo
                n_hi = free_end
            else:
                n_lo = free_end
                n_hi = key_end
            for n0 in range(n_lo, n_hi, BLOCK_N):
                n = n0 + offs_n
                n_ok = n < n_hi
                block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0)
                if MULTI_CHUNK:
                    # chunk offsets come from registers (tl.gather), not a second dependent
                    # global load, so the block-table load stays pipelined; int32 division
                    which = block // chunk_blocks
                    chunk_base = tl.multiple_of(tl.gather(chunk_table, which, 0), 16)
                    base = chunk_base + (block - which * chunk_blocks).to(tl.int64) * stride_cb
                else:
                    base = block.to(tl.int64) * stride_cb
                row = base + (n % BLOCK_SIZE) * stride_ct + head_off
                if HAS_PAD:
                    kv_mask = n_ok[:, None] & d_ok[None, :]
                else:
                    kv_mask = n_ok[:, None]
                k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                if FP8 == 1:
                    k = k.to(q.dtype)
                elif FP8 != 0:
                    k = fp8_bits_to_f16(k, FP8 == 2).to(q.dtype)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * q_scale
                if USE_SOFT_CAP:
                    s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0)) * 1.4426950408889634
                if phase == 1:
                    visible = (n[None, :] <= pos[:, None]) & n_ok[None, :]
                    if USE_WINDOW:
                        visible = visible & (n[None, :] > pos[:, None] - sliding_window)
                    s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                if FP8 == 1:
                    v = v.to(q.dtype)
                elif FP8 != 0:
                    v = fp8_bits_to_f16(v, FP8 == 2).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if FP8 != 0:
            o = o * v_mul
        tl.store(out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)


def _config(view: CacheView, group: int, rows_per_seq: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head dim's tile, dtype
    and average number of query rows (new tokens x group) per sequence."""
    if view.device.type != "cuda":
        return max(16, triton.next_power_of_2(group)) * 2, 16, 4, 1  # interpreter: several tiles per sequence
    block_d = padded_head_dim(view.head_dim)  # registers and shared memory follow the tile, not head_dim
    if view.dtype == torch.float32:
        block_m, block_n, warps, stages = (32, 32, 4, 2) if block_d == 256 else (64, 32, 4, 2)
    elif block_d == 256:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    elif block_d == 128 and rows_per_seq >= 512:
        block_m, block_n, warps, stages = 256, 64, 8, 3  # measured best for long prompts (docs/kernels.md)
    elif block_d == 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    if rows_per_seq < block_m // 2:  # short prompts: do not pad a tile mostly with masked rows
        block_m = max(32, min(block_m, triton.next_power_of_2(max(rows_per_seq, 1))))
        warps = min(warps, 4)
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


class PrefillLaunch:
    """The launch of one prefill call shape, built once from validated inputs and called
    with every later call's tensors of the same metadata over the same view (see
    :class:`~kvforge.kernels.triton_decode.DecodeLaunch`)."""

    __slots__ = ("launch", "scalars", "view_ptrs", "fp8", "on_gpu")

    def __init__(self, query: Tensor, view: CacheView, block_tables: Tensor, context_lens: Tensor, out: Tensor, *,
                 scale: float, sliding_window: int | None, soft_cap: float | None, block_m: int | None = None,
                 block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> None:
        total, num_q_heads, head_dim = query.shape
        batch = context_lens.shape[0]
        group = num_q_heads // view.num_kv_heads
        cfg_m, cfg_n, cfg_warps, cfg_stages = _config(view, group, total * group // max(batch, 1))
        block_m, block_n = block_m or cfg_m, block_n or cfg_n
        block_q = block_m // group
        block_d = padded_head_dim(head_dim)
        k0 = view.k_chunks[0]
        fp8 = 0
        if view.k_scale is not None:
            fp8 = decode_mode(k0.dtype, view.device)
        self.fp8 = fp8
        self.on_gpu = view.device.type == "cuda"
        self.scalars = attention_scalars(view, query, block_tables, out, scale=scale, soft_cap=soft_cap,
                                         sliding_window=sliding_window, count=batch)
        self.view_ptrs = view_pointers(view)
        self.launch = Launch(
            _prefill_kernel, (total // block_q + batch, view.num_kv_heads), dict(
                GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
                BLOCK_D=block_d, HAS_PAD=block_d != head_dim, BLOCK_SIZE=view.block_size, BLOCK_N=block_n,
                MULTI_CHUNK=view.offsets is not None, CHUNKS_PAD=view.chunks_pad,
                USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=soft_cap is not None,
                DOT_PRECISION="ieee" if view.dtype == torch.float32 else None,  # None: the default (tensor cores)
                FP8=fp8, RAW_MUL=raw_mul(fp8), HALF_DOTS=fp8 == 1 and query.dtype == torch.bfloat16),
            num_warps=num_warps or cfg_warps, num_stages=num_stages or cfg_stages)

    def __call__(self, view: CacheView, query: Tensor, block_tables: Tensor, cu_query_lens: Tensor,
                 context_lens: Tensor, out: Tensor) -> None:
        """Launches over validated tensors of this launch's metadata; writes ``out``."""
        launch = self.launch
        if self.on_gpu and launch.device >= 0 and no_launch_hooks():
            pq, pt, pcu = query.data_ptr(), block_tables.data_ptr(), cu_query_lens.data_ptr()
            pc, po = context_lens.data_ptr(), out.data_ptr()
            if not (pq | pt | pcu | pc | po) & 15 and current_device() == launch.device:
                pk, pv, poff, pks, pvs = self.view_ptrs
                launch.fast(current_stream(launch.device), pq, pk, pv, poff or pt, pt, pcu, pc, po, pks or po,
                            pvs or po, *self.scalars)
                return
        k0, v0 = view_chunks(view, self.fp8 not in (0, 1))
        offsets = view.offsets if view.offsets is not None else block_tables
        tensors = (query, k0, v0, offsets, block_tables, cu_query_lens, context_lens, out,
                   view.k_scale if self.fp8 else out, view.v_scale if self.fp8 else out)
        launch.jit(*tensors, *self.scalars, pointers_aligned=self.on_gpu and aligned(*(t.data_ptr() for t in tensors)))


def launch_prefill(
    query: Tensor, view: CacheView, offsets: Tensor | None, block_tables: Tensor, cu_query_lens: Tensor,
    context_lens: Tensor, out: Tensor, *, scale: float, sliding_window: int | None, soft_cap: float | None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> None:
    """Launches once on validated inputs; writes ``out`` ``[total_new_tokens, num_q_heads, head_dim]``.
    ``offsets`` must be the view's own table."""
    assert offsets is view.offsets, "launch_prefill: offsets must be view.offsets"
    PrefillLaunch(query, view, block_tables, context_lens, out, scale=scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, block_m=block_m, block_n=block_n, num_warps=num_warps,
                  num_stages=num_stages)(view, query, block_tables, cu_query_lens, context_lens, out)


def variants(view: CacheView, group: int) -> list[tuple[int, int, int, int]]:
    """Every ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` that :func:`launch_prefill` picks for
    this view and query-head group, over every number of rows per sequence."""
    found: dict[tuple[int, int, int, int], None] = {}
    # every count up to past the largest threshold (512 rows) and twice the largest tile (256):
    # a count between two powers of two can pick a tile that neither power does
    for rows in range(1, 1025):
        found[_config(view, group, rows)] = None
    return list(found)


def warm_up_prefill(view: CacheView, num_q_heads: int, *, scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, batch_sizes: tuple[int, ...] = (1,)) -> int:
    """Compile every prefill variant the engine can launch over ``view`` by launching each
    (:func:`variants`) once per batch size on a tiny input: one new token per sequence
    over a context of one token (block 0 of the view is read; nothing in the cache is
    written). The sequence count is not specialised: one batch size covers every count.
    Returns the number of launches; synchronizes the device."""
    device = view.device
    group = num_q_heads // view.num_kv_heads
    launches = 0
    for block_m, block_n, warps, stages in variants(view, group):
        for batch in batch_sizes:
            q = torch.zeros(batch, num_q_heads, view.head_dim, dtype=view.dtype, device=device)
            out = torch.empty_like(q)
            tables = torch.zeros(batch, 16, dtype=torch.int32, device=device)  # rows padded to 16, as the cache's
            cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
            ctx = torch.ones(batch, dtype=torch.int32, device=device)
            launch_prefill(q, view, view.offsets, tables, cu, ctx, out, scale=scale, sliding_window=sliding_window,
                           soft_cap=soft_cap, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches


KERNELS = (_prefill_kernel,)
