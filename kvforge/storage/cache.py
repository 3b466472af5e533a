"""``KVCache``: device storage for keys and values plus the bookkeeping.

Layout. Keys and values live in *chunks*: separate device tensors of shape
``[num_layers, 2, chunk_blocks, block_size, num_kv_heads, head_dim]`` (index 0
of dim 1 holds keys, 1 values). Block ``b`` lives in chunk ``b //
chunk_blocks`` at local index ``b % chunk_blocks``. For layer ``l`` the kernels
see ``[chunk[l, 0] for chunk in chunks]`` (each ``[chunk_blocks, block_size,
num_kv_heads, head_dim]``) and an int64 table of each chunk's element offset
from chunk 0 (:attr:`KVCache.chunk_offsets`).

Chunks make the pool elastic without a second copy of it: the pool grows by
allocating a chunk and shrinks, after :meth:`KVCache.compact_cache` packed the
live blocks low, by dropping the emptied top chunks and emptying PyTorch's
caching allocator, so the device's free memory grows by what was released.
Peak memory during compaction is the pre-compaction footprint (blocks move
inside the existing chunks). See ``docs/compaction.md``.

Ownership: the cache owns the chunk tensors and a
:class:`~kvforge.core.manager.BlockManager`; callers hold only sequence ids
and the tensors returned for one step. Block tables fetched before a
compaction are stale after it (call compaction between steps).
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from kvforge import kernels
from kvforge.core.manager import AddSequenceResult, BlockManager
from kvforge.config import CacheConfig
from kvforge.errors import ConfigError, KernelError, KVForgeError, OutOfBlocksError
from kvforge.core.pool import AllocationStats, BlockPool
from kvforge.core.compaction import should_compact
from kvforge.core.prefix import PrefixIndex, PrefixStats
from kvforge.storage.device import resolve_device

if TYPE_CHECKING:
    from kvforge.storage.profile import MemoryProfile

__all__ = ["KVCache", "KvCache"]

log = logging.getLogger(__name__)
SeqId = Hashable
T = TypeVar("T")


class KVCache:
    """A paged KV cache on one device: storage, block tables, prefix reuse, compaction.

    ``backend`` picks the kernels: ``"auto"`` (Triton on GPUs, torch on the
    CPU), ``"triton"`` or ``"torch"``.
    """

    def __init__(self, config: CacheConfig, *, backend: str = "auto") -> None:
        if not isinstance(config, CacheConfig):
            raise KVForgeError(f"KVCache needs a CacheConfig, got {type(config).__name__}")
        if backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.config = config
        self.device = resolve_device(config.device)
        self.backend = backend
        self.chunk_blocks = config.resolved_chunk_blocks
        self.max_chunks = math.ceil(config.num_blocks / self.chunk_blocks)
        initial = config.initial_blocks if config.initial_blocks is not None else config.num_blocks
        self.min_chunks = 1
        n_chunks = math.ceil(initial / self.chunk_blocks)
        self._chunks: list[Tensor] = []
        self._layer_views: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = []
        self._offsets: Tensor | None = None
        self.manager = BlockManager(config.num_blocks, config.block_size,
                                    enable_prefix_caching=config.enable_prefix_caching, capacity=0)
        self._relocation_listeners: list[Callable[[dict[int, int]], None]] = []
        self._slot_dtype = np.int32 if config.num_blocks * config.block_size < 2**31 else np.int64
        self._check_layout()
        self._grow_to(n_chunks)

    def _check_layout(self) -> None:
        """Refuse, before allocating anything, a shape the kernels cannot run."""
        c = self.config
        probe = torch.empty((1, c.block_size, c.num_kv_heads, c.head_dim), dtype=c.dtype, device="meta")
        try:
            kernels.describe_cache(probe, probe)
        except KernelError as exc:
            raise ConfigError(f"the kernels cannot use this cache layout: {exc}") from None

    # -------------------------------------------------------------- storage
    @property
    def pool(self) -> BlockPool:
        """The block pool (ids and reference counts)."""
        return self.manager.pool

    @property
    def prefix(self) -> PrefixIndex:
        """The prefix index (a null index when prefix caching is off)."""
        return self.manager.prefix

    @property
    def num_chunks(self) -> int:
        """Chunks allocated on the device now."""
        return len(self._chunks)

    @property
    def capacity_blocks(self) -> int:
        """Blocks backed by device memory now."""
        return self.pool.capacity

    @property
    def chunks(self) -> tuple[Tensor, ...]:
        """The storage chunks ``[num_layers, 2, chunk_blocks, block_size, kv_heads, head_dim]``."""
        return tuple(self._chunks)

    @property
    def chunk_offsets(self) -> Tensor | None:
        """Element offsets of each chunk from chunk 0 (int64, on the device); None for one chunk."""
        return self._offsets

    @property
    def storage_bytes(self) -> int:
        """Bytes of the chunk tensors allocated now (what the device holds for this cache)."""
        return sum(c.numel() * c.element_size() for c in self._chunks)

    def _chunk_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.num_layers, 2, self.chunk_blocks, c.block_size, c.num_kv_heads, c.head_dim)

    def _allocate_chunk(self) -> Tensor:
        # zeroed, so that a kernel that reads a padded slot never meets NaN garbage
        return torch.zeros(self._chunk_shape(), dtype=self.config.dtype, device=self.device)

    def _refresh_views(self) -> None:
        layers = []
        for l in range(self.config.num_layers):
            layers.append((tuple(c[l, 0] for c in self._chunks), tuple(c[l, 1] for c in self._chunks)))
        self._layer_views = layers
        self._offsets = kernels.chunk_offsets(self._chunks) if len(self._chunks) > 1 else None

    def _grow_to(self, n_chunks: int) -> None:
        """Allocate chunks until there are ``n_chunks``; on device OOM nothing changes."""
        n_chunks = min(n_chunks, self.max_chunks)
        new: list[Tensor] = []
        try:
            for _ in range(n_chunks - len(self._chunks)):
                new.append(self._allocate_chunk())
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
                raise
            del new
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            want = (n_chunks - len(self._chunks)) * self.chunk_blocks
            raise OutOfBlocksError(
                f"the device cannot back {want} more blocks "
                f"({n_chunks - len(self._chunks)} chunk(s) of {self.chunk_blocks} blocks, "
                f"{self.config.bytes_per_block * self.chunk_blocks} bytes each): {exc}",
                requested=want, available=self.pool.num_available_blocks) from None
        if not new:
            return
        self._chunks.extend(new)
        self._refresh_views()
        self.pool.grow(min(len(self._chunks) * self.chunk_blocks, self.config.num_blocks))
        log.debug("grew KV storage to %d chunks", len(self._chunks))

    def _growing(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a bookkeeping operation; if it refused for lack of blocks (changing
        nothing) and the config allows more, back the missing blocks with new
        chunks and run it again. Nothing grows for any other refusal."""
        try:
            return op(*args, **kwargs)
        except OutOfBlocksError as exc:
            short = exc.requested - exc.available
            if short <= 0 or short > self.config.num_blocks - self.capacity_blocks:
                raise
            self._grow_to(len(self._chunks) + math.ceil(short / self.chunk_blocks))
        return op(*args, **kwargs)

    def grow(self, num_blocks: int) -> None:
        """Back at least ``num_blocks`` more blocks with device memory (up to ``num_blocks`` of the config)."""
        if num_blocks > self.config.num_blocks - self.capacity_blocks:
            raise OutOfBlocksError(
                f"cannot grow by {num_blocks} blocks: {self.capacity_blocks} of at most "
                f"{self.config.num_blocks} are backed", requested=num_blocks,
                available=self.config.num_blocks - self.capacity_blocks)
        self._grow_to(math.ceil((self.capacity_blocks + num_blocks) / self.chunk_blocks))

    # ------------------------------------------------------------ sequences
    def can_add_sequence(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                         salt: Hashable | None = None) -> bool:
        """Whether :meth:`add_sequence` would fit now, counting storage growth still allowed."""
        need = self.manager.num_blocks_needed(num_tokens, prompt_token_ids, salt)
        return need <= self.num_available_blocks

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation may take: free, evictable, and not yet backed but allowed."""
        return self.pool.num_available_blocks + (self.config.num_blocks - self.pool.capacity)

    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None) -> AddSequenceResult:
        """Start a sequence; see :meth:`BlockManager.add_sequence`.

        ``r.num_cached_tokens`` prompt tokens are already in the cache;
        ``r.slots`` are where the next tokens' keys/values go.
        """
        return self._growing(self.manager.add_sequence, seq_id, prompt_token_ids, salt, num_tokens=num_tokens)

    def append_tokens(self, seq_id: SeqId, n: int, token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Slot ids (int64) for ``n`` new tokens of a sequence; copy-on-write applied."""
        slots = self._growing(self.manager.append_tokens, seq_id, n, token_ids)
        self._apply_pending_copies()
        return slots

    def append_token(self, seq_id: SeqId, token_id: int | None = None) -> int:
        """Slot id for one new token."""
        return int(self.append_tokens(seq_id, 1, None if token_id is None else [token_id])[0])

    def append_tokens_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] = 1,
                            token_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Slot mapping (int64) for new tokens of many sequences, all or nothing."""
        slots = self._growing(self.manager.append_tokens_batch, seq_ids, num_tokens, token_ids)
        self._apply_pending_copies()
        return slots

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """``child_id`` shares all of ``parent_id``'s blocks; no data is copied."""
        self.manager.fork(parent_id, child_id)

    def free_sequence(self, seq_id: SeqId) -> None:
        """Release a sequence; its cached full blocks stay reusable until evicted."""
        self.manager.free_sequence(seq_id)

    def get_block_for_position(self, seq_id: SeqId, pos: int) -> tuple[int, int]:
        """``(block_id, offset)`` of token ``pos`` of a sequence."""
        return self.manager.get_block_for_position(seq_id, pos)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A sequence's block ids."""
        return self.manager.block_table(seq_id)

    def seq_len(self, seq_id: SeqId) -> int:
        """Tokens with a slot in the sequence."""
        return self.manager.num_tokens(seq_id)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self.manager

    @property
    def seq_ids(self) -> list[SeqId]:
        """Ids of the live sequences."""
        return self.manager.seq_ids

    @property
    def num_cow_copies(self) -> int:
        """Blocks copied by copy-on-write so far."""
        return self.manager.num_cow_copies

    def _apply_pending_copies(self) -> None:
        pairs = self.manager.take_pending_copies()
        if pairs:
            self.copy_blocks(pairs)

    # ----------------------------------------------------------- tensors
    def to_device(self, array: np.ndarray) -> Tensor:
        """A numpy array as a tensor on the cache's device: pinned staging and one
        non-blocking copy on a GPU (no sync per sequence)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return host.clone()
        staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    def block_tables(self, seq_ids: Sequence[SeqId], width: int | None = None) -> Tensor:
        """Padded ``[len(seq_ids), width]`` int32 block tables on the device (-1 = padding)."""
        return self.to_device(self.manager.block_table_array(seq_ids, width).astype(np.int32, copy=False))

    def context_lens(self, seq_ids: Sequence[SeqId]) -> Tensor:
        """``[len(seq_ids)]`` int32 token counts on the device."""
        return self.to_device(self.manager.context_lens(seq_ids))

    def slot_mapping(self, slots_or_seq_ids: np.ndarray | Sequence[SeqId],
                     num_last_tokens: int | Sequence[int] | None = None) -> Tensor:
        """Slots as a device tensor (int32 while every slot id fits, else int64): either
        given slot ids (a numpy array), or the last ``num_last_tokens`` tokens of each
        listed sequence."""
        if num_last_tokens is None and isinstance(slots_or_seq_ids, np.ndarray):
            slots = slots_or_seq_ids
        else:
            slots = self.manager.slot_mapping(slots_or_seq_ids, 1 if num_last_tokens is None else num_last_tokens)
        return self.to_device(slots.astype(self._slot_dtype, copy=False))

    def layer_kv(self, layer: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Layer ``layer``'s key and value chunk views, as the kernels take them."""
        if not 0 <= layer < self.config.num_layers:
            raise KVForgeError(f"layer {layer} out of range (the cache has {self.config.num_layers} layers)")
        return self._layer_views[layer]

    def write(self, layer: int, slot_mapping: Tensor | np.ndarray | Sequence[int], k: Tensor, v: Tensor) -> None:
        """Store keys and values ``[num_tokens, num_kv_heads, head_dim]`` at their slots (-1 skipped)."""
        kc, vc = self.layer_kv(layer)
        if not isinstance(slot_mapping, Tensor):
            slot_mapping = self.to_device(np.asarray(slot_mapping, dtype=np.int64))
        kernels.store_kv(k, v, kc, vc, slot_mapping, chunk_offsets=self._offsets, backend=self.backend)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy blocks ``src -> dst`` (all layers, keys and values) in one launch."""
        if len(pairs) == 0:
            return
        try:
            arr = np.asarray(pairs, dtype=np.int64)
        except (TypeError, ValueError):
            raise KVForgeError(f"copy_blocks() needs (src, dst) pairs of block ids, got {pairs!r}") from None
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise KVForgeError(f"copy_blocks() needs (src, dst) pairs of block ids, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.capacity_blocks:
            raise KVForgeError(f"copy_blocks(): block ids must lie in [0, {self.capacity_blocks}), "
                               f"got {arr.min()}..{arr.max()}")
        src = self.to_device(arr[:, 0].copy())
        dst = self.to_device(arr[:, 1].copy())
        kernels.copy_blocks(self._chunks, src, dst, chunk_offsets=self._offsets, backend=self.backend)

    def gather(self, seq_id: SeqId, layer: int) -> tuple[Tensor, Tensor]:
        """A sequence's keys and values of one layer, ``[num_tokens, num_kv_heads, head_dim]`` each."""
        n = self.seq_len(seq_id)
        bs = self.config.block_size
        table = torch.tensor(self.block_table(seq_id), dtype=torch.int64, device=self.device)
        pos = torch.arange(n, device=self.device)
        blocks = table[pos // bs]
        chunk, local = blocks // self.chunk_blocks, blocks % self.chunk_blocks
        kc, vc = self.layer_kv(layer)
        shape = (n, self.config.num_kv_heads, self.config.head_dim)
        k = torch.empty(shape, dtype=self.config.dtype, device=self.device)
        v = torch.empty_like(k)
        for c in torch.unique(chunk).tolist():
            sel = chunk == c
            k[sel] = kc[c][local[sel], pos[sel] % bs]
            v[sel] = vc[c][local[sel], pos[sel] % bs]
        return k, v

    # ----------------------------------------------------------- metrics
    @property
    def stats(self) -> AllocationStats:
        """The pool's allocation statistics."""
        return self.pool.stats

    def prefix_stats(self) -> PrefixStats:
        """Prefix-cache counters."""
        return self.prefix.stats()

    def fragmentation_ratio(self) -> float:
        """External fragmentation: free blocks trapped below live ones, over free blocks."""
        return self.pool.fragmentation_ratio()

    def internal_fragmentation(self) -> float:
        """Reserved token slots holding no token, over reserved slots."""
        return self.manager.internal_fragmentation()

    def live_kv_bytes(self) -> int:
        """Bytes holding live keys/values (distinct token slots in use)."""
        return self.manager.live_token_slots() * self.config.bytes_per_token

    def memory_efficiency(self) -> float:
        """Bytes of live keys/values over bytes the cache holds on the device."""
        total = self.storage_bytes
        return self.live_kv_bytes() / total if total else 0.0

    def memory_profile(self) -> MemoryProfile:
        """A :class:`~kvforge.storage.profile.MemoryProfile` of the cache now."""
        from kvforge.storage.profile import MemoryProfile
        return MemoryProfile.of(self)

    # --------------------------------------------------------- compaction
    def should_compact(self) -> bool:
        """Compaction is enabled, external fragmentation exceeds the threshold, memory
        efficiency is below 70%, and packing would hand at least one chunk back.

        The last condition keeps a pool full of cached (evictable) blocks, whose
        few free blocks make the ratio swing, from compacting for nothing."""
        if not self.config.enable_compaction:
            return False
        return should_compact(self.fragmentation_ratio(), self.memory_efficiency(),
                              self.config.compaction_threshold, self.releasable_chunks())

    def releasable_chunks(self) -> int:
        """Chunks a compaction would hand back now (the blocks in use, packed, need fewer)."""
        in_use = self.pool.num_allocated_blocks + self.pool.num_evictable_blocks
        return len(self._chunks) - max(self.min_chunks, math.ceil(in_use / self.chunk_blocks))

    def maybe_compact(self) -> int:
        """With ``auto_compact``, compact when :meth:`should_compact` holds; bytes returned.

        Call it at a safe point: between engine steps."""
        if self.config.auto_compact and self.should_compact():
            return self.compact_cache()
        return 0

    def add_relocation_listener(self, fn: Callable[[dict[int, int]], None]) -> None:
        """Call ``fn({old_id: new_id})`` after every compaction that moved blocks."""
        self._relocation_listeners.append(fn)

    def compact_cache(self, release: bool = True, keep_cached: bool = True) -> int:
        """Pack live blocks into the lowest ids and hand emptied chunks back; return the bytes released.

        Live blocks go to ids ``0..k-1``; cached blocks nobody references follow
        them (all of them with ``keep_cached``, else only those that fit in the
        chunks the live blocks need; the rest are evicted). One batched
        :func:`~kvforge.kernels.copy_blocks` moves the live blocks and a second
        the cached ones; then every block table, the prefix index and the free
        list are rewritten. If a copy fails, no live data was touched: the
        tables still point at the source blocks (only the planned evictions of
        cached blocks have happened).
        """
        start = time.perf_counter()
        keep = None
        if not keep_cached:
            live = self.pool.num_allocated_blocks
            keep = max(self.min_chunks, math.ceil(live / self.chunk_blocks)) * self.chunk_blocks
        plan = self.manager.plan_compaction(keep_blocks=keep)
        # evicting first is safe (it drops cache entries, never live data), and it means a
        # copy that raises below leaves no cache entry pointing at an overwritten block
        self.pool.evict_blocks(plan.evict)
        for phase in (plan.moves, plan.cached_moves):
            if phase:
                self.copy_blocks(phase)  # may raise: the tables still point at the sources
        self.manager.apply_compaction(plan, evicted=True)
        if plan.num_moves:
            mapping = dict(plan.all_moves)
            for fn in self._relocation_listeners:
                fn(mapping)
        released = self.release_unused_chunks() if release else 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        duration = (time.perf_counter() - start) * 1e3
        self.pool.record_compaction(time.time() * 1e3, duration, plan.num_moves, 0)
        self.pool.record_bytes_returned(released)
        log.info("compaction moved %d blocks, evicted %d and released %d bytes in %.2f ms",
                 plan.num_moves, len(plan.evict), released, duration)
        return released

    def release_unused_chunks(self) -> int:
        """Drop the chunks above the highest block in use (keeping ``min_chunks``);
        return the bytes handed back to the device."""
        high = self.pool.high_water_mark()
        keep = max(self.min_chunks, math.ceil(high / self.chunk_blocks))
        if keep >= len(self._chunks):
            return 0
        self.pool.shrink(min(keep * self.chunk_blocks, self.config.num_blocks))
        dropped = self._chunks[keep:]
        released = sum(c.numel() * c.element_size() for c in dropped)
        del self._chunks[keep:]
        del dropped
        self._refresh_views()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return released

    def reclaim_unused_blocks(self) -> int:
        """Evict every cached block nobody references back to the free list; return how many."""
        return self.pool.reclaim_unused_blocks()

    def sort_free_lists(self) -> None:
        """Order the free list so the next allocations take the lowest ids."""
        self.pool.sort_free_list()

    def check_invariants(self) -> None:
        """Assert bookkeeping and storage agree."""
        self.manager.check_invariants()
        assert self.pool.capacity == min(len(self._chunks) * self.chunk_blocks, self.config.num_blocks)
        assert len(self._layer_views) == self.config.num_layers

    def __repr__(self) -> str:
        return (f"KVCache(blocks={self.capacity_blocks}/{self.config.num_blocks}, block_size={self.config.block_size}, "
                f"sequences={len(self.manager)}, device={self.device})")


#: ROCmForge's name.
KvCache = KVCache
