"""The chunked KV storage layout, as the kernels see it.

The cache keeps its keys and values in one or more *chunks*, each a separate
allocation of shape ``[num_layers, 2, chunk_blocks, block_size, num_kv_heads,
head_dim]`` (index 0 of dim 1 holds keys, index 1 values). Physical block id
``b`` lives in chunk ``b // chunk_blocks`` at local index ``b % chunk_blocks``.
For one layer the kernels take ``k_cache = [chunk[l, 0] for chunk in chunks]``
(views ``[chunk_blocks, block_size, num_kv_heads, head_dim]``) and the same
for values; a single chunk may be passed as a plain tensor.

Triton kernels address every chunk from the first chunk's base pointer plus
an int64 table of *element offsets* of each chunk relative to chunk 0
(:func:`chunk_offsets`). The key and value lists are views of the same chunk
tensors at the same position, so one table serves both.

A layer is described once: :func:`describe_cache` checks its chunk lists and
resolves the offset table into a :class:`CacheView`, which every kernel entry
point takes in place of ``k_cache`` (with ``v_cache=None``) and then trusts,
so a model that calls the kernels once per layer per step pays for the checks
only when the chunk set changes.
"""
from __future__ import annotations

import itertools
import numbers

from collections import abc
from typing import Iterable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from kvforge.errors import KernelError
from kvforge.kernels.fp8 import FP8_DTYPES, as_scale

__all__ = [
    "KVCacheArg", "CacheView", "as_chunks", "chunk_offsets", "describe_cache", "resolve_offsets",
    "SUPPORTED_DTYPES", "STORAGE_DTYPES", "SUPPORTED_HEAD_DIMS", "check_block_size", "check_head_dim",
    "padded_head_dim",
]

#: A per-layer cache: one tensor ``[num_blocks, block_size, num_kv_heads,
#: head_dim]`` or a sequence of chunk views of that shape.
KVCacheArg = Union[Tensor, Sequence[Tensor]]

#: The dtypes queries, keys and values come in (and a non-fp8 cache stores).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Every dtype a cache may store: the model dtypes and fp8 (:mod:`kvforge.kernels.fp8`).
STORAGE_DTYPES = SUPPORTED_DTYPES + FP8_DTYPES
#: Head dims every backend runs: the multiples of :data:`HEAD_DIM_MULTIPLE` from
#: 8 to :data:`MAX_HEAD_DIM` (80, 96, 112 and 192 included). The Triton kernels
#: tile a head dim that is not a power of two with the next one
#: (:func:`padded_head_dim`) and mask the padding; 256 bounds the register tile.
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
SUPPORTED_HEAD_DIMS = tuple(range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))


def check_head_dim(head_dim: int) -> None:
    """Raises :class:`KernelError` unless ``head_dim`` is in :data:`SUPPORTED_HEAD_DIMS`."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise KernelError(
            f"head_dim: expected a multiple of {HEAD_DIM_MULTIPLE} from {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM}, "
            f"got {head_dim}")


def check_block_size(block_size: int) -> None:
    """Raises :class:`KernelError` unless ``block_size`` is a power of two (1, 2, 4, ...).

    Every backend indexes a page by division, so any power of two works,
    1 included (a page per token)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise KernelError(f"block_size: expected a power of two (1, 2, 4, 8, ...), got {block_size}")


def padded_head_dim(head_dim: int) -> int:
    """The Triton tile width for ``head_dim``: the next power of two, at least 16.

    ``tl.dot`` needs every dimension >= 16; a head dim that is already such a
    power of two is its own tile, so its kernels carry no mask on it."""
    return max(16, 1 << (head_dim - 1).bit_length())


class _CacheViewFields(NamedTuple):
    """One layer's K and V chunk lists, checked, with their offset table.

    Build it with :func:`describe_cache` (never by hand: the kernels trust
    every field) and pass it as ``k_cache`` with ``v_cache=None``. It holds
    references to the chunk views, so it keeps their storage alive: rebuild
    it, and drop the old one, whenever the chunk set changes.
    ``offsets``: int64 ``[num_chunks]`` element offsets of each chunk from
    chunk 0, on the chunks' device; None for one chunk unless ``max_chunks``
    (the most chunks the storage may reach; 0: the chunks given) is above 1.

    ``dtype`` is the dtype of the queries, keys, values and outputs the
    kernels take and give (the model dtype); ``cache_dtype`` the dtype the
    chunks store. They differ for an fp8 cache, whose ``k_scale`` /
    ``v_scale`` (float32 ``[num_kv_heads]`` on the device, read at every
    launch, so an in-place update is seen by the next one) dequantize it:
    ``x = stored * scale``. Both are None otherwise.

    ``serial``: a number unique to each :func:`describe_cache` call (0: a view
    made otherwise). The kernel entry points remember the launch they built for
    a view by its serial and the call's tensor metadata, so repeating a call
    over the same view checks and prepares nothing again.
    """

    k_chunks: tuple[Tensor, ...]
    v_chunks: tuple[Tensor, ...]
    chunk_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    offsets: Tensor | None
    cache_dtype: torch.dtype | None = None
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None
    max_chunks: int = 0
    serial: int = 0

    @property
    def is_fp8(self) -> bool:
        """Whether the chunks hold fp8 (quantized with ``k_scale`` / ``v_scale``)."""
        return self.k_scale is not None

    @property
    def num_chunks(self) -> int:
        return len(self.k_chunks)

    @property
    def num_blocks(self) -> int:
        return self.chunk_blocks * len(self.k_chunks)

    @property
    def chunks_pad(self) -> int:
        """The kernels' chunk-table width: a power of two that holds :attr:`num_chunks` and
        ``max_chunks``, so it stays the same (no recompile) as an elastic pool's count changes."""
        return 1 << (max(self.num_chunks, self.max_chunks) - 1).bit_length()

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


class CacheView(_CacheViewFields):
    __doc__ = _CacheViewFields.__doc__
    __slots__ = ()

    # A copy is not the described view: the kernels' launch memo, keyed on the serial, must
    # not take it for one (a deep copy holds other tensors; an unpickled one, another
    # process's). Every way to copy one gives serial 0, so the copy is checked at each call.

    def _replace(self, /, **fields: object) -> CacheView:
        """A copy with ``fields`` changed, serial 0."""
        return super()._replace(**fields)

    @classmethod
    def _make(cls, iterable: Iterable[object]) -> CacheView:
        fields = list(iterable)
        fields[-1] = 0
        return tuple.__new__(cls, fields)

    def __getnewargs__(self) -> tuple[object, ...]:  # copy.copy, copy.deepcopy, pickle
        return (*self[:-1], 0)


def as_chunks(cache: KVCacheArg, name: str, ndim: int) -> tuple[Tensor, ...]:
    """Normalizes a tensor or a sequence of tensors to a non-empty tuple.

    Every chunk must be a tensor of ``ndim`` dims with the same shape,
    strides, dtype and device as the first.
    """
    chunks: tuple[Tensor, ...]
    if isinstance(cache, Tensor):
        chunks = (cache,)
    elif isinstance(cache, abc.Sequence):
        chunks = tuple(cache)
    else:
        raise KernelError(f"{name}: expected a tensor or a sequence of tensors, got {type(cache).__name__}")
    if not chunks:
        raise KernelError(f"{name}: expected at least one chunk, got an empty sequence")
    first = chunks[0]
    for j, c in enumerate(chunks):
        if not isinstance(c, Tensor):
            raise KernelError(f"{name}[{j}]: expected a tensor, got {type(c).__name__}")
        if c.dim() != ndim:
            raise KernelError(f"{name}[{j}]: expected {ndim} dims, got shape {tuple(c.shape)}")
        if c.shape != first.shape or c.stride() != first.stride():
            raise KernelError(
                f"{name}[{j}]: shape {tuple(c.shape)} strides {c.stride()} differ from chunk 0's "
                f"shape {tuple(first.shape)} strides {first.stride()}"
            )
        if c.dtype != first.dtype or c.device != first.device:
            raise KernelError(
                f"{name}[{j}]: dtype/device {c.dtype}/{c.device} differ from chunk 0's {first.dtype}/{first.device}"
            )
    return chunks


def _offsets_list(chunks: Sequence[Tensor], name: str) -> list[int]:
    size = chunks[0].element_size()
    base = chunks[0].data_ptr()
    offsets = []
    for j, c in enumerate(chunks):
        delta = c.data_ptr() - base
        # the kernels promise the compiler 16-element alignment (vector loads)
        if delta % (16 * size):
            raise KernelError(
                f"{name}[{j}]: byte distance {delta} to chunk 0 is not a multiple of 16 elements of {size} bytes"
            )
        offsets.append(delta // size)
    return offsets


def chunk_offsets(chunks: Sequence[Tensor]) -> Tensor:
    """Element offsets of every chunk relative to chunk 0.

    ``chunks``: tensors of equal shape, strides, dtype and device (whole
    chunks ``[num_layers, 2, chunk_blocks, ...]`` or per-layer views; the
    offsets are the same either way). Returns an int64 tensor ``[num_chunks]``
    on the chunks' device; entry 0 is 0. Every offset must be a multiple of
    16 elements (separate allocations always are; the kernels rely on it for
    vector loads). Compute it once per chunk set and pass it as
    ``chunk_offsets=`` to the kernels.
    """
    seq = (chunks,) if isinstance(chunks, Tensor) else tuple(chunks)
    if not seq or not isinstance(seq[0], Tensor):
        raise KernelError("chunks: expected a tensor or a non-empty sequence of tensors")
    seq = as_chunks(seq, "chunks", seq[0].dim())
    return torch.tensor(_offsets_list(seq, "chunks"), dtype=torch.int64, device=seq[0].device)


#: serials of described views (from 1; 0 marks a view made by hand)
_SERIALS = itertools.count(1)


def describe_cache(k_cache: KVCacheArg, v_cache: KVCacheArg, chunk_offsets: Tensor | None = None, *,
                   k_scale: Tensor | float | None = None, v_scale: Tensor | float | None = None,
                   model_dtype: torch.dtype | None = None, max_chunks: int | None = None) -> CacheView:
    """Checks one layer's key and value chunk lists and describes them.

    Both must be ``[chunk_blocks, block_size, num_kv_heads, head_dim]`` chunks
    with identical shapes and strides, a supported dtype, a power-of-two
    ``block_size`` (1 included), a ``head_dim`` that is a multiple of 8 from 8
    to 256 (:data:`SUPPORTED_HEAD_DIMS`) and unit stride on it. The torch
    reference and the Triton kernels accept the same set.
    ``chunk_offsets``: the table from :func:`chunk_offsets`, checked as in
    :func:`resolve_offsets`; without it the table is built here (one small
    host-to-device copy) when there are several chunks. The returned view
    carries the table (``offsets``, None for one chunk but see ``max_chunks``) and is what every
    kernel entry point takes to skip these checks.

    fp8 chunks (``torch.float8_e4m3fn`` / ``float8_e5m2``) need ``k_scale``
    and ``v_scale`` (a positive number, or a float tensor ``[]``, ``[1]`` or
    ``[num_kv_heads]``; see :func:`kvforge.kernels.fp8.as_scale`) and
    ``model_dtype``, the dtype of the queries, keys and values (float16,
    bfloat16 or float32); an fp8 chunk list passed straight to an entry point,
    without a view, is refused for want of its scales. Other chunks take none
    of the three (``model_dtype`` may repeat their dtype).

    ``max_chunks``: the most chunks this storage will hold (an elastic pool, or one whose
    compaction hands chunks back), at least the chunks given. The view then keeps a chunk
    table even for one chunk and the kernels size theirs for ``max_chunks``, so a change of
    the chunk count within it compiles no new kernel variant.
    """
    k = as_chunks(k_cache, "k_cache", 4)
    v = as_chunks(v_cache, "v_cache", 4)
    if len(k) != len(v):
        raise KernelError(f"k_cache has {len(k)} chunks but v_cache has {len(v)}")
    k0, v0 = k[0], v[0]
    if k0.shape != v0.shape or k0.stride() != v0.stride():
        raise KernelError(
            f"v_cache shape {tuple(v0.shape)} strides {v0.stride()} differ from k_cache's "
            f"{tuple(k0.shape)} strides {k0.stride()}"
        )
    if k0.dtype != v0.dtype or k0.device != v0.device:
        raise KernelError(f"v_cache dtype/device {v0.dtype}/{v0.device} differ from k_cache's {k0.dtype}/{k0.device}")
    if k0.dtype not in STORAGE_DTYPES:
        raise KernelError(f"cache dtype: expected one of {STORAGE_DTYPES}, got {k0.dtype}")
    chunk_blocks, block_size, num_kv_heads, head_dim = k0.shape
    check_block_size(block_size)
    check_head_dim(head_dim)
    if num_kv_heads < 1 or chunk_blocks < 1:
        raise KernelError(f"cache shape {tuple(k0.shape)}: expected at least one block and one KV head")
    if k0.stride(3) != 1:
        raise KernelError(f"cache head_dim stride: expected 1, got {k0.stride(3)}")
    offsets = resolve_offsets(k, v, chunk_offsets)
    if max_chunks is not None:
        if isinstance(max_chunks, bool) or not isinstance(max_chunks, numbers.Integral) or max_chunks < len(k):
            raise KernelError(f"max_chunks: expected an int >= the {len(k)} chunk(s) given, got {max_chunks!r}")
        max_chunks = int(max_chunks)
        if offsets is None and max_chunks > 1:  # one chunk now, more later: the same kernel variant
            offsets = chunk_offsets if chunk_offsets is not None else torch.zeros(1, dtype=torch.int64,
                                                                                    device=k0.device)
    most = max_chunks or 0
    if k0.dtype not in FP8_DTYPES:
        if k_scale is not None or v_scale is not None:
            raise KernelError(f"k_scale/v_scale: a {k0.dtype} cache has no scales (only fp8 caches do)")
        if model_dtype is not None and model_dtype != k0.dtype:
            raise KernelError(f"model_dtype: a {k0.dtype} cache takes and gives {k0.dtype}, got {model_dtype}")
        return CacheView(k, v, chunk_blocks, block_size, num_kv_heads, head_dim, k0.dtype, k0.device, offsets,
                         k0.dtype, max_chunks=most, serial=next(_SERIALS))
    if k_scale is None or v_scale is None:
        raise KernelError(
            f"an {k0.dtype} cache needs its dequantization scales: describe it with "
            f"describe_cache(k_cache, v_cache, k_scale=..., v_scale=..., model_dtype=...) and pass the view")
    if model_dtype not in SUPPORTED_DTYPES:
        raise KernelError(f"model_dtype: an {k0.dtype} cache needs the dtype of its queries, keys and values, one "
                          f"of {SUPPORTED_DTYPES}, got {model_dtype}")
    ks = as_scale(k_scale, "k_scale", num_kv_heads, k0.device)
    vs = as_scale(v_scale, "v_scale", num_kv_heads, k0.device)
    return CacheView(k, v, chunk_blocks, block_size, num_kv_heads, head_dim, model_dtype, k0.device, offsets,
                     k0.dtype, ks, vs, max_chunks=most, serial=next(_SERIALS))


def resolve_offsets(
    k_chunks: Sequence[Tensor], v_chunks: Sequence[Tensor] | None, given: Tensor | None
) -> Tensor | None:
    """The chunk offset table for a chunk list, or None for a single chunk.

    The kernels address value chunk j at ``v_chunks[0]`` plus key chunk j's
    offset, so the key and value lists must sit at the same distances (views
    of the same chunks do); that is checked from the pointers (no device
    sync) whenever a chunk list is described. A given table must be int64 ``[num_chunks]``
    on the chunks' device; on the CPU its values are checked too (on a GPU
    that would cost a sync, so build it with :func:`chunk_offsets`). Without
    one, the table is computed from the pointers.
    """
    n = len(k_chunks)
    device = k_chunks[0].device
    k_off = _offsets_list(k_chunks, "k_cache") if n > 1 or given is not None else [0]
    if v_chunks is not None and n > 1:
        v_off = _offsets_list(v_chunks, "v_cache")
        if k_off != v_off:
            raise KernelError(
                f"k_cache and v_cache chunk offsets differ: {k_off} vs {v_off}; pass views of the same chunks"
            )
    if given is not None:
        if not isinstance(given, Tensor) or given.dtype != torch.int64 or tuple(given.shape) != (n,):
            got = f"{given.dtype} {tuple(given.shape)}" if isinstance(given, Tensor) else type(given).__name__
            raise KernelError(f"chunk_offsets: expected int64 [{n}], got {got}")
        if given.device != device:
            raise KernelError(f"chunk_offsets: expected device {device}, got {given.device}")
        if device.type == "cpu" and given.tolist() != k_off:
            raise KernelError(f"chunk_offsets: expected {k_off} for these chunks, got {given.tolist()}")
        return given if n > 1 else None
    if n == 1:
        return None
    return torch.tensor(k_off, dtype=torch.int64, device=device)
