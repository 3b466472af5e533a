"""Units and limits of the config layer: storage dtypes, byte sizes, field bounds.

``parse_bytes("24GiB")`` and ``format_bytes(3 * 2**30)`` are the one byte-size
reader and writer; :func:`resolve_dtype` the one reader of model dtypes and
:func:`resolve_kv_dtype` of KV storage dtypes (the model dtypes and fp8). The limits
bound every :class:`~kvforge.config.CacheConfig` field far above any real model,
so that a mistaken value is refused when the config is built instead of
failing later in an allocation.
"""
from __future__ import annotations

import numbers
import re
from fractions import Fraction
from typing import Any

import torch

from kvforge.errors import ConfigError

__all__ = ["FP8_DTYPES", "MAX_BLOCK_SIZE", "MAX_BYTES", "MAX_HEAD_DIM", "MAX_NUM_BLOCKS", "MAX_NUM_KV_HEADS",
           "MAX_NUM_LAYERS", "MODEL_DTYPES", "format_bytes", "is_fp8", "parse_bytes", "positive_int", "resolve_dtype",
           "resolve_kv_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

#: The dtypes a model computes in (queries, keys and values before they are stored).
MODEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

#: The fp8 KV storage formats: OCP e4m3 (no infinities, max 448, 3 mantissa bits) and
#: e5m2 (max 57344, 2 mantissa bits). One byte an element; see ``docs/fp8.md``.
FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)

_FP8_NAMES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn, "e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2, "e5m2": torch.float8_e5m2,
}
#: ROCm's fp8 variants (finite, unsigned zero, exponent bias 8 / 16): refused by name
_FNUZ_NAMES = ("fp8_e4m3fnuz", "float8_e4m3fnuz", "e4m3fnuz", "fp8_e5m2fnuz", "float8_e5m2fnuz", "e5m2fnuz")
_FNUZ_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

#: The largest byte size :func:`parse_bytes` reads and a :class:`CacheConfig` may take
#: (``estimated_memory_bytes()``): 2**60 bytes (1 EiB), far beyond any device, well
#: inside int64 (so sizes stay exact in numpy and torch).
MAX_BYTES = 2**60
#: Per-field upper bounds of :class:`CacheConfig` (far above any real model; a value
#: above them is a mistake, not a model). Block ids are int32 in the block tables,
#: hence ``MAX_NUM_BLOCKS``.
MAX_BLOCK_SIZE = 2**20
MAX_NUM_BLOCKS = 2**31 - 1
MAX_NUM_LAYERS = 2**16
MAX_NUM_KV_HEADS = 2**16
MAX_HEAD_DIM = 2**16
_FIELD_LIMITS = {"block_size": (MAX_BLOCK_SIZE, "2**20"), "num_blocks": (MAX_NUM_BLOCKS, "2**31 - 1: block ids are int32"),
                 "num_layers": (MAX_NUM_LAYERS, "2**16"), "num_kv_heads": (MAX_NUM_KV_HEADS, "2**16"),
                 "head_dim": (MAX_HEAD_DIM, "2**16")}


def resolve_dtype(value: Any, field_name: str = "dtype") -> torch.dtype:
    """A torch dtype from a dtype or its name (``"bfloat16"``, ``"bf16"``, ``"torch.float16"``)."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ConfigError(f"{field_name}={value!r} is not a supported KV cache dtype "
                          f"(supported: {sorted({str(d).removeprefix('torch.') for d in _DTYPES.values()})})")
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"{field_name}={value!r} is not a known dtype "
                      f"(use one of {sorted(_DTYPES)})")


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the fp8 KV storage formats (:data:`FP8_DTYPES`)."""
    return dtype in FP8_DTYPES


def resolve_kv_dtype(value: Any, field_name: str = "dtype") -> torch.dtype:
    """The KV cache's storage dtype: a model dtype (:func:`resolve_dtype`'s names) or fp8.

    fp8 names: ``"fp8"`` / ``"fp8_e4m3"`` / ``"fp8_e4m3fn"`` / ``"float8_e4m3fn"``
    (torch.float8_e4m3fn) and ``"fp8_e5m2"`` / ``"float8_e5m2"`` (torch.float8_e5m2), or
    the torch dtypes themselves. ROCm's e4m3fnuz / e5m2fnuz are refused with a
    :class:`ConfigError` that says to use ``"fp8_e4m3"``, which the kernels decode in
    software where the hardware has no OCP fp8 (``docs/fp8.md``)."""
    if isinstance(value, torch.dtype):
        if value in FP8_DTYPES:
            return value
        if value in _FNUZ_DTYPES:
            raise ConfigError(_fnuz_message(field_name, value))
        if value in _DTYPES.values():
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _FP8_NAMES:
            return _FP8_NAMES[key]
        if key in _FNUZ_NAMES:
            raise ConfigError(_fnuz_message(field_name, value))
        if key in _DTYPES:
            return _DTYPES[key]
    names = sorted(_DTYPES) + sorted(_FP8_NAMES)
    raise ConfigError(f"{field_name}={value!r} is not a supported KV cache dtype (use one of {names} "
                      f"or torch.float16 / bfloat16 / float32 / float8_e4m3fn / float8_e5m2)")


def _fnuz_message(field_name: str, value: Any) -> str:
    return (f"{field_name}={value!r}: ROCm's fnuz fp8 formats are not supported as KV storage; use 'fp8_e4m3' "
            f"(OCP e4m3fn, the format checkpoints' k_scale/v_scale refer to), which the kernels decode in "
            f"software on hardware without OCP fp8, ROCm included (docs/fp8.md)")


def format_bytes(num_bytes: int | float) -> str:
    """``3 * 2**30`` -> ``'3.00 GiB'``; plain bytes print without decimals."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 2**20, "mb": 10**6,
               "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40,
               "p": 2**50, "pb": 10**15, "pib": 2**50, "e": 2**60, "eb": 10**18, "eib": 2**60}


def parse_bytes(text: str | int) -> int:
    """``'24GiB'`` -> ``25769803776``; ``'512 MB'`` uses powers of ten, ``'G'`` powers of two.

    Integers pass through unchanged (callers check the sign: a computed budget may be
    negative). A string is a non-negative decimal number and a unit (B, K/KiB/KB, M,
    G, T, P, E); the result is exact (no float rounding) and at most
    :data:`MAX_BYTES`. Anything else (``'-1GiB'``, ``'nan'``, ``'inf'``, ``'1e400GiB'``,
    a bool, a size above 1 EiB) raises :class:`ConfigError` naming the value."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        return int(text)
    match = _BYTES_RE.match(str(text))
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ConfigError(f"cannot read a byte size from {text!r} (examples: '24GiB', '512MiB', '8G')")
    value = int(Fraction(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    if value > MAX_BYTES:
        raise ConfigError(f"byte size {text!r} exceeds the limit of 1 EiB (2**60 bytes)")
    return value


def positive_int(name: str, value: Any, limit: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a positive integer, got {value!r:.60}")
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ConfigError(f"{name}={value} exceeds the limit of {limit}" + (f" ({why})" if why else ""))
    return int(value)
