"""``KVCache``: the storage facade an engine talks to.

A cache owns the device chunks (:class:`~kvforge.storage.device.DeviceStorage`)
and a :class:`~kvforge.core.BlockManager` (block tables, prefix index, pool).
Callers hold only sequence ids and the tensors of one step. A step's kernel
inputs come from one call, :meth:`KVCache.prepare_step`; the model writes
keys/values with :meth:`KVCache.write` and reads them through
:meth:`KVCache.layer_view` (one described view per layer, rebuilt only when
the chunks change).

Chunks make the pool elastic without a second copy of it: the pool grows by
allocating a chunk and shrinks, after :meth:`KVCache.compact_cache` packed the
live blocks low, by dropping the emptied top chunks and emptying PyTorch's
caching allocator, so the device's free memory grows by what was released.
Peak memory during compaction is the pre-compaction footprint (blocks move
inside the existing chunks). See ``docs/compaction.md``. Block tables fetched
before a compaction are stale after it (compact between steps).

An fp8 cache (``CacheConfig(dtype="fp8_e4m3")``) quantizes in :meth:`KVCache.write`
and dequantizes in the kernels and :meth:`KVCache.gather`; its scales start at
1.0 and are set per layer by :meth:`KVCache.set_kv_scales` (a checkpoint's
``k_scale`` / ``v_scale``) or :meth:`KVCache.calibrate_kv_scales`, before any
keys are stored (``docs/fp8.md``).
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from kvforge import kernels
from kvforge.config import CacheConfig
from kvforge.core.compaction import should_compact
from kvforge.core.manager import AddSequenceResult, BlockManager
from kvforge.core.pool import AllocationStats, BlockPool
from kvforge.core.prefix import PrefixIndex, PrefixStats
from kvforge.errors import ConfigError, KernelError, KVForgeError, OutOfBlocksError
from kvforge.kernels.fp8 import KVScales, as_scale, scale_for_amax
from kvforge.storage import compaction
from kvforge.storage.device import DeviceStorage, resolve_device, slot_array
from kvforge.storage.host import HostStorage
from kvforge.storage.layer_groups import LayerGroups
from kvforge.storage.step import TABLE_WIDTH_MULTIPLE, FixedLayout, Staging, StepBatch, build_step
from kvforge.storage.remote import RemoteTier
from kvforge.storage.pending import PendingMethods
from kvforge.storage.sharing import RemoteMethods
from kvforge.storage.tiers import TierMethods

if TYPE_CHECKING:
    from kvforge.storage.profile import MemoryProfile

__all__ = ["KVCache", "KvCache"]

log = logging.getLogger(__name__)

#: on the CPU, a pool up to this size is allocated (and zeroed) at construction
CPU_EAGER_BYTES = 256 * 2**20
SeqId = Hashable
T = TypeVar("T")


class KVCache(TierMethods, RemoteMethods, PendingMethods):
    """A paged KV cache on one device: storage, block tables, prefix reuse, compaction,
    and with ``CacheConfig(host_memory=...)`` a pinned host tier (spills, swaps:
    :mod:`kvforge.storage.tiers`).

    ``backend`` picks the kernels: ``"auto"`` (Triton on GPUs, torch on the
    CPU), ``"triton"`` or ``"torch"``. ``remote`` shares full blocks with other
    instances through a :class:`~kvforge.storage.remote.RemoteTier` (e.g.
    :class:`~kvforge.storage.redis_tier.RedisTier`; :mod:`kvforge.storage.sharing`);
    ``model`` names the weights for it (two models of one shape never share).
    """

    def __init__(self, config: CacheConfig, *, backend: str = "auto", remote: RemoteTier | None = None,
                 model: str = "", tensor_parallel: tuple[int, int] = (0, 1)) -> None:
        if not isinstance(config, CacheConfig):
            raise KVForgeError(f"KVCache needs a CacheConfig, got {type(config).__name__}")
        if backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.config = config
        #: ``(rank, size)``: this cache holds rank ``rank``'s share of the KV heads of ``size``
        #: ranks (tensor parallelism; its remote payloads are named by it too)
        self.tensor_parallel = tensor_parallel
        self.device = resolve_device(config.device)
        self.backend = backend
        self.chunk_blocks = config.resolved_chunk_blocks
        self.max_chunks = math.ceil(config.num_blocks / self.chunk_blocks)
        initial = config.initial_blocks if config.initial_blocks is not None else self._default_initial_blocks()
        self.min_chunks = 1
        n_chunks = math.ceil(initial / self.chunk_blocks)
        self.storage = DeviceStorage(config, self.device, self.chunk_blocks, backend)
        self._staging: Staging | None = None  # the eager step buffer
        self._fixed: tuple[Staging, FixedLayout] | None = None  # the padded decode layout graphs read
        self.manager = BlockManager(config.num_blocks, config.block_size,
                                    enable_prefix_caching=config.enable_prefix_caching, capacity=0,
                                    num_host_blocks=config.num_host_blocks)
        # copy-on-write copies the data before the tables change (a failed copy changes nothing)
        self.manager.copy_blocks = self.copy_blocks
        self.host_storage = HostStorage(config, self.storage) if config.num_host_blocks else None
        #: the block tables of layer groups 1.. (sliding-window layers: :mod:`kvforge.storage.layer_groups`)
        self.groups: LayerGroups | None = None
        #: each layer's group (0 for every layer unless ``config.kv_groups`` splits them): a step's
        #: inputs for layer ``l`` are ``batch.for_group(cache.layer_groups[l])``
        self.layer_groups: tuple[int, ...] = tuple(config.layer_group(l)[0] for l in range(config.num_layers))
        if len(config.kv_groups) > 1:
            if remote is not None:
                raise ConfigError("a remote tier with layer_windows: the remote tier does not hold caches whose "
                                  "sliding-window layers free their blocks yet (leave layer_windows None)")
            self.groups = LayerGroups(self.manager, [(g.window, i) for i, g in enumerate(config.kv_groups)][1:],
                                      self.copy_blocks)
        self._wire_host_tier()
        self._wire_remote(remote, model)
        self._relocation_listeners: list[Callable[[dict[int, int]], None]] = []
        self._slot_dtype = np.int32 if config.num_blocks * config.block_size < 2**31 else np.int64
        self._check_layout()
        self._grow_to(n_chunks)

    def _default_initial_blocks(self) -> int:
        """Blocks to back at construction when the config does not say.

        On a GPU, all of them: one allocation is fast there, and addresses that
        never move keep captured CUDA graphs valid. On the CPU, zeroing a large
        budget costs seconds (about 2.5 s per GiB on a busy 2-core machine), so
        a pool beyond :data:`CPU_EAGER_BYTES` starts with the chunks that hold
        that much and grows a chunk at a time as blocks are needed."""
        c = self.config
        if self.device.type != "cpu" or c.estimated_memory_bytes() <= CPU_EAGER_BYTES:
            return c.num_blocks
        return max(self.chunk_blocks, CPU_EAGER_BYTES // c.bytes_per_block)

    def _check_layout(self) -> None:
        """Refuse, before allocating anything, a shape the kernels cannot run."""
        c = self.config
        probe = torch.empty((1, c.block_size, c.num_kv_heads, c.head_dim), dtype=c.dtype, device="meta")
        fp8 = dict(k_scale=1.0, v_scale=1.0, model_dtype=c.resolved_model_dtype) if c.is_fp8 else {}
        try:
            kernels.describe_cache(probe, probe, **fp8)  # type: ignore[arg-type]
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
        return self.storage.num_chunks

    @property
    def capacity_blocks(self) -> int:
        """Blocks backed by device memory now."""
        return self.pool.capacity

    @property
    def chunks(self) -> tuple[Tensor, ...]:
        """The storage chunks ``[num_layers, 2, chunk_blocks, block_size, kv_heads, head_dim]``."""
        return self.storage.chunks

    @property
    def chunk_offsets(self) -> Tensor | None:
        """Element offsets of each chunk from chunk 0 (int64, on the device); None for a pool
        that never holds more than one chunk."""
        return self.storage.offsets

    @property
    def storage_bytes(self) -> int:
        """Bytes of the chunk tensors allocated now (what the device holds for this cache)."""
        return self.storage.num_bytes

    @property
    def address_signature(self) -> tuple[int, int]:
        """Changes whenever device addresses a captured CUDA graph holds may have moved:
        the chunk set (grow, release) or the fixed step buffer (``prepare_step(pad_to=)``)."""
        return self.storage.version, 0 if self._fixed is None else self._fixed[0].generation_id

    def _grow_to(self, n_chunks: int) -> None:
        """Allocate chunks until there are ``n_chunks``; on device OOM nothing changes."""
        n_chunks = min(n_chunks, self.max_chunks)
        if n_chunks <= self.storage.num_chunks:
            return
        try:
            self.storage.add_chunks(n_chunks - self.storage.num_chunks)
        except OutOfBlocksError as exc:
            raise OutOfBlocksError(str(exc), requested=exc.requested,
                                   available=self.pool.num_available_blocks) from None
        self.pool.grow(min(self.storage.num_chunks * self.chunk_blocks, self.config.num_blocks))

    def _growing(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a bookkeeping operation; if it refused for lack of blocks (changing
        nothing) and the config allows more, back the missing blocks with new
        chunks and run it again. Nothing grows for any other refusal."""
        manager = self.manager
        try:
            for _ in range(3):  # a grouped cache may learn a second shortfall once the first is met
                try:
                    return op(*args, **kwargs)
                except OutOfBlocksError as exc:
                    short = exc.requested - exc.available
                    if short <= 0 or short > self.config.num_blocks - self.capacity_blocks:
                        raise
                    self._grow_to(self.storage.num_chunks + math.ceil(short / self.chunk_blocks))
            return op(*args, **kwargs)
        finally:
            if manager.host._pending:  # blocks evicted by this call are copied out before any write
                manager.flush_spills()

    def grow(self, num_blocks: int) -> None:
        """Back at least ``num_blocks`` more blocks with device memory (up to ``num_blocks`` of the config)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 0:
            raise KVForgeError(f"grow() needs a block count >= 0, got {num_blocks!r}")
        num_blocks = int(num_blocks)
        if num_blocks > self.config.num_blocks - self.capacity_blocks:
            raise OutOfBlocksError(
                f"cannot grow by {num_blocks} blocks: {self.capacity_blocks} of at most "
                f"{self.config.num_blocks} are backed", requested=num_blocks,
                available=self.config.num_blocks - self.capacity_blocks)
        self._grow_to(math.ceil((self.capacity_blocks + num_blocks) / self.chunk_blocks))

    # ------------------------------------------------------------ sequences
    def num_blocks_needed(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                          salt: Hashable | None = None, *, chunk_tokens: int | None = None) -> int:
        """Blocks :meth:`add_sequence` would take for a new sequence (cached prefix
        blocks held by others cost nothing; with layer groups, every group's blocks).
        ``chunk_tokens``: the tokens are prefilled in chunks of at most that many: with
        sliding-window layer groups, the most they hold at once (a window group keeps its
        window and two chunks); it changes nothing otherwise."""
        if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                         or chunk_tokens < 1):
            raise KVForgeError(f"num_blocks_needed(): chunk_tokens must be an int >= 1 or None, got {chunk_tokens!r}")
        if self.groups is not None:
            return self.groups.num_blocks_needed(num_tokens, prompt_token_ids, salt, chunk_tokens)
        return self.manager.num_blocks_needed(num_tokens, prompt_token_ids, salt)

    def can_add_sequence(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                         salt: Hashable | None = None) -> bool:
        """Whether :meth:`add_sequence` would fit now, counting storage growth still allowed."""
        return self.num_blocks_needed(num_tokens, prompt_token_ids, salt) <= self.num_available_blocks

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation may take: free, evictable, and not yet backed but allowed."""
        return self.pool.num_available_blocks + (self.config.num_blocks - self.pool.capacity)

    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None) -> AddSequenceResult:
        """Start a sequence; see :meth:`BlockManager.add_sequence`.

        ``r.num_cached_tokens`` prompt tokens are already in the cache;
        ``r.slots`` are where the next tokens' keys/values go (group 0's: the other
        layer groups' slots come with :meth:`prepare_step`).
        """
        if self.groups is not None:
            return self._growing(self.groups.add_sequence, seq_id, prompt_token_ids, salt, num_tokens)
        return self._growing(self.manager.add_sequence, seq_id, prompt_token_ids, salt, num_tokens=num_tokens)

    def append_tokens(self, seq_id: SeqId, n: int, token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Slot ids (int64) for ``n`` new tokens of a sequence, all or nothing; a shared
        partial last block is copied first (copy-on-write: a failed copy changes nothing)."""
        if self.groups is not None:
            return self._growing(self.groups.append, [seq_id], n, token_ids, self._append_one)
        return self._growing(self.manager.append_tokens, seq_id, n, token_ids)

    def _append_one(self, seq_ids: Sequence[SeqId], n: Any, token_ids: Any) -> np.ndarray:
        return self.manager.append_tokens(seq_ids[0], n, token_ids)

    def append_token(self, seq_id: SeqId, token_id: int | None = None) -> int:
        """Slot id for one new token."""
        return int(self.append_tokens(seq_id, 1, None if token_id is None else [token_id])[0])

    def append_tokens_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] = 1,
                            token_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Slot mapping (int64) for new tokens of many sequences, all or nothing."""
        if self.groups is not None:
            return self._growing(self.groups.append, seq_ids, num_tokens, token_ids, self.manager.append_tokens_batch)
        return self._growing(self.manager.append_tokens_batch, seq_ids, num_tokens, token_ids)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """``child_id`` shares all of ``parent_id``'s blocks; no data is copied."""
        if self.groups is not None:
            self.groups.fork(parent_id, child_id)
        else:
            self.manager.fork(parent_id, child_id)

    def free_sequence(self, seq_id: SeqId, *, publish: bool = True) -> None:
        """Release a sequence; its cached full blocks stay reusable until evicted. With a
        remote tier they are published first (:meth:`publish`), unless ``publish`` is
        False (blocks whose keys and values were never computed: a failed step)."""
        if publish and self.remote is not None and seq_id in self.manager and not self.is_swapped(seq_id):
            try:
                self.publish(seq_id)
            except KVForgeError:
                raise
            except Exception as exc:  # a copy that failed: nothing is shared, nothing is lost
                log.warning("publishing sequence %r failed (%s); it is freed unshared", seq_id, exc)
        if self.groups is not None and seq_id in self.manager:
            self.groups.free(seq_id)
        self.manager.free_sequence(seq_id)

    def get_block_for_position(self, seq_id: SeqId, pos: int) -> tuple[int, int]:
        """``(block_id, offset)`` of token ``pos`` of a sequence."""
        return self.manager.get_block_for_position(seq_id, pos)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A sequence's block ids (layer group 0's)."""
        return self.manager.block_table(seq_id)

    def blocks_of_tokens(self, seq_id: SeqId, start: int, stop: int) -> list[int]:
        """The blocks holding tokens ``start .. stop - 1`` of a sequence, in every layer group
        (those a window group released excluded): what to drop from the prefix cache when a
        step that reserved those tokens never computed them (:meth:`drop_cached_blocks`)."""
        n = self.seq_len(seq_id)
        if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or \
                not isinstance(stop, int) or not 0 <= start <= stop <= n:
            raise KVForgeError(f"blocks_of_tokens(): expected 0 <= start <= stop <= {n} (the sequence's "
                               f"tokens), got {start!r}, {stop!r}")
        if start == stop:
            return []
        bs = self.config.block_size
        lo, hi = start // bs, -(-stop // bs)
        blocks = self.block_table(seq_id)[lo:hi]
        if self.groups is not None:
            row = self.manager._seqs.row(seq_id)
            for g in self.groups.tables:
                blocks += g.blocks_in(row, lo, hi)
        return blocks

    def seq_len(self, seq_id: SeqId) -> int:
        """Tokens with a slot in the sequence."""
        return self.manager.num_tokens(seq_id)

    def num_pending_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens given to :meth:`add_sequence` that have no slot yet (chunked prefill)."""
        return self.manager.num_pending_tokens(seq_id)

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

    # ------------------------------------------------------------- steps
    def prepare_step(self, seq_ids: Sequence[SeqId], num_new_tokens: int | Sequence[int] = 1, *,
                     num_decodes: int | None = None, logits_indices: np.ndarray | Sequence[int] | None = None,
                     input_ids: np.ndarray | Sequence[int] | None = None,
                     pad_to: tuple[int, int] | None = None) -> StepBatch:
        """The device inputs of one forward step, built once and uploaded in one copy.

        ``seq_ids``: the step's sequences, decodes first; ``num_new_tokens``:
        tokens each computes this step (an int for all, or one per sequence),
        already reserved by :meth:`append_tokens_batch` / :meth:`add_sequence`,
        so they are each sequence's last tokens. ``num_decodes``: how many
        leading sequences are decodes (one token each; default: all, when every
        count is 1). ``logits_indices``: rows whose logits are wanted (default:
        every row of a pure decode step, else the last row of each sequence).
        ``input_ids`` ``[T]``: the tokens' ids, when the caller has them on
        hand; by default the cache's own (every one must be known).
        ``pad_to=(rows, width)`` (a pure decode step only) pads to a fixed
        layout of ``rows`` sequences and ``width`` table columns in a buffer
        that never moves: what a captured CUDA graph reads. Padding rows have
        slot -1 and context length 0 (they store and read nothing).
        """
        view = self.manager.step_view(seq_ids, num_new_tokens, width_multiple=TABLE_WIDTH_MULTIPLE)
        parts = () if self.groups is None else self.groups.step_parts(
            seq_ids, view.positions, view.query_start_loc, view.block_tables.shape[1])
        return build_step(view, self._slot_dtype, self._stage, self._stage_fixed, num_decodes=num_decodes,
                          logits_indices=logits_indices, input_ids=input_ids, pad_to=pad_to, group_parts=parts)

    def _stage(self) -> Staging:
        if self._staging is None:
            self._staging = Staging(self.device)
        return self._staging

    def _stage_fixed(self, rows: int, width: int) -> tuple[Staging, FixedLayout]:
        """The fixed step buffer for buckets of up to ``rows`` sequences; a bigger
        bucket or another width moves it (:attr:`address_signature` changes)."""
        fixed = self._fixed
        if fixed is None or rows > fixed[1].rows or width != fixed[1].width:
            keep = fixed[1].rows if fixed is not None and width == fixed[1].width else 0
            layout = FixedLayout(max(rows, keep), width)
            fixed = self._fixed = (Staging(self.device, layout.size), layout)
        return fixed

    def block_tables(self, seq_ids: Sequence[SeqId], width: int | None = None) -> Tensor:
        """Padded ``[len(seq_ids), width]`` int32 block tables on the device (-1 = padding)."""
        return self.storage.upload(self.manager.block_table_array(seq_ids, width).astype(np.int32, copy=False))

    def context_lens(self, seq_ids: Sequence[SeqId]) -> Tensor:
        """``[len(seq_ids)]`` int32 token counts on the device."""
        return self.storage.upload(self.manager.context_lens(seq_ids))

    def slot_mapping(self, slots_or_seq_ids: np.ndarray | Sequence[SeqId],
                     num_last_tokens: int | Sequence[int] | None = None) -> Tensor:
        """Slots as a device tensor (int32 while every slot id fits, else int64): either
        given slot ids (a numpy array), or the last ``num_last_tokens`` tokens of each
        listed sequence."""
        if num_last_tokens is None and isinstance(slots_or_seq_ids, np.ndarray):
            slots = slots_or_seq_ids
        else:
            slots = self.manager.slot_mapping(slots_or_seq_ids, 1 if num_last_tokens is None else num_last_tokens)
        return self.storage.upload(slots.astype(self._slot_dtype, copy=False))

    # ----------------------------------------------------------- tensors
    def layer_view(self, layer: int) -> kernels.CacheView:
        """Layer ``layer``'s keys and values as the kernels take them (checked once)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.config.num_layers:
            raise KVForgeError(f"layer {layer!r} out of range (the cache has {self.config.num_layers} layers)")
        return self.storage.layer_view(layer)

    def layer_kv(self, layer: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Layer ``layer``'s key and value chunk views ``[chunk_blocks, block_size, kv_heads, head_dim]``."""
        view = self.layer_view(layer)
        return view.k_chunks, view.v_chunks

    def write(self, layer: int, slot_mapping: Tensor | np.ndarray | Sequence[int], k: Tensor, v: Tensor) -> None:
        """Store keys and values ``[num_tokens, num_kv_heads, head_dim]`` at their slots (-1 skipped).

        They come in ``config.resolved_model_dtype``; an fp8 cache stores
        ``saturate(x / scale)`` rounded to nearest even (beyond the format's range,
        inf included, saturates to its largest value: never inf or NaN)."""
        view = self.layer_view(layer)
        if not isinstance(slot_mapping, Tensor):
            slot_mapping = self.storage.upload(slot_array(slot_mapping, "slot_mapping"))
        kernels.store_kv(k, v, view, None, slot_mapping, backend=self.backend)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy blocks ``src -> dst`` (all layers, keys and values) in one launch."""
        self.storage.copy_blocks(pairs, self.capacity_blocks)

    def gather(self, seq_id: SeqId, layer: int) -> tuple[Tensor, Tensor]:
        """A sequence's keys and values of one layer, ``[num_tokens, num_kv_heads, head_dim]`` each,
        in the model dtype (an fp8 cache's dequantized). A sliding-window layer's released
        blocks are gone: for such a layer, only while the sequence has released none."""
        self.layer_view(layer)
        group = self.config.layer_group(layer)[0]
        if group and self.groups is not None:
            row = self.manager._seqs.row(seq_id)
            tables = self.groups.tables[group - 1]
            if tables.num_released(row):
                raise KVForgeError(f"gather(): layer {layer} has a sliding window of {tables.window} tokens and "
                                   f"released the first {tables.num_released(row) * self.config.block_size} "
                                   f"tokens of sequence {seq_id!r}")
            return self.storage.gather(layer, tables.kept(row), self.seq_len(seq_id))
        return self.storage.gather(layer, self.block_table(seq_id), self.seq_len(seq_id))

    # ----------------------------------------------------------- fp8 scales
    def kv_scales(self, layer: int) -> KVScales:
        """Layer ``layer``'s dequantization scales (float32 ``[num_kv_heads]`` copies on the CPU)."""
        self.layer_view(layer)
        s = self.storage
        if s.k_scale is None or s.v_scale is None:
            raise ConfigError(f"kv_scales(): a {self.config.dtype} cache has no scales (only fp8 caches do)")
        return KVScales(s.k_scale[layer].cpu(), s.v_scale[layer].cpu())

    def set_kv_scales(self, layer: int, k_scale: float | Tensor, v_scale: float | Tensor) -> None:
        """Set layer ``layer``'s fp8 scales: stored keys are ``k / k_scale``, read as ``stored * k_scale``
        (the convention of checkpoints' ``k_scale`` / ``v_scale``, e.g. ``...self_attn.k_scale``).

        Each scale is a positive finite number or a float tensor: ``[]`` or ``[1]``
        (per tensor), or ``[num_kv_heads]`` when ``kv_scale_granularity="head"``.
        Call it before any keys are stored (the loader, right after the cache is
        built): while the cache holds keys and values (sequences, cached prefix
        blocks, host-tier blocks) new scales would misread them, so it raises
        :class:`ConfigError` then. Anything refused changes nothing."""
        self.layer_view(layer)
        c = self.config
        if not c.is_fp8:
            raise ConfigError(f"set_kv_scales(): a {c.dtype} cache stores keys and values unscaled "
                              f"(scales apply to dtype='fp8_e4m3' / 'fp8_e5m2')")
        ks = self._check_scale(k_scale, "k_scale")
        vs = self._check_scale(v_scale, "v_scale")
        held = self.pool.num_allocated_blocks + self.pool.num_evictable_blocks
        host_held = self.manager.host.stats().used_blocks if self.host_storage is not None else 0
        if held or host_held:
            raise ConfigError(
                f"set_kv_scales(layer={layer}): the cache holds keys and values ({held} device block(s), "
                f"{host_held} host block(s)) stored with the current scales; set scales before any write")
        why = self._remote_allows_new_scales()
        if why is not None:
            raise ConfigError(f"set_kv_scales(layer={layer}): {why}")
        self.storage.set_scales(layer, ks, vs)
        self._remote_scales_changed = self.remote is not None

    def calibrate_kv_scales(self, layer: int, k: Tensor, v: Tensor) -> KVScales:
        """Set layer ``layer``'s scales from sample keys and values ``[num_tokens, num_kv_heads,
        head_dim]`` (e.g. a calibration prompt's): ``scale = amax / fp8_max`` over the tensor, or
        per KV head with ``kv_scale_granularity="head"``; an amax of 0 (or not finite) keeps 1.0.
        Later values beyond the sample's range saturate. Same conditions as :meth:`set_kv_scales`;
        returns the scales set."""
        c = self.config
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != (c.num_kv_heads, c.head_dim):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ConfigError(f"calibrate_kv_scales(): {name} must be a tensor [num_tokens, {c.num_kv_heads}, "
                                  f"{c.head_dim}], got {got}")
            if not t.dtype.is_floating_point:
                raise ConfigError(f"calibrate_kv_scales(): {name} must be a float tensor, got {t.dtype}")
        per_head = c.kv_scale_granularity == "head"

        def amax(t: Tensor) -> Tensor:
            a = t.detach().float().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
            return a.amax(dim=(0, 2)) if per_head else a.amax().reshape(1)

        ks, vs = scale_for_amax(amax(k).cpu(), c.dtype), scale_for_amax(amax(v).cpu(), c.dtype)
        self.set_kv_scales(layer, ks if per_head else ks[0], vs if per_head else vs[0])
        return self.kv_scales(layer)

    def _check_scale(self, value: object, name: str) -> Tensor:
        c = self.config
        if isinstance(value, Tensor) and value.numel() > 1 and c.kv_scale_granularity != "head":
            raise ConfigError(f"set_kv_scales(): {name} has {value.numel()} values, but kv_scale_granularity="
                              f"'tensor' takes one per layer (set kv_scale_granularity='head' for one per KV head)")
        if isinstance(value, Tensor):
            value = value.detach().cpu()  # checked on the host (a load-time call, not the hot path)
        try:
            return as_scale(value, name, c.num_kv_heads, torch.device("cpu")).to(self.device)
        except KernelError as exc:
            raise ConfigError(f"set_kv_scales(): {exc}") from None

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
        """Bytes holding live keys/values (distinct token slots in use, in every layer group)."""
        slots = self.manager.live_token_slots() + (self.groups.live_slots() if self.groups is not None else 0)
        return slots * (self.config.bytes_per_block // self.config.block_size)

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
        return compaction.releasable_chunks(self)

    def maybe_compact(self) -> int:
        """With ``auto_compact``, compact when :meth:`should_compact` holds; bytes returned.

        Call it at a safe point: between engine steps."""
        if self.config.auto_compact and self.should_compact():
            return self.compact_cache()
        return 0

    def add_relocation_listener(self, fn: Callable[[dict[int, int]], None]) -> None:
        """Call ``fn({old_id: new_id})`` after every compaction that moved blocks."""
        self._relocation_listeners.append(fn)

    def notify_relocation(self, mapping: dict[int, int]) -> None:
        """Tell the relocation listeners that blocks moved (``{old_id: new_id}``)."""
        for fn in self._relocation_listeners:
            fn(mapping)

    def compact_cache(self, release: bool = True, keep_cached: bool = True) -> int:
        """Pack live blocks into the lowest ids and hand emptied chunks back; return the bytes released.

        Live blocks go to ids ``0..k-1``; cached blocks nobody references follow
        them (all of them with ``keep_cached``, else only those that fit in the
        chunks the live blocks need; the rest are evicted). See
        :func:`kvforge.storage.compaction.compact` for the copy order and what a
        failed copy leaves."""
        for name, flag in (("release", release), ("keep_cached", keep_cached)):
            if not isinstance(flag, bool):
                raise KVForgeError(f"compact_cache(): {name} must be True or False, got {flag!r}")
        return compaction.compact(self, release=release, keep_cached=keep_cached)

    def release_unused_chunks(self) -> int:
        """Drop the chunks above the highest block in use (keeping ``min_chunks``);
        return the bytes handed back to the device."""
        return compaction.release_unused_chunks(self)

    def drop_cached_blocks(self, block_ids: Sequence[int]) -> int:
        """Forget the prefix-cache entries of those of ``block_ids`` that nobody
        references (their keys/values are not to be trusted, e.g. a failed step
        never wrote them); they go back to the free list. Return how many. With
        layer groups pass every group's blocks (:meth:`blocks_of_tokens`); the other
        groups' copies of group-0 blocks that have a key are found by it too."""
        evictable = set(self.pool.evictable_blocks())
        block_ids = list(block_ids)
        if self.groups is not None:  # the other layer groups' copies of these blocks were never written either
            keys = [k for k in map(self.prefix.key_of, block_ids) if k is not None]
            block_ids += self.groups.cached_copies(keys)
        drop = [b for b in dict.fromkeys(block_ids) if b in evictable]
        with self.manager.host.dropping():  # nothing of theirs spills to the host tier
            self.pool.evict_blocks(drop)
        return len(drop)

    def reclaim_unused_blocks(self) -> int:
        """Evict every cached block nobody references back to the free list (without
        spilling them to the host tier); return how many."""
        with self.manager.host.dropping():
            return self.pool.reclaim_unused_blocks()

    def sort_free_lists(self) -> None:
        """Order the free list so the next allocations take the lowest ids."""
        self.pool.sort_free_list()

    def check_invariants(self) -> None:
        """Assert bookkeeping and storage agree."""
        self.manager.check_invariants()
        if self.groups is not None:
            self.groups.check_invariants()
        if self.host_storage is not None:  # every host block holding data has memory behind it
            hs = self.host_storage
            assert min(hs.num_chunks * hs.chunk_blocks, hs.num_blocks) >= self.manager.host.pool.high_water_mark()
        assert self.pool.capacity == min(self.storage.num_chunks * self.chunk_blocks, self.config.num_blocks)

    def __repr__(self) -> str:
        return (f"KVCache(blocks={self.capacity_blocks}/{self.config.num_blocks}, block_size={self.config.block_size}, "
                f"sequences={len(self.manager)}, device={self.device})")


#: ROCmForge's name.
KvCache = KVCache
