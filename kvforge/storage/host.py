"""The host tier's memory: pinned host blocks and the batched copies to and from the device.

Layout. Host blocks are block-major: chunk tensors ``[chunk_blocks, num_layers,
2, block_size, num_kv_heads, head_dim]`` (dim 2: keys, values), so one host
block is one contiguous range and a run of consecutive host blocks is one
copy. Chunks are allocated (pinned, not zeroed) the first time a block in
them is used: a budget of 64 GiB costs nothing until it fills. The
bookkeeping's host pool hands out the lowest ids first, so the chunks in use
follow the tier's peak occupancy.

Copies. Device chunks are layer-major (``[num_layers, 2, chunk_blocks, ...]``),
so a device block is ``2 * num_layers`` strided pieces. A copy to the host
gathers the blocks into a device staging buffer in block-major order (one
``index_select`` per device chunk, at device bandwidth) and moves each run of
consecutive host blocks with one ``copy_``; a copy to the device does the
reverse. A copy goes in rounds of :data:`ROUND_BYTES` through a ring of
staging slots (:data:`STAGING_BYTES` in all). On a GPU it uses two side
streams: the *gather stream* gathers (scatters) each round, the *copy
stream* moves it to (from) pinned memory, so the device-side work of one
round overlaps the transfers of its neighbours; events order each round's
two halves and the reuse of each slot.

- both side streams first wait for the work already queued on the compute
  stream (the blocks they read or overwrite were written or are read there);
- after a copy to the host, the compute stream waits only for the last
  *gather* (device to device, microseconds): from then on the device blocks
  may be overwritten, while the transfers to pinned memory run on, off the
  critical path;
- after a copy to the device, the compute stream waits for the last
  scatter: the next step reads those blocks. The host thread never waits.

Every tier copy uses the same two streams, so host blocks are written and read
in the order the copies were issued (copy stream), and device blocks gathered
and scattered in that order too (gather stream). On the CPU the same code
runs with synchronous copies. Every method that raises leaves the
bookkeeping to undo its own change (see :mod:`kvforge.core.swap`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.config import CacheConfig
from kvforge.errors import KVForgeError, OutOfBlocksError
from kvforge.storage.device import DeviceStorage

__all__ = ["HostStorage", "ROUND_BYTES", "STAGING_BYTES"]

log = logging.getLogger(__name__)

#: device bytes of the staging buffer a tier copy goes through
STAGING_BYTES = 256 * 2**20
#: bytes of one round of a copy: its gather (or scatter) overlaps the neighbouring rounds' transfers
ROUND_BYTES = 32 * 2**20


def _runs(ids: np.ndarray, chunk_blocks: int) -> list[tuple[int, int, int]]:
    """``(first index, first id, length)`` of each run of consecutive ids in ``ids`` that
    stays inside one chunk of ``chunk_blocks`` ids."""
    if not len(ids):
        return []
    breaks = np.flatnonzero((np.diff(ids) != 1) | (ids[1:] % chunk_blocks == 0)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(ids)]])
    return [(int(s), int(ids[s]), int(e - s)) for s, e in zip(starts, ends)]


class HostStorage:
    """Pinned host blocks of one cache and the copies between them and the device chunks.

    Owns the host chunks, the device staging buffer and (on a GPU) the side
    stream; knows nothing of which blocks hold what (the bookkeeping's
    :class:`~kvforge.core.host_tier.HostTier` does)."""

    def __init__(self, config: CacheConfig, device_storage: DeviceStorage) -> None:
        self.config = config
        self.device_storage = device_storage
        self.device = device_storage.device
        self.num_blocks = config.num_host_blocks
        self.chunk_blocks = config.resolved_host_chunk_blocks
        c = config
        self.block_shape = (c.num_layers, 2, c.block_size, c.num_kv_heads, c.head_dim)
        self.staging_blocks = max(1, min(self.num_blocks, STAGING_BYTES // c.bytes_per_block))
        # rounds small enough that gathering round k + 1 overlaps the transfer of round k
        self.round_blocks = max(1, min(self.staging_blocks // 2, ROUND_BYTES // c.bytes_per_block))
        self.num_slots = max(1, self.staging_blocks // self.round_blocks)
        self._slot_free: list[torch.cuda.Event | None] = [None] * self.num_slots
        self._next_slot = 0
        self._chunks: list[Tensor] = []
        self._staging: Tensor | None = None
        self._cuda = self.device.type == "cuda"
        #: transfers between pinned memory and staging (the copy engines)
        self.stream = torch.cuda.Stream(self.device) if self._cuda else None
        #: gathers into staging and scatters out of it (device to device)
        self.gather_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._last: torch.cuda.Event | None = None  # the last copy's completion
        self.bytes_to_host = self.bytes_to_device = 0
        self.num_copies = 0
        self.seconds = 0.0  # host time spent issuing copies (or running them, on the CPU)

    # ------------------------------------------------------------- memory
    @property
    def num_chunks(self) -> int:
        """Host chunks allocated now."""
        return len(self._chunks)

    @property
    def num_bytes(self) -> int:
        """Host bytes allocated now (pinned on a GPU machine)."""
        return sum(t.numel() * t.element_size() for t in self._chunks)

    @property
    def is_pinned(self) -> bool:
        """Whether the host chunks are pinned (page-locked): on a GPU machine."""
        return self._cuda

    def _ensure(self, max_block: int) -> None:
        """Allocate host chunks up to the one holding ``max_block``; on failure nothing changes."""
        need = max_block // self.chunk_blocks + 1
        new: list[Tensor] = []
        try:
            while len(self._chunks) + len(new) < need:
                first = (len(self._chunks) + len(new)) * self.chunk_blocks
                n = min(self.chunk_blocks, self.num_blocks - first)
                new.append(torch.empty((n, *self.block_shape), dtype=self.config.dtype, pin_memory=self._cuda))
        except (RuntimeError, MemoryError) as exc:
            raise OutOfBlocksError(f"cannot allocate host-tier memory for block {max_block} "
                                   f"({self.chunk_blocks} blocks per chunk): {exc}",
                                   requested=1, available=0) from None
        self._chunks.extend(new)

    def _stage(self) -> Tensor:
        if self._staging is None:
            self._staging = torch.empty((self.num_slots * self.round_blocks, *self.block_shape), dtype=self.config.dtype,
                                        device=self.device)
        return self._staging

    def block(self, host_block: int) -> Tensor:
        """Host block ``host_block``'s keys and values ``[num_layers, 2, block_size, kv_heads, head_dim]``
        (a view; synchronize the tier before reading it on the host)."""
        c = host_block // self.chunk_blocks
        if not 0 <= host_block < self.num_blocks or c >= len(self._chunks):
            raise KVForgeError(f"host block {host_block!r} is not allocated "
                               f"({len(self._chunks)} chunk(s) of {self.chunk_blocks})")
        return self._chunks[c][host_block % self.chunk_blocks]

    def synchronize(self) -> None:
        """Wait on the host until every issued tier copy has finished."""
        if self._cuda:
            self.stream.synchronize()
            self.gather_stream.synchronize()

    # ------------------------------------------------------------- copies
    def _check(self, pairs: Sequence[tuple[int, int]], what: str, device_first: bool) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        dev, host = (arr[:, 0], arr[:, 1]) if device_first else (arr[:, 1], arr[:, 0])
        cap = self.device_storage.num_chunks * self.device_storage.chunk_blocks
        if len(arr) and (dev.min() < 0 or dev.max() >= cap or host.min() < 0 or host.max() >= self.num_blocks):
            raise KVForgeError(f"{what}: device blocks must lie in [0, {cap}) and host blocks in "
                               f"[0, {self.num_blocks}), got {pairs!r:.120}")
        order = np.argsort(host, kind="stable")  # consecutive host blocks make one copy
        return dev[order], host[order]

    #: called with ``(1, pairs)`` after each :meth:`to_host` and ``(2, pairs)`` after each
    #: :meth:`to_device` (tensor parallelism replays them on the other ranks)
    on_transfer: Callable[[int, np.ndarray], None] | None = None

    def to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks, ``[(device_block, host_block), ...]``."""
        if not len(pairs):
            return
        self._to_host(pairs)
        if self.on_transfer is not None:
            self.on_transfer(1, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def _to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        dev, host = self._check(pairs, "to_host()", True)
        self._ensure(int(host.max()))
        start = time.perf_counter()
        main = self._begin()
        gathered = None
        for lo in range(0, len(dev), self.round_blocks):
            d, h = dev[lo: lo + self.round_blocks], host[lo: lo + self.round_blocks]
            slot, stage = self._slot(len(d))
            with self._on(self.gather_stream, self._slot_free[slot]):
                self.device_storage.read_blocks(d, out=stage)
                gathered = self._record(self.gather_stream)
            with self._on(self.stream, gathered):
                for i, first, n in _runs(h, self.chunk_blocks):
                    self._host_range(first, n).copy_(stage[i: i + n], non_blocking=True)
                self._slot_free[slot] = self._last = self._record(self.stream)
        if main is not None and gathered is not None:
            main.wait_event(gathered)  # device blocks may be overwritten once gathered
        self._finish(start)
        self.bytes_to_host += len(dev) * self.config.bytes_per_block

    def to_device(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks, ``[(host_block, device_block), ...]``."""
        if not len(pairs):
            return
        self._to_device(pairs)
        if self.on_transfer is not None:
            self.on_transfer(2, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def _to_device(self, pairs: Sequence[tuple[int, int]]) -> None:
        dev, host = self._check(pairs, "to_device()", False)
        if int(host.max()) // self.chunk_blocks >= len(self._chunks):
            raise KVForgeError(f"to_device(): host block {int(host.max())} was never written")
        start = time.perf_counter()
        main = self._begin()
        scattered = None
        for lo in range(0, len(dev), self.round_blocks):
            d, h = dev[lo: lo + self.round_blocks], host[lo: lo + self.round_blocks]
            slot, stage = self._slot(len(d))
            with self._on(self.stream, self._slot_free[slot]):
                for i, first, n in _runs(h, self.chunk_blocks):
                    stage[i: i + n].copy_(self._host_range(first, n), non_blocking=True)
                arrived = self._record(self.stream)
            with self._on(self.gather_stream, arrived):
                self.device_storage.write_blocks(d, stage)
                self._slot_free[slot] = self._last = scattered = self._record(self.gather_stream)
        if main is not None and scattered is not None:
            main.wait_event(scattered)  # the next step reads these blocks
        self._finish(start)
        self.bytes_to_device += len(dev) * self.config.bytes_per_block

    def _host_range(self, first: int, n: int) -> Tensor:
        """Host blocks ``first .. first + n - 1`` (one chunk: a run never crosses chunks here)."""
        c, off = divmod(first, self.chunk_blocks)
        return self._chunks[c][off: off + n]

    # ------------------------------------------------------------- streams
    def _begin(self) -> torch.cuda.Stream | None:
        """Order both tier streams after the work queued on the compute stream; return it."""
        if not self._cuda:
            return None
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        self.gather_stream.wait_stream(main)
        return main

    def _slot(self, n: int) -> tuple[int, Tensor]:
        """The next staging slot (round robin) and its first ``n`` blocks."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.num_slots
        first = slot * self.round_blocks
        return slot, self._stage()[first: first + n]

    def _on(self, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None) -> _OnStream:
        return _OnStream(stream if self._cuda else None, after)

    def _record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _finish(self, start: float) -> None:
        self.num_copies += 1
        self.seconds += time.perf_counter() - start


class _OnStream:
    """``with``: run on ``stream`` (None: the CPU, nothing to do) once ``after`` completed."""

    def __init__(self, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None) -> None:
        self.stream, self.after = stream, after
        self._ctx: torch.cuda.StreamContext | None = None

    def __enter__(self) -> None:
        if self.stream is None:
            return
        if self.after is not None:
            self.stream.wait_event(self.after)
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
