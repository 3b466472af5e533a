"""Fused elementwise ops of the decoder, in Triton (GPUs; CPU under the interpreter).

A decode step of a small model is bound by kernel launches, not arithmetic:
in plain torch a layer's RMSNorms, RoPE and SiLU gate are some thirty tiny
kernels. These three kernels do the same work in three launches:

- :func:`add_rms_norm`: ``residual += x`` then RMSNorm of the sum (one row
  per program), the sum rounded to the activation dtype first, as torch does;
- :func:`rope_`: rotates queries and keys in place (any row/head strides, so
  the views into the fused qkv projection are rotated where they lie);
- :func:`silu_mul`: ``silu(gate) * up`` from the fused gate/up projection.

Each computes in float32 and rounds once, so in bfloat16 results can differ
from the torch path (which rounds every intermediate) in the last bit; the
float32 CPU path used for exactness tests never runs these. The module
imports triton; :mod:`kvforge.engine.models.llama` loads it only when used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["add_rms_norm", "rope_", "silu_mul"]


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    h = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(residual + x) * weight, residual + x)`` for ``[T, hidden]`` rows.

    With a ``residual`` it is updated in place (and returned); without one
    the input is normalised and returned as the residual."""
    rows, n = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, float(eps),
                                      HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                      num_warps=4 if n <= 4096 else 8)
    return out, res


@triton.jit
def _rotate(base, ok, cos, sin, d, HALF: tl.constexpr):
    x1 = tl.load(base + d[None, :], mask=ok, other=0.0)
    x2 = tl.load(base + HALF + d[None, :], mask=ok, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + d[None, :], (a * cos - b * sin).to(x1.dtype), mask=ok)
    tl.store(base + HALF + d[None, :], (b * cos + a * sin).to(x1.dtype), mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                 NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_c + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + d).to(tl.float32)[None, :]
    heads = tl.arange(0, HEADS_PAD)[:, None]
    _rotate(q_ptr + t * stride_qt + heads * stride_qh, heads < NUM_Q, cos, sin, d, HALF)
    _rotate(k_ptr + t * stride_kt + heads * stride_kh, heads < NUM_K, cos, sin, d, HALF)


def rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> None:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` in place by the
    tables ``cos``/``sin`` ``[P, D]`` at ``positions`` ``[T]`` (D a power of two)."""
    t, num_q, dim = q.shape
    if t:
        _rope_kernel[(t,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), NUM_Q=num_q, NUM_K=k.shape[1],
                           HEADS_PAD=triton.next_power_of_2(max(num_q, k.shape[1])), HALF=dim // 2, num_warps=4)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[T, 2 * I]`` (gate first); returns ``[T, I]``."""
    rows, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(2048, triton.next_power_of_2(n))
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                        BLOCK=block, num_warps=4)
    return out
