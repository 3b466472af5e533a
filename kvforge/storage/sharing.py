"""Sharing blocks with other instances: a :class:`~kvforge.storage.KVCache` over a remote tier.

:class:`RemoteMethods` is that part of the cache. ``KVCache(cfg, remote=tier)``
binds the tier (:class:`~kvforge.storage.remote.RemoteTier`, e.g.
:class:`~kvforge.storage.redis_tier.RedisTier`) to the cache's layout; then

- :meth:`~kvforge.storage.KVCache.add_sequence` looks beyond the local tiers:
  the prompt's full blocks after its device and host hits are asked of the
  remote tier in one batch, and the run it holds is copied into new device
  blocks, registered in the prefix index and counted in
  ``num_cached_tokens`` (``prefix_stats().remote_hit_tokens``), unless
  ``remote_fetch_policy(num_tokens, num_bytes)`` says computing them is
  cheaper (the engine sets one: :mod:`kvforge.engine.fetch_policy`). A tier
  that lends its payloads (``fetch_held``: RedisTier's reader processes leave
  them, checked, in shared memory) is not copied out: the admission uploads
  each contiguous run of them with one copy straight into the device blocks
  (the regions are page-locked on a GPU, :mod:`kvforge.storage.host_pinning`,
  so the copy is asynchronous), and hands the memory back once an event says
  the copy is done. Where that memory is not page-locked, or with a tier that
  only copies (``fetch``), the payloads are packed into two pinned staging
  buffers first, as before;
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

import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from kvforge.errors import KVForgeError
from kvforge.storage import host_pinning
from kvforge.storage.remote import HeldPayloads, RemoteLayout, RemoteTier

if TYPE_CHECKING:
    from kvforge.config import CacheConfig
    from kvforge.core.manager import BlockManager
    from kvforge.storage.device import DeviceStorage

__all__ = ["RemoteFetch", "RemoteMethods"]

log = logging.getLogger(__name__)

SeqId = Hashable

#: bytes of one round of a copy from the remote tier (each of two pinned staging buffers)
STAGING_BYTES = 64 << 20
#: prefetched payloads kept for admissions to come, at most (the oldest dropped first)
PREFETCH_BYTES = 1 << 30


class _Lease:
    """A lent fetch (:class:`~kvforge.storage.remote.HeldPayloads`) while any of its blocks
    is kept for an admission: ``count`` of them; ``event``: recorded after the last upload
    from it. Released when the count drops to 0, with the event's ``query`` as ``ready``."""

    __slots__ = ("held", "count", "event")

    def __init__(self, held: HeldPayloads) -> None:
        self.held = held
        self.count = held.num_blocks
        self.event: Any = None


class _Lent(NamedTuple):
    """One kept block of a lent fetch: ``index`` within run ``run`` of ``lease``."""

    lease: _Lease
    run: int
    index: int


#: a kept payload: a block's bytes (copied out), or where it lies in a lent fetch
_Kept = Union[memoryview, _Lent]


class RemoteFetch(NamedTuple):
    """A prefetch in flight (:meth:`RemoteMethods.prefetch_remote`): the keys asked, the future of the payloads."""

    keys: list[bytes]
    future: Future

    def done(self) -> bool:
        """Whether the fetch finished (found blocks or not)."""
        return self.future.done()


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
        self._remote_keys: list[bytes] = []  # the keys of _remote_payloads
        #: called with ``(keys, block_ids)`` after each :meth:`publish` handed blocks to the tier
        #: (tensor parallelism: every rank publishes its share of those blocks)
        self.on_publish: Callable[[list[bytes], list[int]], None] | None = None
        self._remote_scales_changed = False  # set_kv_scales since the tier was bound
        #: ``policy(num_tokens, num_bytes) -> bool``: whether to fetch a prompt's blocks
        #: beyond its local hits from the remote tier (None: always); the engine sets it
        self.remote_fetch_policy: Callable[[int, int], bool] | None = None
        #: True: admissions use only what :meth:`prefetch_remote` brought (the engine's scheduler
        #: prefetches, so the step loop never waits for the network); False: they fetch themselves
        self.remote_prefetching = False
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetched: OrderedDict[bytes, _Kept] = OrderedDict()  # block key -> payload, oldest first
        self._prefetched_bytes = 0
        self._remote_bufs: list[Tensor | None] = [None, None]  # pinned, for copies from the remote tier
        self._remote_uploads: list[Any] = [None, None]  # the event of the upload that last read each
        self._publish_stream = torch.cuda.Stream(self.device) if remote is not None and \
            self.device.type == "cuda" else None
        if remote is None:
            return
        if not isinstance(remote, RemoteTier):
            raise KVForgeError(f"remote must be a RemoteTier (e.g. kvforge.RedisTier), got {type(remote).__name__}")
        if not isinstance(model, str):
            raise KVForgeError(f"model must be a string naming the weights, got {type(model).__name__}")
        self._remote_model = model
        self._bound_layout = self._remote_layout()
        remote.bind(self._bound_layout)
        hooks = getattr(remote, "set_memory_hooks", None)  # optional: page-lock what the tier lends
        if hooks is not None and self.device.type == "cuda":
            device = self.device
            hooks(lambda view: host_pinning.register(view, device), host_pinning.unregister)
        self.manager.fetch_remote = self._fetch_remote
        self.manager.copy_from_remote = self._copy_from_remote

    def _remote_layout(self) -> RemoteLayout:
        """The layout of this cache's payloads; an fp8 cache's names its scales too."""
        c = self.config
        quant = ""
        if c.is_fp8:
            s = self.storage
            assert s.k_scale is not None and s.v_scale is not None
            data = s.k_scale.cpu().numpy().tobytes() + s.v_scale.cpu().numpy().tobytes()
            quant = "scales:" + hashlib.blake2b(data, digest_size=16).hexdigest()
        rank, size = getattr(self, "tensor_parallel", (0, 1))
        return RemoteLayout(self._remote_model, str(c.dtype).removeprefix("torch."), c.block_size, c.num_layers,
                            c.num_kv_heads, c.head_dim, rank, size, c.bytes_per_block, quant)

    def _sync_remote_layout(self) -> None:
        """After new fp8 scales (:meth:`~kvforge.storage.KVCache.set_kv_scales`), bind the tier
        again, once, before its first use: its names and checks follow the scales."""
        if self._remote_scales_changed:
            layout = self._remote_layout()
            if layout != self._bound_layout:
                self.remote.rebind(layout)  # type: ignore[union-attr]
                self._bound_layout = layout
            self._remote_scales_changed = False

    def _remote_allows_new_scales(self) -> str | None:
        """Why new scales cannot be set with this remote tier (None: they can)."""
        if self.remote is None:
            return None
        if not callable(getattr(self.remote, "rebind", None)):
            return f"the remote tier {self.remote!r} cannot be bound again to a layout with other scales"
        if not getattr(self.remote, "unused", False):
            return (f"the remote tier {self.remote!r} was used with the current scales (set scales before "
                    f"the first request)")
        return None

    # ------------------------------------------------------------- fetch
    def prefetch_remote(self, prompt_token_ids: Sequence[int], salt: Hashable | None = None) -> RemoteFetch | None:
        """Start fetching, in the background, the prompt's full blocks beyond its local
        hits from the remote tier; None when the tier holds none of them (its
        ``lookup``, one round trip, when it has one) or ``remote_fetch_policy``
        declines (asked with the blocks the tier holds). Once the handle is :meth:`~RemoteFetch.done`,
        :meth:`take_prefetched` keeps its payloads for the prompt's admission, which
        then copies them in without waiting for the network."""
        if self.remote is None:
            raise KVForgeError("prefetch_remote(): the cache has no remote tier (KVCache(cfg, remote=RedisTier(...)))")
        self._sync_remote_layout()
        keys = self.manager.remote_candidates(prompt_token_ids, salt)
        lookup = getattr(self.remote, "lookup", None)  # optional: what the store holds, in one round trip
        if keys and lookup is not None:
            keys = keys[:lookup(keys)]
        c = self.config
        policy = self.remote_fetch_policy
        if not keys or (policy is not None and not policy(len(keys) * c.block_size, len(keys) * c.bytes_per_block)):
            return None
        if self._prefetcher is None:  # one thread: the tier's own threads parallelise a fetch
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kvforge-remote-prefetch")
        return RemoteFetch(keys, self._prefetcher.submit(self._fetch_now, keys))

    def _fetch_now(self, keys: list[bytes]) -> list[_Kept]:
        """The tier's run for ``keys``: lent where the tier can lend (``fetch_held``), else copied."""
        fetch_held = getattr(self.remote, "fetch_held", None)
        held = fetch_held(keys) if fetch_held is not None else None
        if held is None:
            return list(self.remote.fetch(keys))  # type: ignore[union-attr]
        if not held.num_blocks:
            held.release()
            return []
        lease = _Lease(held)
        return [_Lent(lease, r, i) for r, run in enumerate(held.runs) for i in range(run.num_blocks)]

    def take_prefetched(self, fetch: RemoteFetch) -> int:
        """Keep a finished prefetch's payloads for admission (the oldest kept are dropped
        beyond :data:`PREFETCH_BYTES`); return how many blocks it found (0 if it failed)."""
        try:
            payloads = fetch.future.result(timeout=0)
        except Exception as exc:  # the tier never raises for the server's trouble; anything else: a miss
            log.warning("the remote tier's prefetch failed (%s); the prompt is computed", exc)
            return 0
        kept = self._prefetched
        size = self.config.bytes_per_block
        for key, payload in zip(fetch.keys, payloads):
            old = kept.pop(key, None)
            if old is not None:
                self._drop(old)
                self._prefetched_bytes -= size
            kept[key] = payload
            self._prefetched_bytes += size
        while self._prefetched_bytes > PREFETCH_BYTES and kept:
            self._drop(kept.popitem(last=False)[1])
            self._prefetched_bytes -= size
        return len(payloads)

    @staticmethod
    def _drop(kept: _Kept) -> None:
        """A kept payload is no longer needed: the last of a lent fetch hands its memory back
        (once the upload that last read it is done)."""
        if isinstance(kept, _Lent):
            lease = kept.lease
            lease.count -= 1
            if lease.count == 0:
                lease.held.release(None if lease.event is None else lease.event.query)

    def _fetch_remote(self, keys: list[bytes]) -> int:
        """Admission's remote lookup: the prefetched run first; without one, a fetch now
        (unless the engine prefetches: ``remote_prefetching``) if the policy allows."""
        self._sync_remote_layout()
        for left in self._remote_payloads:  # an admission that did not copy them in
            self._drop(left)
        self._remote_payloads = []
        run: list[_Kept] = []
        size = self.config.bytes_per_block
        for key in keys:
            payload = self._prefetched.pop(key, None)
            if payload is None:
                break
            self._prefetched_bytes -= size
            run.append(payload)
        if not run and not self.remote_prefetching:
            policy = self.remote_fetch_policy
            c = self.config
            if policy is None or policy(len(keys) * c.block_size, len(keys) * c.bytes_per_block):
                run = self._fetch_now(keys)
        self._remote_payloads = run
        self._remote_keys = keys[:len(run)]
        return len(run)

    def _copy_from_remote(self, device_blocks: list[int]) -> None:
        """Write the fetched payloads into ``device_blocks``. Lent ones in page-locked memory
        (or any lent ones on the CPU) go straight from the tier's memory, one copy per
        contiguous run; the others in rounds of at most :data:`STAGING_BYTES` packed into
        two alternating pinned buffers, so packing a round overlaps the upload of the one
        before. Every kept payload is dropped after, uploaded or not (a lent fetch's memory
        goes back once this upload's event is done)."""
        payloads, rest = self._remote_payloads[: len(device_blocks)], self._remote_payloads[len(device_blocks):]
        self._remote_payloads = []
        c = self.config
        size = c.bytes_per_block
        cuda = self.device.type == "cuda"
        leases: dict[int, _Lease] = {}
        try:
            if len(payloads) != len(device_blocks) or any(
                    not isinstance(p, _Lent) and len(p) != size for p in payloads):
                raise KVForgeError(f"the remote tier returned {len(payloads)} payload(s) for {len(device_blocks)} "
                                   f"block(s), or one of a size other than {size} bytes")
            ids = np.asarray(device_blocks, dtype=np.int64)
            staged: list[tuple[int, memoryview]] = []  # (position, bytes) of those packed first
            lo = 0
            while lo < len(payloads):
                p = payloads[lo]
                if not isinstance(p, _Lent):
                    staged.append((lo, p))  # type: ignore[arg-type]
                    lo += 1
                    continue
                hi = lo + 1  # the contiguous piece: same run, consecutive indices
                while (hi < len(payloads) and isinstance(q := payloads[hi], _Lent) and q.lease is p.lease
                       and q.run == p.run and q.index == p.index + hi - lo):
                    hi += 1
                data = p.lease.held.runs[p.run].data
                leases[id(p.lease)] = p.lease
                if cuda and not p.lease.held.is_pinned:
                    staged += [(lo + j, data[(p.index + j) * size:(p.index + j + 1) * size]) for j in range(hi - lo)]
                else:
                    piece = torch.frombuffer(data, dtype=torch.uint8, count=(hi - lo) * size, offset=p.index * size)
                    self.storage.write_blocks(ids[lo:hi], piece.view(c.dtype).reshape(
                        hi - lo, c.num_layers, 2, c.block_size, c.num_kv_heads, c.head_dim))
                lo = hi
            if staged:
                self._upload_staged(ids, staged)
        finally:
            if leases and cuda:  # the lent memory may be reused once this stream has read it
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                for lease in leases.values():
                    lease.event = event
            for p in payloads + rest:
                self._drop(p)

    def _upload_staged(self, ids: np.ndarray, staged: list[tuple[int, memoryview]]) -> None:
        """Pack ``staged`` payloads (position in ``ids``, bytes) into the pinned buffers in
        rounds and write each round into its device blocks."""
        c = self.config
        size = c.bytes_per_block
        per_round = max(1, STAGING_BYTES // size)
        for r, lo in enumerate(range(0, len(staged), per_round)):
            part = staged[lo:lo + per_round]
            buf = self._remote_staging(r % 2, len(part) * size)
            flat = buf[: len(part) * size].numpy()
            for i, (_, payload) in enumerate(part):
                flat[i * size:(i + 1) * size] = np.frombuffer(payload, dtype=np.uint8)
            data = buf[: len(part) * size].view(c.dtype).reshape(
                len(part), c.num_layers, 2, c.block_size, c.num_kv_heads, c.head_dim)
            self.storage.write_blocks(ids[[pos for pos, _ in part]], data)
            if self._remote_uploads[r % 2] is not None:
                self._remote_uploads[r % 2].record(torch.cuda.current_stream(self.device))

    def _remote_staging(self, i: int, nbytes: int) -> Tensor:
        """Staging buffer ``i`` (0 or 1) of at least ``nbytes``, once the upload that last read it is done."""
        buf = self._remote_bufs[i]
        if self._remote_uploads[i] is not None:
            self._remote_uploads[i].synchronize()
        if buf is None or buf.numel() < nbytes:
            cuda = self.device.type == "cuda"
            buf = self._remote_bufs[i] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
            self._remote_uploads[i] = torch.cuda.Event() if cuda else None
        return buf

    # ------------------------------------------------------------- publish
    def publish(self, seq_id: SeqId) -> int:
        """Share the sequence's full blocks whose token ids are known with the remote tier,
        in the background; return how many were handed to it (not those the tier says it
        wrote or read recently: ``needs_write``). The blocks must hold their keys and
        values (computed)."""
        if self.remote is None:
            raise KVForgeError("publish(): the cache has no remote tier (KVCache(cfg, remote=RedisTier(...)))")
        self._sync_remote_layout()
        keys, blocks = self.manager.keyed_blocks(seq_id)
        if keys and self.on_publish is not None:  # every rank decides what its own share lacks
            self.on_publish(keys, blocks)
        return self.publish_blocks(keys, blocks)

    def publish_blocks(self, keys: list[bytes], blocks: list[int]) -> int:
        """Hand these blocks (computed, under these prefix keys) to the remote tier, in the
        background, except those it says it has (``needs_write``); return how many."""
        assert self.remote is not None
        wanted = getattr(self.remote, "needs_write", None)  # optional: skip blocks the tier has
        if wanted is not None and keys:
            keep = [i for i, w in enumerate(wanted(keys)) if w]
            keys, blocks = [keys[i] for i in keep], [blocks[i] for i in keep]
        if not keys:
            return 0
        self.remote.publish(keys, self._copy_out(np.asarray(blocks, dtype=np.int64)))
        return len(keys)

    def copy_remote_run(self, keys: list[bytes], device_blocks: list[int]) -> bool:
        """Fetch ``keys`` from the remote tier now and write them into ``device_blocks``; False
        unless every one came and was written (another rank's share of an admission's fetch)."""
        assert self.remote is not None
        run = self._fetch_now(list(keys))
        if len(run) < len(keys):
            for kept in run:
                self._drop(kept)
            return False
        self._remote_payloads, self._remote_keys = run, list(keys)
        try:
            self._copy_from_remote(list(device_blocks))
        except Exception as exc:
            log.warning("copying %d block(s) from the remote tier failed (%s)", len(device_blocks), exc)
            return False
        return True

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
