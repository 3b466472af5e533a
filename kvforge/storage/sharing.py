"""Sharing blocks with other instances: a :class:`~kvforge.storage.KVCache` over a remote tier.

:class:`RemoteMethods` is that part of the cache. ``KVCache(cfg, remote=tier)``
binds the tier (:class:`~kvforge.storage.remote.RemoteTier`, e.g.
:class:`~kvforge.storage.redis_tier.RedisTier`) to the cache's layout; then

- :meth:`~kvforge.storage.KVCache.add_sequence` looks beyond the local tiers:
  the prompt's full blocks after its device and host hits are asked of the
  remote tier in one batch, and the run it holds is copied into new device
  blocks, registered in the prefix index and counted in
  ``num_cached_tokens`` (``prefix_stats().remote_hit_tokens``);
- :meth:`RemoteMethods.publish` shares a sequence's full, keyed blocks. The
  cache copies them out of the device on a side stream (the compute stream
  waits only for the on-device gather, so the blocks may be reused at once)
  and hands the tier a thunk that its writer thread calls once the transfer
  to host memory is done: the step path never waits for the network.
  :meth:`~kvforge.storage.KVCache.free_sequence` publishes first (unless
  ``publish=False``: a failed step's blocks were never computed).

The tier itself skips blocks it wrote recently (and writes them again once it
learns they are gone: a restarted or evicting server).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np
import torch

from kvforge.errors import KVForgeError
from kvforge.storage.remote import RemoteLayout, RemoteTier

if TYPE_CHECKING:
    from kvforge.config import CacheConfig
    from kvforge.core.manager import BlockManager
    from kvforge.storage.device import DeviceStorage

__all__ = ["RemoteMethods"]

log = logging.getLogger(__name__)

SeqId = Hashable


class RemoteMethods:
    """The remote tier of a :class:`~kvforge.storage.KVCache` (a mixin)."""

    config: CacheConfig
    manager: BlockManager
    storage: DeviceStorage
    device: torch.device
    remote: RemoteTier | None

    def _wire_remote(self, remote: RemoteTier | None, model: str) -> None:
        self.remote = remote
        self._remote_payloads: list[Any] = []
        self._publish_stream = torch.cuda.Stream(self.device) if remote is not None and \
            self.device.type == "cuda" else None
        if remote is None:
            return
        if not isinstance(remote, RemoteTier):
            raise KVForgeError(f"remote must be a RemoteTier (e.g. kvforge.RedisTier), got {type(remote).__name__}")
        if not isinstance(model, str):
            raise KVForgeError(f"model must be a string naming the weights, got {type(model).__name__}")
        c = self.config
        remote.bind(RemoteLayout(model, str(c.dtype).removeprefix("torch."), c.block_size, c.num_layers,
                                 c.num_kv_heads, c.head_dim, 0, 1, c.bytes_per_block))
        self.manager.fetch_remote = self._fetch_remote
        self.manager.copy_from_remote = self._copy_from_remote

    # ------------------------------------------------------------- fetch
    def _fetch_remote(self, keys: list[bytes]) -> int:
        self._remote_payloads = list(self.remote.fetch(keys))  # type: ignore[union-attr]
        return len(self._remote_payloads)

    def _copy_from_remote(self, device_blocks: list[int]) -> None:
        payloads, self._remote_payloads = self._remote_payloads[: len(device_blocks)], []
        c = self.config
        size = c.bytes_per_block
        if len(payloads) != len(device_blocks) or any(len(p) != size for p in payloads):
            raise KVForgeError(f"the remote tier returned {len(payloads)} payload(s) for {len(device_blocks)} "
                               f"block(s), or one of a size other than {size} bytes")
        raw = np.frombuffer(b"".join(payloads), dtype=np.uint8).copy()
        data = torch.from_numpy(raw).view(c.dtype).reshape(
            len(payloads), c.num_layers, 2, c.block_size, c.num_kv_heads, c.head_dim)
        if self.device.type == "cuda":
            data = data.pin_memory()
        self.storage.write_blocks(np.asarray(device_blocks, dtype=np.int64), data)

    # ------------------------------------------------------------- publish
    def publish(self, seq_id: SeqId) -> int:
        """Share the sequence's full blocks whose token ids are known with the remote tier,
        in the background; return how many were handed to it (not those the tier says it
        wrote or read recently: ``needs_write``). The blocks must hold their keys and
        values (computed)."""
        if self.remote is None:
            raise KVForgeError("publish(): the cache has no remote tier (KVCache(cfg, remote=RedisTier(...)))")
        keys, blocks = self.manager.keyed_blocks(seq_id)
        wanted = getattr(self.remote, "needs_write", None)  # optional: skip blocks the tier has
        if wanted is not None and keys:
            keep = [i for i, w in enumerate(wanted(keys)) if w]
            keys, blocks = [keys[i] for i in keep], [blocks[i] for i in keep]
        if not keys:
            return 0
        self.remote.publish(keys, self._copy_out(np.asarray(blocks, dtype=np.int64)))
        return len(keys)

    def _copy_out(self, block_ids: np.ndarray) -> Any:
        """Start copying blocks to host memory; a thunk that returns their payloads once done."""
        n = len(block_ids)
        stream = self._publish_stream
        if stream is None:  # the CPU: a synchronous copy
            data = self.storage.read_blocks(block_ids).contiguous()
            rows = data.view(torch.uint8).reshape(n, -1)
            return lambda: [rows[i].numpy() for i in range(n)]
        main = torch.cuda.current_stream(self.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            gathered = self.storage.read_blocks(block_ids)
            ready = torch.cuda.Event()
            ready.record(stream)
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        main.wait_event(ready)  # the blocks may be overwritten once gathered

        def payloads() -> list[Any]:
            done.synchronize()
            rows = host.view(torch.uint8).reshape(n, -1)
            return [rows[i].numpy() for i in range(n)]
        return payloads

    def remote_stats(self) -> Any:
        """The remote tier's counters (``None`` without one)."""
        return None if self.remote is None else self.remote.stats()  # type: ignore[attr-defined]
