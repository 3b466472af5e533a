"""Triton kernels that move whole rows: ``store_kv`` and ``copy_blocks``.

``_store_kernel``: grid ``(cdiv(num_tokens, BLOCK_T),)``; each program copies
``BLOCK_T`` tokens' ``[num_kv_heads, head_dim]`` keys and values into their
slots (flattened to ``BLOCK_HD`` columns, the next power of two of
``num_kv_heads * head_dim``, masked past it: any head dim), skipping slot -1.
``_copy_kernel``: grid ``(num_pairs, num_layers * 2, tiles_per_block)``; each
program copies one ``BLOCK`` -element tile of one layer's keys or values of
one block, so every layer of every pair moves in a single launch.
An fp8 cache (``FP8``): each program loads its rows' per-head scales, divides
in float32 (correctly rounded) and stores the bytes of
:func:`~kvforge.kernels.triton_fp8.encode_fp8`, bitcast to the chunks' fp8
pointer type (or through ``uint8`` views where the read path is not native).
``_copy_kernel`` moves fp8 chunks as bytes (the wrapper passes ``uint8`` views).
This module imports triton; :mod:`kvforge.kernels.ops` loads it lazily.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kvforge.kernels.layout import CacheView
from kvforge.kernels.triton_fp8 import E4M3, decode_mode, encode_fp8
from kvforge.kernels.triton_launch import (
    Launch, aligned, current_device, current_stream, no_launch_hooks, view_chunks, view_pointers,
)

__all__ = ["StoreLaunch", "launch_store", "launch_copy", "KERNELS"]


@triton.jit(do_not_specialize=["num_tokens"])
def _store_kernel(
    key_ptr, value_ptr, k_ptr, v_ptr, chunk_off_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    num_tokens, chunk_blocks,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    HEAD_DIM: tl.constexpr, NUM_HD: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MULTI_CHUNK: tl.constexpr, FP8: tl.constexpr, IS_E4M3: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_HD)
    head, dim = col // HEAD_DIM, col % HEAD_DIM
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    ok_t = slot >= 0
    ok = ok_t[:, None] & (col < NUM_HD)[None, :]
    block = slot // BLOCK_SIZE
    if MULTI_CHUNK:
        which = block // chunk_blocks
        chunk_base = tl.multiple_of(tl.load(chunk_off_ptr + which, mask=ok_t, other=0), 16)
        base = chunk_base + (block - which * chunk_blocks) * stride_cb
    else:
        base = block * stride_cb
    dst = (base + (slot % BLOCK_SIZE) * stride_ct)[:, None] + (head * stride_ch + dim)[None, :]
    k = tl.load(key_ptr + tok[:, None] * stride_kt + (head * stride_kh + dim)[None, :], mask=ok)
    v = tl.load(value_ptr + tok[:, None] * stride_vt + (head * stride_vh + dim)[None, :], mask=ok)
    if FP8:
        col_ok = col < NUM_HD
        k_s = tl.load(k_scale_ptr + head, mask=col_ok, other=1.0)
        v_s = tl.load(v_scale_ptr + head, mask=col_ok, other=1.0)
        # the bytes go out through the chunks' own pointer type: fp8 (a bitcast) or uint8 views
        k = encode_fp8(tl.math.div_rn(k.to(tl.float32), k_s[None, :]), IS_E4M3).to(k_ptr.dtype.element_ty,
                                                                                     bitcast=True)
        v = encode_fp8(tl.math.div_rn(v.to(tl.float32), v_s[None, :]), IS_E4M3).to(v_ptr.dtype.element_ty,
                                                                                     bitcast=True)
    tl.store(k_ptr + dst, k, mask=ok)
    tl.store(v_ptr + dst, v, mask=ok)


@triton.jit
def _copy_kernel(
    cache_ptr, chunk_off_ptr, src_ptr, dst_ptr, chunk_blocks,
    stride_layer, stride_kv, stride_block,
    BLOCK_ELEMS: tl.constexpr, BLOCK: tl.constexpr, MULTI_CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    if MULTI_CHUNK:
        src_which = src // chunk_blocks
        dst_which = dst // chunk_blocks
        src_base = tl.multiple_of(tl.load(chunk_off_ptr + src_which), 16) + (src - src_which * chunk_blocks) * stride_block
        dst_base = tl.multiple_of(tl.load(chunk_off_ptr + dst_which), 16) + (dst - dst_which * chunk_blocks) * stride_block
    else:
        src_base = src * stride_block
        dst_base = dst * stride_block
    inner = (layer_kv // 2).to(tl.int64) * stride_layer + (layer_kv % 2) * stride_kv
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < BLOCK_ELEMS
    data = tl.load(cache_ptr + src_base + inner + offs, mask=mask)
    tl.store(cache_ptr + dst_base + inner + offs, data, mask=mask)


class StoreLaunch:
    """The launch of one ``store_kv`` call shape, built once from validated inputs and called
    with every later call's tensors of the same metadata over the same view (see
    :class:`~kvforge.kernels.triton_decode.DecodeLaunch`)."""

    __slots__ = ("launch", "scalars", "view_ptrs", "as_bytes", "on_gpu")

    def __init__(self, key: Tensor, value: Tensor, view: CacheView, slot_mapping: Tensor) -> None:
        num_tokens = key.shape[0]
        num_hd = view.num_kv_heads * view.head_dim
        block_hd = triton.next_power_of_2(num_hd)
        block_t = max(1, min(64, 4096 // block_hd))
        k0 = view.k_chunks[0]
        fp8 = view.k_scale is not None
        # bytes from encode_fp8, no fp8 cast of the compiler's; where the read path is not native
        # (hardware without fp8 types) the chunks go in as uint8 views
        self.as_bytes = fp8 and decode_mode(k0.dtype, view.device) != 1
        self.on_gpu = view.device.type == "cuda"
        self.scalars = (num_tokens, view.chunk_blocks,
                        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                        k0.stride(0), k0.stride(1), k0.stride(2))
        self.view_ptrs = view_pointers(view)
        self.launch = Launch(_store_kernel, (triton.cdiv(num_tokens, block_t),), dict(
            HEAD_DIM=view.head_dim, NUM_HD=num_hd, BLOCK_HD=block_hd, BLOCK_T=block_t,
            BLOCK_SIZE=view.block_size, MULTI_CHUNK=view.offsets is not None,
            FP8=fp8, IS_E4M3=view.cache_dtype == E4M3), num_warps=4)

    def __call__(self, view: CacheView, key: Tensor, value: Tensor, slot_mapping: Tensor) -> None:
        """Launches over validated tensors of this launch's metadata."""
        launch = self.launch
        if self.on_gpu and launch.device >= 0 and no_launch_hooks():
            pk, pv, ps = key.data_ptr(), value.data_ptr(), slot_mapping.data_ptr()
            if not (pk | pv | ps) & 15 and current_device() == launch.device:
                ck, cv, poff, pks, pvs = self.view_ptrs
                launch.fast(current_stream(launch.device), pk, pv, ck, cv, poff or ps, ps, pks or ps, pvs or ps,
                            *self.scalars)
                return
        k0, v0 = view_chunks(view, self.as_bytes)
        fp8 = view.k_scale is not None
        tensors = (key, value, k0, v0, view.offsets if view.offsets is not None else slot_mapping, slot_mapping,
                   view.k_scale if fp8 else slot_mapping, view.v_scale if fp8 else slot_mapping)
        launch.jit(*tensors, *self.scalars, pointers_aligned=self.on_gpu and aligned(*(t.data_ptr() for t in tensors)))


def launch_store(
    key: Tensor, value: Tensor, view: CacheView, offsets: Tensor | None, slot_mapping: Tensor,
) -> None:
    """Launches once on validated inputs (``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]``)."""
    assert offsets is view.offsets, "launch_store: offsets must be view.offsets"
    StoreLaunch(key, value, view, slot_mapping)(view, key, value, slot_mapping)


def launch_copy(chunks: tuple[Tensor, ...], offsets: Tensor | None, src: Tensor, dst: Tensor) -> None:
    """Launches on validated inputs: ``chunks`` ``[num_layers, 2, chunk_blocks,
    block_size, num_kv_heads, head_dim]`` with contiguous blocks, ``src``/``dst``
    int ``[n]`` on the chunks' device."""
    c0 = chunks[0]
    num_layers = c0.shape[0]
    block_elems = c0[0, 0, 0].numel()
    block = min(triton.next_power_of_2(block_elems), 8192)
    grid = (src.numel(), num_layers * 2, triton.cdiv(block_elems, block))
    _copy_kernel[grid](
        c0, offsets if offsets is not None else src, src, dst, c0.shape[2],
        c0.stride(0), c0.stride(1), c0.stride(2),
        BLOCK_ELEMS=block_elems, BLOCK=block, MULTI_CHUNK=offsets is not None,
        num_warps=8 if block >= 4096 else 4,
    )
KERNELS = (_store_kernel, _copy_kernel)
