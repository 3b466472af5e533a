"""Paged-attention kernels over kvforge's chunked KV storage.

Triton kernels on CUDA/ROCm devices and a pure-torch reference everywhere
(the CPU default and the test oracle). The kernels take plain tensors and
block tables; they never see the pool or the engine. See ``docs/kernels.md``.

- :func:`store_kv` writes new keys/values into their slots;
- :func:`paged_decode_attention`: one token per sequence, split-KV;
- :func:`paged_prefill_attention`: ragged causal new tokens over paged context;
- :func:`copy_blocks`: all layers of many blocks in one launch;
- :func:`chunk_offsets`: the per-chunk offset table to precompute once;
- :func:`describe_cache` -> :class:`CacheView`: one layer's chunk lists
  checked once, with their offset table; every entry point but
  :func:`copy_blocks` takes it in place of ``k_cache`` (``v_cache=None``);
- :func:`warm_up_prefill`: compile every prefill kernel variant up front.

fp8 caches (``torch.float8_e4m3fn`` / ``float8_e5m2`` chunks) are described
with their scales and model dtype (``describe_cache(k, v, k_scale=...,
v_scale=..., model_dtype=...)``); :mod:`kvforge.kernels.fp8` holds the torch
quantization (:func:`quantize_fp8`, :func:`dequantize_fp8`). See ``docs/fp8.md``.
"""
from __future__ import annotations

from kvforge.kernels import fp8, reference
from kvforge.kernels.fp8 import FP8_DTYPES, KVScales
from kvforge.kernels.fp8 import dequantize as dequantize_fp8
from kvforge.kernels.fp8 import quantize as quantize_fp8
from kvforge.kernels.layout import CacheView, KVCacheArg, chunk_offsets, describe_cache
from kvforge.kernels.ops import copy_blocks, paged_decode_attention, paged_prefill_attention, store_kv


def warm_up_prefill(view: CacheView, num_q_heads: int, *, scale: float | None = None,
                    sliding_window: int | None = None, soft_cap: float | None = None, backend: str = "auto",
                    batch_sizes: tuple[int, ...] = (1,)) -> int:
    """Compile every variant of the Triton prefill kernel that :func:`paged_prefill_attention`
    can launch over ``view`` (one per tile height: the rows per sequence pick it), so that no
    request waits for a compile; the number of launches, 0 where the torch backend runs (the
    CPU). Reads block 0 of ``view``, writes nothing in the cache."""
    from kvforge.kernels.checks import resolve_backend
    from kvforge.kernels.ops import _triton_module
    if resolve_backend(backend, view.device) == "torch":
        return 0
    return _triton_module("triton_prefill", view.device).warm_up_prefill(
        view, num_q_heads, scale=view.head_dim**-0.5 if scale is None else float(scale),
        sliding_window=sliding_window, soft_cap=soft_cap, batch_sizes=batch_sizes)

__all__ = [
    "CacheView",
    "FP8_DTYPES",
    "KVCacheArg",
    "KVScales",
    "chunk_offsets",
    "copy_blocks",
    "dequantize_fp8",
    "describe_cache",
    "fp8",
    "quantize_fp8",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reference",
    "store_kv",
    "warm_up_prefill",
]
