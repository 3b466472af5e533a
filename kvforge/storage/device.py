"""The device side of a cache: chunk tensors, their kernel views, block copies.

Layout. Keys and values live in *chunks*: separate device tensors of shape
``[num_layers, 2, chunk_blocks, block_size, num_kv_heads, head_dim]`` (index 0
of dim 1 holds keys, 1 values). Block ``b`` lives in chunk ``b //
chunk_blocks`` at local index ``b % chunk_blocks``. For layer ``l`` the kernels
see ``[chunk[l, 0] for chunk in chunks]`` (each ``[chunk_blocks, block_size,
num_kv_heads, head_dim]``) and an int64 table of each chunk's element offset
from chunk 0.

:class:`DeviceStorage` owns the chunks and, for each layer, one
:class:`~kvforge.kernels.CacheView` (the chunk lists described and checked
once, with the offset table) that every kernel call of a step reuses. Views
are rebuilt only when the chunk set changes (grow, release), and
:attr:`DeviceStorage.version` counts those changes, so that holders of
device addresses (captured CUDA graphs) know when to rebuild.

fp8. An fp8 cache's chunks hold ``torch.float8_e4m3fn`` / ``float8_e5m2``
and the storage owns its scales: float32 ``[num_layers, num_kv_heads]``
tensors for keys and for values, all 1.0 until
:meth:`DeviceStorage.set_scales` copies new values in (in place: the views,
and any captured CUDA graph, keep reading the same memory). Every copy of
whole blocks (compaction, copy-on-write, the host and remote tiers) moves
their bytes unchanged; :meth:`DeviceStorage.gather` dequantizes.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge import kernels
from kvforge.config import CacheConfig
from kvforge.errors import ConfigError, KVForgeError, OutOfBlocksError
from kvforge.kernels.fp8 import dequantize, is_fp8

__all__ = ["DeviceStorage", "resolve_device", "slot_array"]

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> the CUDA/ROCm device when present, else the CPU.

    Raises :class:`ConfigError` for a name torch does not know or a device
    this machine does not have."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not available here "
                          f"({torch.cuda.device_count()} CUDA/ROCm device(s) visible)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: kvforge runs on 'cpu' and 'cuda' (CUDA or ROCm) devices")
    return dev


def slot_array(values: object, name: str, ndim: int = 1) -> np.ndarray:
    """``values`` (slot or block ids: a sequence or array of integers) as int64, ``ndim`` dims.

    Floats, bools, strings and integers outside int64 are refused with a
    :class:`KVForgeError` naming ``name`` (numpy would truncate or wrap them)."""
    if isinstance(values, (str, bytes)):
        raise KVForgeError(f"{name}: expected integer ids, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        raise KVForgeError(f"{name}: expected integer ids, got {values!r:.80}") from None
    if isinstance(values, (list, tuple)):  # numpy turns True into 1: refuse bools by value
        flat = [x for row in values for x in (row if isinstance(row, (list, tuple)) else (row,))]
        if any(isinstance(x, (bool, np.bool_)) for x in flat):
            raise KVForgeError(f"{name}: expected integer ids, got a bool in {values!r:.80}")
    if arr.dtype == object:  # Python ints beyond int64, or mixed contents
        raise KVForgeError(f"{name}: expected integer ids that fit int64, got {values!r:.80}")
    if arr.size and arr.dtype.kind not in "iu":
        raise KVForgeError(f"{name}: expected integer ids, got {arr.dtype} values {values!r:.80}")
    if arr.ndim != ndim and arr.size:
        raise KVForgeError(f"{name}: expected {ndim} dims, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
        raise KVForgeError(f"{name}: id {int(arr.max())} does not fit int64")
    return arr.astype(np.int64).reshape((0,) * ndim if not arr.size else arr.shape)


class DeviceStorage:
    """The chunk tensors of one cache on one device, and their per-layer kernel views.

    Knows nothing of sequences or block ownership: the caller (the
    :class:`~kvforge.storage.KVCache`) decides which blocks to copy and how
    many chunks to keep. Every method that fails changes nothing.
    """

    def __init__(self, config: CacheConfig, device: torch.device, chunk_blocks: int, backend: str) -> None:
        self.config = config
        self.device = device
        self.chunk_blocks = chunk_blocks
        self.backend = backend
        self.version = 0
        self._chunks: list[Tensor] = []
        self._views: list[kernels.CacheView] = []
        self._offsets: Tensor | None = None
        #: called with the ``[n, 2]`` pairs of every block copy made (tensor parallelism mirrors them)
        self.on_copy: Callable[[np.ndarray], None] | None = None
        #: called with the new chunk count whenever chunks are added or dropped (the same)
        self.on_chunks: Callable[[int], None] | None = None
        self.is_fp8 = is_fp8(config.dtype)
        #: fp8 only: dequantization scales, float32 [num_layers, num_kv_heads] (keys, values)
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None
        if self.is_fp8:
            self.k_scale = torch.ones((config.num_layers, config.num_kv_heads), dtype=torch.float32, device=device)
            self.v_scale = torch.ones_like(self.k_scale)

    # ------------------------------------------------------------- queries
    @property
    def chunks(self) -> tuple[Tensor, ...]:
        """The chunk tensors ``[num_layers, 2, chunk_blocks, block_size, kv_heads, head_dim]``."""
        return tuple(self._chunks)

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def num_bytes(self) -> int:
        """Bytes the chunks hold on the device."""
        return sum(c.numel() * c.element_size() for c in self._chunks)

    @property
    def offsets(self) -> Tensor | None:
        """Element offsets of each chunk from chunk 0 (int64, on the device); None for a pool
        that never holds more than one chunk."""
        return self._offsets

    def layer_view(self, layer: int) -> kernels.CacheView:
        """Layer ``layer``'s described key/value chunks (what the kernels take)."""
        return self._views[layer]

    # -------------------------------------------------------- chunk set
    def _chunk_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.page_layers, 2, self.chunk_blocks, c.block_size, c.num_kv_heads, c.head_dim)

    def _allocate_chunk(self) -> Tensor:
        # zeroed, so that a kernel that reads a padded slot never meets NaN garbage (fp8: zero bytes)
        if self.is_fp8:
            return torch.zeros(self._chunk_shape(), dtype=torch.uint8, device=self.device).view(self.config.dtype)
        return torch.zeros(self._chunk_shape(), dtype=self.config.dtype, device=self.device)

    def add_chunks(self, n: int) -> None:
        """Allocate ``n`` more chunks; on device OOM nothing changes (OutOfBlocksError)."""
        new: list[Tensor] = []
        try:
            for _ in range(n):
                new.append(self._allocate_chunk())
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
                raise
            new.clear()  # drop the chunks made so far before reporting
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            want = n * self.chunk_blocks
            raise OutOfBlocksError(
                f"the device cannot back {want} more blocks ({n} chunk(s) of {self.chunk_blocks} blocks, "
                f"{self.config.bytes_per_block * self.chunk_blocks} bytes each): {exc}",
                requested=want, available=0) from None
        if new:
            self._chunks.extend(new)
            self._rebuild_views()
            if self.on_chunks is not None:
                self.on_chunks(len(self._chunks))
            log.debug("grew KV storage to %d chunks", len(self._chunks))

    def drop_chunks_from(self, keep: int) -> int:
        """Free every chunk from index ``keep`` on; return the bytes handed back to the device."""
        if keep >= len(self._chunks):
            return 0
        dropped = self._chunks[keep:]
        released = sum(c.numel() * c.element_size() for c in dropped)
        del self._chunks[keep:]
        del dropped
        self._rebuild_views()
        if self.on_chunks is not None:
            self.on_chunks(len(self._chunks))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return released

    def _rebuild_views(self) -> None:
        most = int(-(-self.config.num_blocks // self.chunk_blocks))  # the chunks this pool may reach
        self._offsets = kernels.chunk_offsets(self._chunks) if most > 1 else None
        fp8: dict[str, object] = {}
        views = []
        for l in range(self.config.num_layers):
            if self.is_fp8:
                assert self.k_scale is not None and self.v_scale is not None
                fp8 = dict(k_scale=self.k_scale[l], v_scale=self.v_scale[l],
                           model_dtype=self.config.resolved_model_dtype)
            s = self.config.layer_group(l)[1]  # the layer's slot in its group's blocks
            views.append(kernels.describe_cache(tuple(c[s, 0] for c in self._chunks),
                                                tuple(c[s, 1] for c in self._chunks),
                                                chunk_offsets=self._offsets, max_chunks=most,
                                                **fp8))  # type: ignore[arg-type]
        self._views = views
        self.version += 1

    def set_scales(self, layer: int, k_scale: Tensor, v_scale: Tensor) -> None:
        """Copy float32 ``[num_kv_heads]`` scales (checked by the caller) into ``layer``'s rows, in place."""
        assert self.k_scale is not None and self.v_scale is not None
        self.k_scale[layer].copy_(k_scale)
        self.v_scale[layer].copy_(v_scale)

    def _raw(self, t: Tensor) -> Tensor:
        """``t`` as bytes (a uint8 view) for an fp8 cache: block copies move bytes, and
        torch has no index_copy_ for fp8 on the CPU."""
        return t.view(torch.uint8) if self.is_fp8 else t

    # ----------------------------------------------------------- data
    def upload(self, array: np.ndarray) -> Tensor:
        """A numpy array as a tensor on the device (pinned staging, one non-blocking copy on a GPU)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return host.clone()
        staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        """Store ``k``, ``v`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` (-1 skipped)."""
        kernels.store_kv(k, v, self._views[layer], None, slot_mapping, backend=self.backend)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]], num_blocks: int) -> None:
        """Copy blocks ``src -> dst`` (all layers, keys and values) in one launch.

        Ids must lie in ``[0, num_blocks)`` (the backed blocks)."""
        if len(pairs) == 0:
            return
        arr = slot_array(pairs, "copy_blocks() pairs", ndim=2)
        if arr.shape[1] != 2:
            raise KVForgeError(f"copy_blocks() needs (src, dst) pairs of block ids, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= num_blocks:
            raise KVForgeError(f"copy_blocks(): block ids must lie in [0, {num_blocks}), "
                               f"got {arr.min()}..{arr.max()}")
        src = self.upload(arr[:, 0].copy())
        dst = self.upload(arr[:, 1].copy())
        kernels.copy_blocks(self._chunks, src, dst, chunk_offsets=self._offsets, backend=self.backend)
        if self.on_copy is not None:
            self.on_copy(arr)

    def read_blocks(self, block_ids: np.ndarray, out: Tensor | None = None) -> Tensor:
        """Whole blocks, block-major ``[n, num_layers, 2, block_size, kv_heads, head_dim]``, into
        ``out`` (or a new device tensor); queued on the current stream."""
        c = self.config
        if out is None:
            out = torch.empty((len(block_ids), c.page_layers, 2, c.block_size, c.num_kv_heads, c.head_dim),
                              dtype=c.dtype, device=self.device)
        raw_out = self._raw(out)
        cb = self.chunk_blocks
        for chunk in np.unique(block_ids // cb).tolist():
            pos = np.flatnonzero(block_ids // cb == chunk)
            src = self._raw(self._chunks[chunk]).index_select(2, self.index(block_ids[pos] % cb))
            src = src.permute(2, 0, 1, 3, 4, 5)
            if len(pos) == len(block_ids):
                raw_out.copy_(src)
            else:
                raw_out.index_copy_(0, self.index(pos), src)
        return out

    def write_blocks(self, block_ids: np.ndarray, data: Tensor) -> None:
        """Write block-major ``data`` ``[n, num_layers, 2, block_size, kv_heads, head_dim]``
        into blocks ``block_ids`` (queued on the current stream)."""
        cb = self.chunk_blocks
        if data.dtype != self.config.dtype:
            raise KVForgeError(f"write_blocks(): expected {self.config.dtype} blocks (the cache's bytes), got {data.dtype}")
        data = self._raw(data.to(self.device, non_blocking=True))
        for chunk in np.unique(block_ids // cb).tolist():
            pos = np.flatnonzero(block_ids // cb == chunk)
            src = data if len(pos) == len(block_ids) else data.index_select(0, self.index(pos))
            self._raw(self._chunks[chunk]).index_copy_(2, self.index(block_ids[pos] % cb), src.permute(1, 2, 0, 3, 4, 5))

    def index(self, values: np.ndarray) -> Tensor:
        """Integer ``values`` as an int64 index tensor on the device. On a GPU it is staged
        through pinned memory: a copy from pageable memory makes the host wait for the
        stream's earlier work (a side stream's transfers)."""
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        if self.device.type != "cuda":
            return t
        pinned = torch.empty(t.shape, dtype=torch.int64, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)

    def gather(self, layer: int, block_table: Sequence[int], num_tokens: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``0..num_tokens-1`` of a block table,
        ``[num_tokens, num_kv_heads, head_dim]`` each, in the model dtype (an fp8
        cache's dequantized: ``stored * scale`` computed in float32)."""
        bs = self.config.block_size
        table = torch.tensor(list(block_table), dtype=torch.int64, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        blocks = table[pos // bs]
        chunk, local = blocks // self.chunk_blocks, blocks % self.chunk_blocks
        view = self._views[layer]
        shape = (num_tokens, self.config.num_kv_heads, self.config.head_dim)
        k = torch.empty(shape, dtype=self.config.dtype, device=self.device)
        v = torch.empty_like(k)
        raw_k, raw_v = self._raw(k), self._raw(v)
        for c in torch.unique(chunk).tolist():
            sel = chunk == c
            raw_k[sel] = self._raw(view.k_chunks[c])[local[sel], pos[sel] % bs]
            raw_v[sel] = self._raw(view.v_chunks[c])[local[sel], pos[sel] % bs]
        if view.k_scale is not None and view.v_scale is not None:
            model = self.config.resolved_model_dtype
            return dequantize(k, view.k_scale, model), dequantize(v, view.v_scale, model)
        return k, v
