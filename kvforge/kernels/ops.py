"""The public kernel entry points: check, pick a backend, launch.

Each wrapper checks shapes, dtypes, devices and strides (always) and tensor
contents (see :mod:`kvforge.kernels.checks` for when), raising
:class:`~kvforge.errors.KernelError` before anything runs; then it calls the
Triton launcher (CUDA/ROCm, or the CPU under ``TRITON_INTERPRET=1``) or the
torch reference. The Triton modules are imported on first use, so the CPU
path never imports triton, and bound once per device type.

The cache argument is either one layer's chunk lists ``(k_cache, v_cache)``,
described and checked on every call, or a :class:`~kvforge.kernels.CacheView`
from :func:`~kvforge.kernels.describe_cache` in place of ``k_cache`` (with
``v_cache=None``), which skips that work: then only the per-call tensors
(queries, keys/values, tables, lengths, slots) are checked. An fp8 cache
is always passed as a view (it carries the scales and the model dtype):
:func:`store_kv` quantizes, the attention kernels dequantize inside, and
:func:`copy_blocks` moves its bytes unchanged.

Over a view the checks and the launch preparation run once per *call
signature*: the view's serial, every tensor argument's shape, dtype, device
and strides, and the options. The prepared launch is remembered under that
key (:data:`_PLANS`) and a later call with the same signature only reads the
metadata to form the key, runs the value checks if ``validate`` asks for
them, and launches: a few microseconds of host time instead of tens. A
signature that differs in anything is checked in full again, so a bad
argument is refused the same way whatever came before it.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.errors import KernelError
from kvforge.kernels import reference
from kvforge.kernels.checks import (
    check_block_tables_values, check_index, check_options, check_out, check_query, check_tensor,
    resolve_backend, should_validate,
)
from kvforge.kernels.layout import (
    STORAGE_DTYPES, CacheView, KVCacheArg, as_chunks, describe_cache, resolve_offsets,
)
from kvforge.kernels.fp8 import is_fp8

__all__ = ["store_kv", "paged_decode_attention", "paged_prefill_attention", "copy_blocks"]

#: Triton kernel modules bound so far, by (module name, device type). A module
#: enters only after its checks passed, so a failed bind is retried (and raises
#: again) on the next call rather than cached.
_TRITON_MODULES: dict[tuple[str, str], ModuleType] = {}


#: Prepared launches by call signature (see the module docstring): each a callable
#: ``(view, *tensors)`` built after its checks passed. It holds no tensor of the view
#: (only the pointers, which the view's serial pins), so it keeps no memory alive.
_PLANS: dict[tuple, Callable[..., None]] = {}
#: Bound on :data:`_PLANS`; when full it is emptied (plans are cheap to rebuild).
_MAX_PLANS = 4096


# A call's memo key is one flat tuple (:func:`_recall`): the view's serial and identity (a
# copy of a view is another object: it gets a plan of its own pointers), the forced fp8
# read path of an fp8 view, then per tensor argument its :func:`_meta`, then the options
# with their types. Flat and with device indices it costs a third less to build and hash
# than nested per-tensor tuples with torch.device objects.
_NO_OUT = (None, None, None, None)


def _meta(t: Tensor) -> tuple:
    """A tensor argument's part of a memo key: shape, dtype, device (its index on an
    accelerator, the device itself otherwise: the CPU and meta both have index -1) and
    strides. An AttributeError when ``t`` is not a tensor."""
    index = t.get_device()
    return t.shape, t.dtype, index if index >= 0 else t.device, t.stride()


def _recall(kind: str, k_cache: object, v_cache: object, chunk_offsets: object,
            signature: Callable[[], tuple]) -> tuple[tuple | None, Callable[..., None] | None]:
    """The memo key of a call and its remembered launch, or None for either. Only a described
    view passed alone is remembered; ``signature`` gives the rest of the key (the tensors'
    :func:`_meta`, the options). Arguments that are not tensors, or unhashable options, give
    no key: the full checks then say what is wrong."""
    if type(k_cache) is not CacheView or v_cache is not None or chunk_offsets is not None or not k_cache.serial:
        return None, None
    try:
        memo = (kind, k_cache.serial, id(k_cache), k_cache.k_scale is not None and _forced_fp8_path(), *signature())
        return memo, _PLANS.get(memo)
    except (AttributeError, TypeError):
        return None, None


def _remember(key: tuple | None, plan: Callable[..., None]) -> None:
    if key is None:
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _forced_fp8_path() -> object:
    """``triton_fp8.FORCE_DECODE`` (a bench and test knob that picks an fp8 read path) once
    that module is loaded: it changes what a launch over an fp8 view is, so it is part of
    the memo key of such calls."""
    module = sys.modules.get("kvforge.kernels.triton_fp8")
    return None if module is None else module.FORCE_DECODE


def _bind_triton_module(name: str, device_type: str) -> ModuleType:
    """Imports ``kvforge.kernels.<name>``; on the CPU it must be interpreted."""
    try:
        module = importlib.import_module(f"kvforge.kernels.{name}")
    except ImportError as exc:  # pragma: no cover - triton ships with torch on GPU hosts
        raise KernelError(f"backend='triton' needs triton: {exc}") from exc
    if device_type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(module.KERNELS[0], InterpretedFunction):
            raise KernelError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (or use backend='torch')"
            )
        from kvforge.kernels.interpreter_compat import ensure_interpreter_index_fix

        ensure_interpreter_index_fix()
    return module


def _triton_module(name: str, device: torch.device) -> ModuleType:
    """The bound module ``kvforge.kernels.<name>`` for tensors on ``device`` (one dict lookup after the first)."""
    key = (name, device.type)
    module = _TRITON_MODULES.get(key)
    if module is None:
        module = _TRITON_MODULES[key] = _bind_triton_module(name, device.type)
    return module


def _cache_view(k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None,
                chunk_offsets: Tensor | None) -> CacheView:
    """The described layer: a given :class:`CacheView` as is, or chunk lists described now."""
    if isinstance(k_cache, CacheView):
        if v_cache is not None:
            raise KernelError(
                f"v_cache: expected None with a CacheView as k_cache (the view holds both), "
                f"got {type(v_cache).__name__}")
        if (k_cache.offsets is None) != (max(len(k_cache.k_chunks), k_cache.max_chunks) == 1):
            raise KernelError(
                f"k_cache: a CacheView of {len(k_cache.k_chunks)} chunks (of at most {k_cache.max_chunks}) with offsets "
                f"{'None' if k_cache.offsets is None else 'set'}; build it with describe_cache")
        if chunk_offsets is not None and chunk_offsets is not k_cache.offsets:
            if k_cache.offsets is not None:
                raise KernelError(
                    "chunk_offsets: a CacheView carries its own offset table; pass chunk_offsets=None "
                    "(or the view's own table), not a different one")
            resolve_offsets(k_cache.k_chunks, None, chunk_offsets)  # one chunk: a [1] table is checked as usual
        return k_cache
    if isinstance(v_cache, CacheView):
        raise KernelError("v_cache: a CacheView goes in place of k_cache, with v_cache=None")
    return describe_cache(k_cache, v_cache, chunk_offsets)


def store_kv(
    key: Tensor, value: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None, slot_mapping: Tensor, *,
    chunk_offsets: Tensor | None = None, backend: str = "auto", validate: bool | None = None,
) -> None:
    """Writes new keys/values into their cache slots.

    ``key``/``value``: ``[num_tokens, num_kv_heads, head_dim]`` in the cache
    dtype (for an fp8 cache the view's model dtype: they are stored as
    ``saturate(x / scale)``, rounded to nearest even). ``k_cache``/``v_cache``: one layer's cache, a tensor ``[num_blocks,
    block_size, num_kv_heads, head_dim]`` or a list of chunk views; or a
    :class:`~kvforge.kernels.CacheView` as ``k_cache`` and None as ``v_cache``.
    ``slot_mapping``: int32/int64 ``[num_tokens]``, ``block_id * block_size +
    offset``; -1 marks padding and is skipped. Two tokens with the same slot
    leave either one's values. ``validate`` (default: on CPU only) checks
    every slot is -1 or inside the pool.
    """
    memo, plan = _recall("store", k_cache, v_cache, chunk_offsets, lambda: (
        *_meta(key), *_meta(value), *_meta(slot_mapping), backend))
    if plan is None:
        view, plan = _plan_store(key, value, k_cache, v_cache, slot_mapping, chunk_offsets, backend)
        _remember(memo, plan)
    else:
        view = k_cache
    if should_validate(validate, view.device) and slot_mapping.numel():
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= view.num_slots:
            bad = lo if lo < -1 else hi
            raise KernelError(f"slot_mapping: slot {bad} is outside [-1, {view.num_slots}) for {view.num_blocks} blocks")
    plan(view, key, value, slot_mapping)


def _plan_store(key: Tensor, value: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None,
                slot_mapping: Tensor, chunk_offsets: Tensor | None,
                backend: str) -> tuple[CacheView, Callable[..., None]]:
    """Checks a :func:`store_kv` call's metadata; returns the view and the launch
    ``(view, key, value, slot_mapping)`` for calls of this signature."""
    view = _cache_view(k_cache, v_cache, chunk_offsets)
    shape = (None, view.num_kv_heads, view.head_dim)
    k = check_tensor(key, "key", 3, view.device)
    v = check_tensor(value, "value", 3, view.device)
    for name, t in (("key", k), ("value", v)):
        if t.dtype != view.dtype:
            what = f"the model dtype of this {view.cache_dtype} cache" if view.is_fp8 else "the cache dtype"
            raise KernelError(f"{name} dtype: expected {what}, {view.dtype}, got {t.dtype}")
        if t.shape[1:] != shape[1:]:
            raise KernelError(f"{name} shape: expected (*, {view.num_kv_heads}, {view.head_dim}), got {tuple(t.shape)}")
        if t.numel() and t.stride(2) != 1:
            raise KernelError(f"{name}: expected stride 1 on head_dim, got {t.stride(2)}")
    if v.shape[0] != k.shape[0]:
        raise KernelError(f"value: expected {k.shape[0]} tokens like key, got {v.shape[0]}")
    check_index(slot_mapping, "slot_mapping", (k.shape[0],), view.device, (torch.int32, torch.int64))
    if resolve_backend(backend, view.device) == "torch":
        return view, _store_torch
    if not k.shape[0]:
        return view, _nothing
    return view, _triton_module("triton_store", view.device).StoreLaunch(k, v, view, slot_mapping)


def _store_torch(view: CacheView, key: Tensor, value: Tensor, slot_mapping: Tensor) -> None:
    reference.store_kv(key, value, view.k_chunks, view.v_chunks, slot_mapping, k_scale=view.k_scale,
                       v_scale=view.v_scale)


def _nothing(*args: object) -> None:
    """The launch of a call with nothing to compute."""


def paged_decode_attention(
    query: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None, block_tables: Tensor, context_lens: Tensor, *,
    scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
    out: Tensor | None = None, num_splits: int | None = None, chunk_offsets: Tensor | None = None,
    backend: str = "auto", validate: bool | None = None,
) -> Tensor:
    """Attention of one new token per sequence over its paged context.

    ``query``: ``[batch, num_q_heads, head_dim]``, the token at position
    ``context_lens[i] - 1`` whose K/V are already stored; ``num_q_heads`` a
    multiple of the cache's ``num_kv_heads`` (GQA). ``k_cache``/``v_cache``
    as in :func:`store_kv` (chunk lists, or a CacheView and None). ``block_tables``: int32
    ``[batch, max_blocks]`` (entries past the context are never read).
    ``context_lens``: int32 ``[batch]`` (0 gives a zero row). ``scale``
    defaults to ``head_dim ** -0.5``; ``sliding_window`` w keeps positions
    ``> pos - w``; ``soft_cap`` c maps logits to ``c * tanh(logits / c)``.
    ``num_splits`` overrides the split-KV count (Triton only). Returns ``out``
    ``[batch, num_q_heads, head_dim]`` in the query dtype. An fp8 cache is
    read as ``stored * scale`` inside the kernel.
    """
    memo, plan = _recall("decode", k_cache, v_cache, chunk_offsets, lambda: (
        *_meta(query), *_meta(block_tables), *_meta(context_lens), *(_NO_OUT if out is None else _meta(out)),
        type(scale), scale, type(sliding_window), sliding_window, type(soft_cap), soft_cap,
        type(num_splits), num_splits, backend))
    if plan is None:
        view, plan = _plan_decode(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                  soft_cap, out, num_splits, chunk_offsets, backend)
        _remember(memo, plan)
    else:
        view = k_cache
    if should_validate(validate, view.device):
        check_block_tables_values(view, block_tables, context_lens, sliding_window)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    plan(view, query, block_tables, context_lens, out)
    return out


def _plan_decode(query: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None, block_tables: Tensor,
                 context_lens: Tensor, scale: float | None, sliding_window: int | None, soft_cap: float | None,
                 out: Tensor | None, num_splits: int | None, chunk_offsets: Tensor | None,
                 backend: str) -> tuple[CacheView, Callable[..., None]]:
    """Checks a :func:`paged_decode_attention` call's metadata; returns the view and the
    launch ``(view, query, block_tables, context_lens, out)`` for calls of this signature."""
    view = _cache_view(k_cache, v_cache, chunk_offsets)
    q = check_query(query, view)
    batch = q.shape[0]
    tables = check_index(block_tables, "block_tables", (batch, None), view.device)
    check_index(context_lens, "context_lens", (batch,), view.device)
    check_options(scale, sliding_window, soft_cap)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= 256):
        raise KernelError(f"num_splits: expected an int in [1, 256] or None, got {num_splits!r}")
    out = check_out(out, q)
    scale = view.head_dim**-0.5 if scale is None else float(scale)
    if resolve_backend(backend, view.device) == "torch":
        def run_torch(view: CacheView, q: Tensor, tables: Tensor, ctx: Tensor, out: Tensor) -> None:
            out.copy_(reference.paged_decode_attention(
                q, view.k_chunks, view.v_chunks, tables, ctx, scale=scale, sliding_window=sliding_window,
                soft_cap=soft_cap, k_scale=view.k_scale, v_scale=view.v_scale))
        return view, run_torch
    if not batch:
        return view, _nothing
    return view, _triton_module("triton_decode", view.device).DecodeLaunch(
        q, view, tables, out, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, num_splits=num_splits)


def paged_prefill_attention(
    query: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None, block_tables: Tensor, cu_query_lens: Tensor,
    context_lens: Tensor, *, scale: float | None = None, sliding_window: int | None = None,
    soft_cap: float | None = None, out: Tensor | None = None, chunk_offsets: Tensor | None = None,
    backend: str = "auto", validate: bool | None = None,
) -> Tensor:
    """Causal attention of a ragged batch of new tokens over paged context.

    ``query``: ``[total_new_tokens, num_q_heads, head_dim]``; sequence i's
    new tokens are rows ``cu_query_lens[i]:cu_query_lens[i+1]`` (int32
    ``[batch + 1]``, starting at 0). ``context_lens``: int32 ``[batch]``, all
    tokens of sequence i including the new ones, whose K/V are already stored;
    new token j sits at position ``context_lens[i] - q_len_i + j`` and sees
    positions up to its own. Options as in :func:`paged_decode_attention`.
    Returns ``out`` ``[total_new_tokens, num_q_heads, head_dim]``.
    """
    memo, plan = _recall("prefill", k_cache, v_cache, chunk_offsets, lambda: (
        *_meta(query), *_meta(block_tables), *_meta(cu_query_lens), *_meta(context_lens),
        *(_NO_OUT if out is None else _meta(out)),
        type(scale), scale, type(sliding_window), sliding_window, type(soft_cap), soft_cap, backend))
    if plan is None:
        view, plan = _plan_prefill(query, k_cache, v_cache, block_tables, cu_query_lens, context_lens, scale,
                                   sliding_window, soft_cap, out, chunk_offsets, backend)
        _remember(memo, plan)
    else:
        view = k_cache
    if should_validate(validate, view.device):
        _check_prefill_values(view, query, block_tables, cu_query_lens, context_lens, sliding_window)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    plan(view, query, block_tables, cu_query_lens, context_lens, out)
    return out


def _plan_prefill(query: Tensor, k_cache: KVCacheArg | CacheView, v_cache: KVCacheArg | None,
                  block_tables: Tensor, cu_query_lens: Tensor, context_lens: Tensor, scale: float | None,
                  sliding_window: int | None, soft_cap: float | None, out: Tensor | None,
                  chunk_offsets: Tensor | None, backend: str) -> tuple[CacheView, Callable[..., None]]:
    """Checks a :func:`paged_prefill_attention` call's metadata; returns the view and the
    launch ``(view, query, block_tables, cu_query_lens, context_lens, out)``."""
    view = _cache_view(k_cache, v_cache, chunk_offsets)
    q = check_query(query, view)
    ctx = check_index(context_lens, "context_lens", (None,), view.device)
    batch = ctx.shape[0]
    tables = check_index(block_tables, "block_tables", (batch, None), view.device)
    check_index(cu_query_lens, "cu_query_lens", (batch + 1,), view.device)
    check_options(scale, sliding_window, soft_cap)
    out = check_out(out, q)
    scale = view.head_dim**-0.5 if scale is None else float(scale)
    if resolve_backend(backend, view.device) == "torch":
        def run_torch(view: CacheView, q: Tensor, tables: Tensor, cu: Tensor, ctx: Tensor, out: Tensor) -> None:
            out.copy_(reference.paged_prefill_attention(
                q, view.k_chunks, view.v_chunks, tables, cu, ctx, scale=scale, sliding_window=sliding_window,
                soft_cap=soft_cap, k_scale=view.k_scale, v_scale=view.v_scale))
        return view, run_torch
    if not (q.shape[0] and batch):
        return view, _nothing
    return view, _triton_module("triton_prefill", view.device).PrefillLaunch(
        q, view, tables, ctx, out, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)


def _check_prefill_values(view: CacheView, q: Tensor, tables: Tensor, cu: Tensor, ctx: Tensor,
                          sliding_window: int | None) -> None:
    """The value checks of a prefill call (they read the tensors: CPU, or ``validate=True``)."""
    batch = ctx.shape[0]
    cu_l = cu.long()
    q_lens = cu_l[1:] - cu_l[:-1]
    if int(cu_l[0]) != 0 or int(cu_l[-1]) != q.shape[0]:
        raise KernelError(f"cu_query_lens: expected to run from 0 to {q.shape[0]}, got {int(cu_l[0])}..{int(cu_l[-1])}")
    if batch and int(q_lens.min()) < 0:
        raise KernelError(f"cu_query_lens: expected non-decreasing values, got {cu.tolist()}")
    if batch and bool((q_lens > ctx.long()).any()):
        i = int((q_lens > ctx.long()).nonzero()[0])
        raise KernelError(f"context_lens[{i}]={int(ctx[i])} is shorter than its {int(q_lens[i])} new tokens")
    check_block_tables_values(view, tables, ctx, sliding_window, q_lens)


def _as_ids(ids: object, name: str) -> Tensor:
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise KernelError(f"{name}: expected a 1-D int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        return ids
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise KernelError(f"{name}: expected a 1-D sequence of ints, got {arr.dtype} of shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64))


def copy_blocks(
    chunks: Tensor | Sequence[Tensor], src: object, dst: object, *,
    chunk_offsets: Tensor | None = None, backend: str = "auto", validate: bool | None = None,
) -> None:
    """Copies every layer's keys and values of block ``src[i]`` to ``dst[i]``.

    ``chunks``: the whole storage ``[num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]`` or its chunks of that shape (contiguous within
    a block). ``src``/``dst``: ``[n]`` block ids as int tensors, lists or numpy
    arrays. ``dst`` must hold no duplicates and share no id with ``src`` (a
    block may be copied to several places). One launch moves everything;
    fp8 chunks move as bytes.
    ``validate`` (default: when the ids are on the host) checks all of that.
    """
    cs = as_chunks(chunks, "chunks", 6)
    c0 = cs[0]
    if c0.shape[1] != 2:
        raise KernelError(f"chunks: expected dim 1 of size 2 (keys, values), got shape {tuple(c0.shape)}")
    if c0.dtype not in STORAGE_DTYPES:
        raise KernelError(f"chunks dtype: expected one of {STORAGE_DTYPES}, got {c0.dtype}")
    block_size, heads, head_dim = c0.shape[3:]
    if c0.stride()[3:] != (heads * head_dim, head_dim, 1):
        raise KernelError(f"chunks: expected contiguous [block_size, heads, head_dim] blocks, got strides {c0.stride()}")
    num_blocks = c0.shape[2] * len(cs)
    s, d = _as_ids(src, "src"), _as_ids(dst, "dst")
    if s.numel() != d.numel():
        raise KernelError(f"src and dst: expected the same length, got {s.numel()} and {d.numel()}")
    on_host = s.device.type == "cpu" and d.device.type == "cpu"
    do_validate = validate if validate is not None else (on_host or c0.device.type == "cpu")
    if do_validate and s.numel():
        for name, ids in (("src", s), ("dst", d)):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= num_blocks:
                raise KernelError(f"{name}: block id {lo if lo < 0 else hi} is outside the pool of {num_blocks} blocks")
        if torch.unique(d).numel() != d.numel():
            raise KernelError(f"dst: expected distinct block ids, got duplicates in {d.tolist()[:32]}")
        both = torch.isin(d.to(s.device), s)
        if bool(both.any()):
            raise KernelError(f"dst: block id {int(d[both.to(d.device)][0])} is also a source; copies would depend on order")
    offsets = resolve_offsets(cs, None, chunk_offsets)
    if offsets is None and chunk_offsets is not None:  # a pool of one chunk now, more later: one variant
        offsets = chunk_offsets
    if not s.numel():
        return
    s, d = s.to(c0.device).contiguous(), d.to(c0.device).contiguous()
    if is_fp8(c0.dtype):  # bytes, not numbers: no conversion can touch them (same strides and offsets)
        cs = tuple(c.view(torch.uint8) for c in cs)
    if resolve_backend(backend, c0.device) == "torch":
        reference.copy_blocks(cs, s, d)
    else:
        _triton_module("triton_store", c0.device).launch_copy(cs, offsets, s, d)
