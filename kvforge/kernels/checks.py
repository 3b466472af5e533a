"""Argument checks shared by the kernel wrappers.

Shape, dtype, device and stride checks always run and cost no device sync.
Value checks (context lengths against the block table, block ids and slots
inside the pool, ``cu_query_lens`` consistency) read tensor contents; they
run when ``validate`` is True, and by default (``validate=None``) only when
the tensors live on the CPU, so the GPU hot path never waits on a copy.
Every failure raises :class:`~kvforge.errors.KernelError` naming the
argument, what was expected and what was got.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvforge.errors import KernelError
from kvforge.kernels.layout import CacheView

__all__ = [
    "check_tensor", "check_query", "check_index", "check_options", "check_out",
    "should_validate", "check_block_tables_values", "resolve_backend",
]

BACKENDS = ("auto", "triton", "torch")


def check_tensor(t: object, name: str, ndim: int, device: torch.device) -> Tensor:
    """``t`` is a tensor of ``ndim`` dims on ``device``."""
    if not isinstance(t, Tensor):
        raise KernelError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.device != device:
        raise KernelError(f"{name}: expected device {device} (the cache's), got {t.device}")
    return t


def check_query(query: object, view: CacheView, name: str = "query") -> Tensor:
    """``[rows, num_q_heads, head_dim]`` in the cache dtype, GQA-compatible."""
    q = check_tensor(query, name, 3, view.device)
    if q.dtype != view.dtype:
        what = f"the model dtype of this {view.cache_dtype} cache" if view.is_fp8 else "the cache dtype"
        raise KernelError(f"{name} dtype: expected {what}, {view.dtype}, got {q.dtype}")
    if q.shape[2] != view.head_dim:
        raise KernelError(f"{name} head_dim: expected {view.head_dim} (the cache's), got {q.shape[2]}")
    if q.shape[1] < 1 or q.shape[1] % view.num_kv_heads:
        raise KernelError(
            f"{name} heads: expected a positive multiple of num_kv_heads={view.num_kv_heads}, got {q.shape[1]}"
        )
    if q.stride(2) != 1:
        raise KernelError(f"{name}: expected stride 1 on head_dim, got {q.stride(2)}")
    return q


def check_index(t: object, name: str, shape: tuple[int | None, ...], device: torch.device,
                dtypes: tuple[torch.dtype, ...] = (torch.int32,)) -> Tensor:
    """An integer tensor of the given shape (None = any size), unit stride on the last dim."""
    x = check_tensor(t, name, len(shape), device)
    if x.dtype not in dtypes:
        raise KernelError(f"{name} dtype: expected {' or '.join(map(str, dtypes))}, got {x.dtype}")
    for dim, want in enumerate(shape):
        if want is not None and x.shape[dim] != want:
            raise KernelError(f"{name} shape: expected {tuple('*' if s is None else s for s in shape)}, got {tuple(x.shape)}")
    if x.numel() and x.stride(-1) != 1:
        raise KernelError(f"{name}: expected stride 1 on the last dim, got {x.stride(-1)}")
    return x


def check_options(scale: object, sliding_window: object, soft_cap: object) -> None:
    """``scale`` finite and nonzero, ``sliding_window`` an int >= 1, ``soft_cap`` > 0 (each or None)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale == 0):
        raise KernelError(f"scale: expected a finite nonzero number or None, got {scale!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise KernelError(f"sliding_window: expected an int >= 1 or None, got {sliding_window!r}")
    if soft_cap is not None and (isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float))
                                 or not math.isfinite(soft_cap) or soft_cap <= 0):
        raise KernelError(f"soft_cap: expected a finite number > 0 or None, got {soft_cap!r}")


def check_out(out: Tensor | None, like: Tensor) -> Tensor:
    """``out`` (or a fresh tensor) shaped and typed like ``like``."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    o = check_tensor(out, "out", like.dim(), like.device)
    if o.shape != like.shape or o.dtype != like.dtype:
        raise KernelError(f"out: expected {like.dtype} {tuple(like.shape)}, got {o.dtype} {tuple(o.shape)}")
    if o.numel() and o.stride(-1) != 1:
        raise KernelError(f"out: expected stride 1 on head_dim, got {o.stride(-1)}")
    return o


def should_validate(validate: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if validate is None else bool(validate)


def check_block_tables_values(view: CacheView, block_tables: Tensor, context_lens: Tensor,
                              sliding_window: int | None = None, query_lens: Tensor | None = None) -> None:
    """Context lengths fit the table and every block id they reach is in the pool; under a
    sliding window only from the first key a query sees (``query_lens`` new tokens each,
    default 1), so entries before it (blocks a window released: -1) are not checked."""
    if context_lens.numel() == 0:
        return
    ctx = context_lens.long()
    if int(ctx.min()) < 0:
        raise KernelError(f"context_lens: expected values >= 0, got {int(ctx.min())} at index {int(ctx.argmin())}")
    max_ctx = int(ctx.max())
    capacity = block_tables.shape[1] * view.block_size
    if max_ctx > capacity:
        raise KernelError(
            f"block_tables: {block_tables.shape[1]} blocks of {view.block_size} hold {capacity} tokens, "
            f"but context_lens reaches {max_ctx} (sequence {int(ctx.argmax())})"
        )
    needed = (ctx + view.block_size - 1) // view.block_size
    cols = torch.arange(block_tables.shape[1], device=ctx.device)[None, :]
    used = cols < needed[:, None]
    if sliding_window is not None:
        q = 1 if query_lens is None else query_lens.to(ctx.device).long()
        used &= cols >= ((ctx - q - sliding_window + 1).clamp_min(0) // view.block_size)[:, None]
    ids = block_tables[used]
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= view.num_blocks:
            bad = lo if lo < 0 else hi
            raise KernelError(f"block_tables: block id {bad} is outside the pool of {view.num_blocks} blocks")


def resolve_backend(backend: object, device: torch.device) -> str:
    """'torch' or 'triton' for tensors on ``device``.

    'auto' picks Triton on CUDA/ROCm devices and the torch reference
    elsewhere; 'triton' on CPU tensors runs the Triton interpreter, which
    needs ``TRITON_INTERPRET=1`` set before triton is first imported.
    """
    if backend not in BACKENDS:
        raise KernelError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type not in ("cuda", "cpu"):
        raise KernelError(f"backend='triton': expected CUDA/ROCm tensors (or CPU under TRITON_INTERPRET=1), got {device}")
    return str(backend)
