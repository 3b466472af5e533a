"""Units and limits of the config layer: storage dtypes, byte sizes, field bounds.

``parse_bytes("24GiB")`` and ``format_bytes(3 * 2**30)`` are the one byte-size
reader and writer; :func:`resolve_dtype` the one dtype reader. The limits
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

__all__ = ["MAX_BLOCK_SIZE", "MAX_BYTES", "MAX_HEAD_DIM", "MAX_NUM_BLOCKS", "MAX_NUM_KV_HEADS", "MAX_NUM_LAYERS",
           "format_bytes", "parse_bytes", "positive_int", "resolve_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

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
