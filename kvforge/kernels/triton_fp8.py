"""fp8 in the Triton kernels: the store's encoder, the readers' decoders, the path choice.

Writing. :func:`encode_fp8` turns float32 ``y = x / scale`` (already divided,
correctly rounded) into the fp8 byte by integer arithmetic on its bits:
saturated to the format's largest finite value, rounded to nearest even
(normal and subnormal range alike), NaN kept a NaN. It needs no fp8
support from the hardware or the compiler, so the store kernel writes the
same bytes everywhere (on a GPU, under the interpreter, on ROCm), bit for
bit what :func:`kvforge.kernels.fp8.quantize` gives in torch. (The Triton
interpreter's own fp32 -> fp8 cast does not round to nearest even, loses
subnormals and overflows to NaN: it is never used.)

Reading. The attention kernels read fp8 in one of two ways, chosen per
launch by :func:`decode_mode`:

- *native* (``FP8 = 1``): the chunks are fp8 pointers and the tile is cast
  to the model dtype (``cvt`` instructions on sm89+, i.e. Ada and Hopper;
  the interpreter's upcast is exact for every finite value);
- *bits* (``FP8 = 2`` for e4m3, ``3`` for e5m2): the chunks are read as
  ``uint8`` and :func:`fp8_bits_to_f16` rebuilds a float16 by shifts (e5m2
  is the top byte of a float16; e4m3 lands as ``value / 256``, exact,
  subnormals included, and :data:`RAW_MUL` folds the 256 back into the
  scale). Any GPU runs it: Ampere, ROCm, anything without OCP fp8.

On CUDA the decode kernel's native e4m3 reads take the values as int16 pairs
of columns (mode 4, :func:`paired_values`, converted by
:func:`e4m3_pairs_to_f16`); ``FORCE_DECODE = "cast"`` keeps mode 1.

Either way the values reach ``tl.dot`` exactly (every e4m3 and e5m2 value is
a float16): in the model dtype, except that a bfloat16 model's native reads
compute in float16 (the kernels' ``HALF_DOTS``: fp8 widens to float16 in one
instruction, to bfloat16 in several; the query is converted once, saturated
at 65504, NaN kept). The
per-head scales are applied in float32 outside the dot: the key scale with
the softmax scale, the value scale on the normalized output.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["encode_fp8", "fp8_bits_to_f16", "e4m3_pairs_to_f16", "decode_mode", "paired_values", "raw_mul",
           "FORCE_DECODE", "E4M3"]

#: Set to "native" or "bits" to force the read path of every launch (tests, benchmarks), or "cast" for
#: native reads without the decode kernel's paired values (mode 1 only); None: automatic.
FORCE_DECODE: str | None = None

E4M3 = torch.float8_e4m3fn


@triton.jit
def encode_fp8(y, IS_E4M3: tl.constexpr):
    """float32 ``y`` -> fp8 bytes (uint8): saturate, round to nearest even, NaN stays NaN."""
    if IS_E4M3:
        FMAX: tl.constexpr = 448.0
        MANT: tl.constexpr = 3
        BIAS_DIFF: tl.constexpr = 120  # 127 - 7
        SUB_SHIFT0: tl.constexpr = 141  # 150 - 9: subnormal step 2**-9
    else:
        FMAX: tl.constexpr = 57344.0
        MANT: tl.constexpr = 2
        BIAS_DIFF: tl.constexpr = 112  # 127 - 15
        SUB_SHIFT0: tl.constexpr = 134  # 150 - 16: subnormal step 2**-16
    SHIFT: tl.constexpr = 23 - MANT
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31).to(tl.uint8) << 7
    a = tl.minimum(tl.abs(y), FMAX)
    ab = a.to(tl.uint32, bitcast=True)
    # normal range: round the float32 mantissa to MANT bits, to nearest even (a carry bumps the exponent)
    normal = ((ab + ((1 << (SHIFT - 1)) - 1) + ((ab >> SHIFT) & 1)) >> SHIFT) - (BIAS_DIFF << MANT)
    # subnormal range: the 24-bit significand shifted down to the subnormal step, to nearest even
    e32 = (ab >> 23).to(tl.int32)
    sig = (ab & 0x7FFFFF) | 0x800000
    # >= 21 (e4m3) / 22 (e5m2) below the normal range; clamped so that no shift is out of range elsewhere
    s = tl.minimum(tl.maximum(SUB_SHIFT0 - e32, 1), 25).to(tl.uint32)
    q = sig >> s
    rem = sig & ((1 << s) - 1)
    half = 1 << (s - 1)
    sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.uint32)
    is_sub = e32 < (BIAS_DIFF + 1)
    byte = tl.where(is_sub, sub, normal).to(tl.uint8) | sign
    return tl.where(y != y, sign | 0x7F, byte).to(tl.uint8)  # NaN keeps its sign, as torch's cast does


@triton.jit
def fp8_bits_to_f16(b, IS_E4M3: tl.constexpr):
    """fp8 bytes (uint8) -> float16: e5m2 exactly, e4m3 as ``value / 256`` (exactly); an e4m3
    NaN (``S.1111.111``, which the shift would read as 480 / 256) reads as a float16 NaN."""
    h = b.to(tl.int16)
    if IS_E4M3:
        nan = (h & 0x7F) == 0x7F
        h = tl.where(nan, 0x7E00, ((h & 0x7F) << 7) | ((h & 0x80) << 8)).to(tl.int16)
    else:
        h = h << 8
    return h.to(tl.float16, bitcast=True)


@triton.jit
def e4m3_pairs_to_f16(w):
    """int16 words of two e4m3 bytes each (columns ``2j``, ``2j+1`` of one token) -> the float16
    of every even byte and of every odd byte, by the sm89+ ``cvt.rn.f16x2.e4m3x2``. Two words at
    a time: a tile laid out for ``tl.dot``'s B operand holds the words of tokens ``n`` and ``n+1``
    in one register, so one ``prmt`` pairs their bytes along the tokens (CUDA only)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; .reg .b16 e, o; prmt.b32 t, $2, 0, 0x3120; mov.b32 {e, o}, t; "
        "cvt.rn.f16x2.e4m3x2 $0, e; cvt.rn.f16x2.e4m3x2 $1, o; }",
        "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@functools.lru_cache(maxsize=None)
def _native_ok(device_type: str, index: int) -> bool:
    if device_type != "cuda":
        return True  # the interpreter: exact upcasts
    if torch.version.hip is not None:
        return False  # ROCm: OCP fp8 is not native on every part; the bits path runs everywhere
    return torch.cuda.get_device_capability(index) >= (8, 9)


def decode_mode(cache_dtype: torch.dtype, device: torch.device) -> int:
    """The ``FP8`` constexpr of a read: 1 native, 2 bits (e4m3), 3 bits (e5m2)."""
    if FORCE_DECODE in ("native", "cast"):
        return 1
    if FORCE_DECODE != "bits":
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        if _native_ok(device.type, index):
            return 1
    return 2 if cache_dtype == E4M3 else 3


def paired_values(mode: int, cache_dtype: torch.dtype, device: torch.device, block_d: int,
                  query_dtype: torch.dtype, values: torch.Tensor | None = None) -> int:
    """The decode kernel's read mode: ``4`` (native keys, values as int16 pairs converted by
    :func:`e4m3_pairs_to_f16`) where that path applies, else ``mode``. It applies to a native
    e4m3 read (``mode`` 1) compiled for CUDA (sm89+: :func:`decode_mode` chose native; not the
    interpreter, which runs no PTX), a tile of at least 32 columns, a 16-bit model and a value
    chunk (``values``, the first one) that reads as int16 (even storage offset and strides);
    otherwise the tile is cast as in mode 1."""
    if (mode == 1 and cache_dtype == E4M3 and device.type == "cuda" and torch.version.hip is None
            and isinstance(e4m3_pairs_to_f16, triton.runtime.JITFunction)
            and block_d >= 32 and query_dtype in (torch.float16, torch.bfloat16) and FORCE_DECODE != "cast"
            and (values is None or not (values.storage_offset() | values.stride(0) | values.stride(1)
                                        | values.stride(2)) & 1)):
        return 4
    return mode


def raw_mul(mode: int) -> float:
    """The factor a read path's raw values carry: the bits path reads e4m3 as value / 256."""
    return 256.0 if mode == 2 else 1.0
