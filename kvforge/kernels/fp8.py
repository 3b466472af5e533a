"""fp8 KV storage: the formats, their scales, and quantization in torch.

An fp8 cache stores ``q = saturate(x / scale)`` rounded to nearest even in
``torch.float8_e4m3fn`` (max 448, 3 mantissa bits) or ``torch.float8_e5m2``
(max 57344, 2 mantissa bits), and reads ``x ~= q * scale``. ``scale`` is a
float32 per KV head of one layer, ``[num_kv_heads]``, one tensor for keys and
one for values (a per-tensor scale is the same value on every head). The
kernels never divide by it on the read side: the key scale folds into the
softmax scale and the value scale into the output normalization, so
dequantizing costs nothing per element beyond the fp8 -> model-dtype cast.

Saturation, not overflow: a value beyond the format's range (``+-inf``
included) is stored as the largest finite one, never as inf or NaN (torch's
plain ``.to(float8_e4m3fn)`` would give NaN on some devices). NaN stays NaN.
This module is the torch side (the reference kernels, ``gather()``, the
tests); :mod:`kvforge.kernels.triton_fp8` is the Triton side, bit for bit the
same.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from kvforge.errors import KernelError

__all__ = ["FP8_DTYPES", "FP8_MAX", "KVScales", "is_fp8", "fp8_max", "quantize", "dequantize", "as_scale",
           "scale_for_amax"]

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
#: the largest finite value of each format (where saturation clamps)
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class KVScales(NamedTuple):
    """One layer's dequantization scales, float32 ``[num_kv_heads]`` each: ``x = stored * scale``."""

    k_scale: Tensor
    v_scale: Tensor


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is an fp8 KV storage format."""
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 format (448 for e4m3, 57344 for e5m2)."""
    return FP8_MAX[dtype]


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` ``[..., num_kv_heads, head_dim]`` (any float dtype) to ``dtype`` (fp8):
    ``saturate(x / scale)`` rounded to nearest even, ``scale`` float32 ``[num_kv_heads]``.

    The division is float32 (correctly rounded), then clamped to the format's
    range (inf saturates, NaN stays NaN), then converted (exact rounding: torch's
    cast of an in-range float32)."""
    m = FP8_MAX[dtype]
    y = x.float() / scale.to(x.device, torch.float32)[:, None]
    return y.clamp(-m, m).to(dtype)


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q`` ``[..., num_kv_heads, head_dim]`` (fp8) times ``scale`` ``[num_kv_heads]``,
    computed in float32, returned in ``dtype``."""
    return (q.float() * scale.to(q.device, torch.float32)[:, None]).to(dtype)


def as_scale(value: object, name: str, num_kv_heads: int, device: torch.device) -> Tensor:
    """A scale argument as a float32 ``[num_kv_heads]`` tensor on ``device``.

    ``value``: a positive finite number, or a float tensor of shape ``[]``, ``[1]``
    (per tensor) or ``[num_kv_heads]`` (per head). A float32 ``[num_kv_heads]``
    contiguous tensor already on ``device`` is returned as is (the caller may
    update it in place; the kernels read it at launch); anything else is copied.
    Values are checked (positive, finite) for numbers and for tensors on the
    CPU; a device tensor's values are the caller's to check (no sync here)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise KernelError(f"{name}: expected a positive number or a float tensor, got {type(value).__name__}")
    if isinstance(value, numbers.Real):
        if not math.isfinite(value) or value <= 0:
            raise KernelError(f"{name}: expected a positive finite scale, got {value!r}")
        return torch.full((num_kv_heads,), float(value), dtype=torch.float32, device=device)
    t = value
    if not t.dtype.is_floating_point or is_fp8(t.dtype):
        raise KernelError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
    if tuple(t.shape) not in ((), (1,), (num_kv_heads,)):
        raise KernelError(f"{name}: expected shape [], [1] or [{num_kv_heads}] (num_kv_heads), got {tuple(t.shape)}")
    if t.device.type == "cpu":
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            first = t.reshape(-1)[bad.reshape(-1)][0].item()
            raise KernelError(f"{name}: expected positive finite scales, got {first!r}")
    if t.dtype == torch.float32 and tuple(t.shape) == (num_kv_heads,) and t.device == device and t.is_contiguous():
        return t
    return t.to(device=device, dtype=torch.float32).reshape(-1).expand(num_kv_heads).contiguous()


def scale_for_amax(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The scale that maps ``amax`` (float, any shape) to the format's largest value:
    ``amax / fp8_max``, and 1.0 where ``amax`` is 0 or not finite (nothing to
    calibrate from). Float32, same shape."""
    a = amax.float()
    s = a / FP8_MAX[dtype]
    ok = torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))
