"""Cache configuration, presets and sizing math.

A :class:`CacheConfig` says how big the paged KV cache is and how it is laid
out; it is frozen, and every derived size is a property or method. Values
measured at run time (free device memory, blocks in use) live in the cache
and its :class:`~kvforge.storage.profile.MemoryProfile`, never here.

Sizes follow the real tensors: a block holds ``block_size`` tokens of keys and
values for every layer, so ``bytes_per_block = 2 * num_layers * block_size *
num_kv_heads * head_dim * dtype_bytes``; an fp8 cache (``dtype="fp8_e4m3"`` or
``"fp8_e5m2"``) stores one byte an element, so every size is half of bf16's.
Its per-layer scales (``2 * num_layers * num_kv_heads`` floats) are outside
those figures: a few KiB.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from kvforge.errors import ConfigError
from kvforge.presets import KV_SHARE_OF_VRAM, CachePreset, page_size_for_context
from kvforge.units import (
    _FIELD_LIMITS, MAX_BLOCK_SIZE, MAX_BYTES, MAX_HEAD_DIM, MAX_NUM_BLOCKS, MAX_NUM_KV_HEADS, MAX_NUM_LAYERS,
    FP8_DTYPES, MODEL_DTYPES, format_bytes, is_fp8, parse_bytes, resolve_dtype, resolve_kv_dtype,
)
from kvforge.units import positive_int as _positive_int

__all__ = [
    "CacheConfig",
    "CachePreset",
    "format_bytes",
    "parse_bytes",
    "resolve_dtype",
    "resolve_kv_dtype",
    "is_fp8",
    "FP8_DTYPES",
    "MODEL_DTYPES",
    "KV_SCALE_GRANULARITIES",
    "KV_SHARE_OF_VRAM",
    "MAX_BYTES",
    "MAX_BLOCK_SIZE",
    "MAX_NUM_BLOCKS",
    "MAX_NUM_LAYERS",
    "MAX_NUM_KV_HEADS",
    "MAX_HEAD_DIM",
    "KVGroup",
    "MAX_KV_GROUPS",
    "plan_kv_groups",
]

#: How finely an fp8 cache's scales vary: one scale for a layer's keys and one for its
#: values ("tensor"), or one per KV head for each ("head").
KV_SCALE_GRANULARITIES = ("tensor", "head")

#: the most layer groups a cache splits into; beyond it every layer keeps every block
MAX_KV_GROUPS = 16


class KVGroup(NamedTuple):
    """Layers that share one block table: their sliding ``window`` (None: full attention) and
    their ``layers``, in order; a group's block holds these layers only."""

    window: int | None
    layers: tuple[int, ...]


def plan_kv_groups(layer_windows: Sequence[int | None] | None, num_layers: int) -> tuple[KVGroup, ...]:
    """Split the layers into groups of equal size by their window (:mod:`kvforge.core.groups`).

    Full-attention layers come first (group 0 keeps every block), then each window in
    the order it first appears; the group size is the smallest class's layer count, and
    a class that is not a multiple of it ends in a smaller group (its block slots for the
    missing layers stay unused). One group of all layers when every layer attends alike,
    when no layer attends to everything (group 0 could not hold a window), or when the
    split would make more than :data:`MAX_KV_GROUPS` groups."""
    everything = (KVGroup(None, tuple(range(num_layers))),)
    if layer_windows is None:
        return everything
    classes: dict[int | None, list[int]] = {None: []}
    for layer, w in enumerate(layer_windows):
        classes.setdefault(w, []).append(layer)
    if not classes[None] or len(classes) == 1:
        return everything
    size = min(len(v) for v in classes.values())
    groups = [KVGroup(w, tuple(layers[i:i + size])) for w, layers in classes.items()
              for i in range(0, len(layers), size)]
    return tuple(groups) if len(groups) <= MAX_KV_GROUPS else everything


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Shape and policy of a paged KV cache.

    Invariants (checked on construction, each violation a :class:`ConfigError`
    naming the field): every count is a positive integer (a Python or numpy
    integer; bools, floats and strings are refused), ``dtype`` is a supported
    storage dtype, ``compaction_threshold`` lies in [0, 1], ``initial_blocks``
    (when set) lies in [1, num_blocks].

    Limits (far above any real model, so that a typo fails here rather than as
    a ``MemoryError`` or an int32 overflow later): ``block_size`` <= 2**20
    (:data:`MAX_BLOCK_SIZE`), ``num_blocks``, ``initial_blocks`` and
    ``chunk_blocks`` <= 2**31 - 1 (:data:`MAX_NUM_BLOCKS`: block ids are int32
    in the block tables), ``num_layers``, ``num_kv_heads`` and ``head_dim``
    <= 2**16 each, and the whole pool, :meth:`estimated_memory_bytes`, at most
    2**60 bytes (:data:`MAX_BYTES`, 1 EiB).

    ``num_blocks`` is the most blocks the pool may hold. With
    ``initial_blocks`` set, the device storage starts with that many blocks
    (rounded up to whole chunks of ``chunk_blocks``) and grows on demand up
    to ``num_blocks`` (an elastic pool); compaction hands emptied chunks back.

    ``host_memory`` (bytes, or a size such as ``"64GiB"``; 0 = off) adds a host
    tier: pinned CPU memory in blocks of the same size, allocated in chunks of
    ``host_chunk_blocks`` as it is first used. Evicted prefix blocks spill
    there and come back on a hit; ``KVCache.swap_out`` moves sequences there.

    ``dtype`` is the storage dtype: float16, bfloat16, float32, or fp8
    (``"fp8_e4m3"`` / ``"fp8"``, ``"fp8_e5m2"``, or ``torch.float8_e4m3fn`` /
    ``torch.float8_e5m2``). An fp8 cache quantizes keys and values on
    :meth:`~kvforge.storage.KVCache.write` and dequantizes them in the kernels
    and in ``gather()``; ``model_dtype`` is the dtype it takes them in and hands
    them back in (default bfloat16; for the other dtypes it is the storage dtype
    itself, and may only be None or equal to it). ``kv_scale_granularity``:
    ``"tensor"`` (default: one scale for the keys and one for the values of each
    layer) or ``"head"`` (one per KV head), fp8 only. Scales start at 1.0 and
    come from a checkpoint's ``k_scale``/``v_scale`` through
    :meth:`~kvforge.storage.KVCache.set_kv_scales` (see ``docs/fp8.md``).
    ROCm's e4m3fnuz is refused (use ``"fp8_e4m3"``).
    """

    block_size: int
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    device: str = "auto"
    enable_compaction: bool = False
    compaction_threshold: float = 0.3
    enable_prefix_caching: bool = True
    initial_blocks: int | None = None
    chunk_blocks: int | None = None
    auto_compact: bool = False
    host_memory: int | str = 0
    host_chunk_blocks: int | None = None
    model_dtype: Any = None
    kv_scale_granularity: str = "tensor"
    layer_windows: tuple[int | None, ...] | None = None
    name: str = field(default="", compare=False)
    _groups: tuple[KVGroup, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f, (limit, why) in _FIELD_LIMITS.items():
            object.__setattr__(self, f, _positive_int(f, getattr(self, f), limit, why))
        object.__setattr__(self, "dtype", resolve_kv_dtype(self.dtype))
        self._check_fp8_fields()
        self._check_layer_windows()
        if not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device must be a device name such as 'cpu', 'cuda', 'cuda:1' or 'auto', "
                                  f"got {self.device!r}") from None
        for f in ("enable_compaction", "enable_prefix_caching", "auto_compact"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{f} must be True or False, got {getattr(self, f)!r}")
        t = self.compaction_threshold
        # compared before any float(): nan fails both comparisons, a huge int would overflow float()
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (0 <= t <= 1):
            raise ConfigError(f"compaction_threshold must be a number in [0, 1], got {t!r:.60}")
        object.__setattr__(self, "compaction_threshold", float(t))
        if self.initial_blocks is not None:
            _positive_int("initial_blocks", self.initial_blocks, MAX_NUM_BLOCKS, "2**31 - 1: block ids are int32")
            if self.initial_blocks > self.num_blocks:
                raise ConfigError(f"initial_blocks={self.initial_blocks} exceeds num_blocks={self.num_blocks}")
        if self.chunk_blocks is not None:
            _positive_int("chunk_blocks", self.chunk_blocks, MAX_NUM_BLOCKS, "2**31 - 1: block ids are int32")
        self._check_host_memory()
        total = self.estimated_memory_bytes()
        if total > MAX_BYTES:
            raise ConfigError(
                f"num_blocks={self.num_blocks} blocks of {format_bytes(self.bytes_per_block)} ({self.num_layers} layers, "
                f"{self.num_kv_heads} KV heads, head dim {self.head_dim}, block size {self.block_size}) make "
                f"{format_bytes(total)}, beyond the limit of 1 EiB (2**60 bytes) for the whole pool")

    def _check_fp8_fields(self) -> None:
        if self.model_dtype is not None:
            object.__setattr__(self, "model_dtype", resolve_dtype(self.model_dtype, "model_dtype"))
            if not self.is_fp8 and self.model_dtype != self.dtype:
                raise ConfigError(
                    f"model_dtype={self.model_dtype} differs from dtype={self.dtype}: a {self.dtype} cache stores "
                    f"the model dtype itself (model_dtype applies to fp8 caches; leave it None)")
        g = self.kv_scale_granularity
        if not isinstance(g, str) or g not in KV_SCALE_GRANULARITIES:
            raise ConfigError(f"kv_scale_granularity must be one of {KV_SCALE_GRANULARITIES}, got {g!r:.60}")
        if g != "tensor" and not self.is_fp8:
            raise ConfigError(f"kv_scale_granularity={g!r} applies to fp8 caches only (dtype={self.dtype} has no "
                              f"scales)")

    def _check_layer_windows(self) -> None:
        windows = self.layer_windows
        if windows is not None:
            if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) \
                    or len(windows) != self.num_layers:
                raise ConfigError(f"layer_windows must list one window (a token count, or None for full "
                                  f"attention) per layer, {self.num_layers} of them, got {windows!r:.80}")
            out = []
            for i, w in enumerate(windows):
                if w is not None:
                    if isinstance(w, bool) or not isinstance(w, numbers.Integral) or not 1 <= w <= MAX_NUM_BLOCKS:
                        raise ConfigError(f"layer_windows[{i}] must be None or a window of 1..2**31-1 tokens, "
                                          f"got {w!r:.40}")
                    w = int(w)
                out.append(w)
            windows = tuple(out) if any(w is not None for w in out) else None
            object.__setattr__(self, "layer_windows", windows)
        groups = plan_kv_groups(windows, self.num_layers)
        if windows is not None and len(groups) > 1 and self.host_memory:
            raise ConfigError("host_memory with layer_windows: the host tier does not hold caches whose "
                              "sliding-window layers free their blocks yet (leave layer_windows None to keep "
                              "every block, or host_memory 0)")
        object.__setattr__(self, "_groups", groups)

    @property
    def kv_groups(self) -> tuple[KVGroup, ...]:
        """The layer groups, each with its own block table (:func:`plan_kv_groups`): one group
        of every layer unless ``layer_windows`` mixes full-attention and windowed layers."""
        return self._groups

    @property
    def page_layers(self) -> int:
        """Layers one block holds: the size of a layer group (every layer without groups)."""
        return len(self._groups[0].layers)

    def layer_group(self, layer: int) -> tuple[int, int]:
        """``(group, slot)`` of a layer: its group's index and its place in the group's blocks."""
        for g, group in enumerate(self._groups):
            if layer in group.layers:
                return g, group.layers.index(layer)
        raise ConfigError(f"layer {layer!r} is not a layer of this cache (0..{self.num_layers - 1})")

    def _check_host_memory(self) -> None:
        value = self.host_memory
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
            raise ConfigError(f"host_memory must be a byte count or a size such as '64GiB', got {value!r:.60}")
        num_bytes = parse_bytes(value)
        if num_bytes < 0:
            raise ConfigError(f"host_memory must be >= 0 bytes (0 = no host tier), got {value!r}")
        if num_bytes > MAX_BYTES:
            raise ConfigError(f"host_memory={value!r} exceeds the limit of 1 EiB (2**60 bytes)")
        object.__setattr__(self, "host_memory", num_bytes)
        if self.host_chunk_blocks is not None:
            _positive_int("host_chunk_blocks", self.host_chunk_blocks, MAX_NUM_BLOCKS, "2**31 - 1: block ids are int32")
        if num_bytes and num_bytes // self.bytes_per_block > MAX_NUM_BLOCKS:
            raise ConfigError(f"host_memory={format_bytes(num_bytes)} makes more than 2**31 - 1 host blocks of "
                              f"{format_bytes(self.bytes_per_block)}")

    # ----------------------------------------------------------- constructors
    @classmethod
    def new(cls, page_size: int, max_pages: int, num_heads: int, head_dim: int, num_layers: int,
            **kwargs: Any) -> CacheConfig:
        """ROCmForge's positional order: page size, page count, KV heads, head dim, layers."""
        return cls(block_size=page_size, num_blocks=max_pages, num_layers=num_layers,
                   num_kv_heads=num_heads, head_dim=head_dim, **kwargs)

    @classmethod
    def from_preset(cls, preset: CachePreset, num_kv_heads: int, head_dim: int, num_layers: int,
                    dtype: Any = torch.float16, **kwargs: Any) -> CacheConfig:
        """Size a cache from a preset.

        Built-in presets give the KV cache half of their VRAM target and fit
        as many whole blocks as those bytes hold; ``CachePreset.custom`` keeps
        its ``max_pages``. Presets enable compaction.
        """
        if not isinstance(preset, CachePreset):
            raise ConfigError(f"preset must be a CachePreset, got {preset!r}")
        block = cls(block_size=preset.page_size, num_blocks=1, num_layers=num_layers,
                    num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
        if preset.max_pages is not None:
            num_blocks = preset.max_pages
        else:
            assert preset.kv_budget_bytes is not None
            num_blocks = preset.kv_budget_bytes // block.bytes_per_block
            if num_blocks < 1:
                raise ConfigError(
                    f"preset {preset.name!r} gives the KV cache {format_bytes(preset.kv_budget_bytes)}, "
                    f"less than one block ({format_bytes(block.bytes_per_block)})")
        kwargs.setdefault("enable_compaction", True)
        return replace(block, num_blocks=num_blocks, name=preset.name, **kwargs)

    @classmethod
    def for_context_length(cls, target_context_len: int, num_kv_heads: int, head_dim: int,
                           num_layers: int, vram_budget: int | str | None = None, *,
                           num_sequences: int = 1, dtype: Any = torch.float16,
                           **kwargs: Any) -> CacheConfig:
        """Size a cache for ``num_sequences`` sequences of ``target_context_len`` tokens.

        The page size follows the context (16 below 1024 tokens, 32 below
        4096, 64 above). With a ``vram_budget`` (bytes or ``'12GiB'``) the
        block count is capped by it; when not even one sequence of that
        length fits, :class:`ConfigError` names the longest context that does.
        """
        target = _positive_int("target_context_len", target_context_len)
        num_sequences = _positive_int("num_sequences", num_sequences)
        page = kwargs.pop("block_size", None) or page_size_for_context(target)
        needed = math.ceil(target / page) * num_sequences
        cfg = cls(block_size=page, num_blocks=needed, num_layers=num_layers,
                  num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, **kwargs)
        if vram_budget is None:
            return cfg
        budget = parse_bytes(vram_budget)
        if budget <= 0:
            raise ConfigError(f"vram_budget must be positive, got {vram_budget!r}")
        fit = budget // cfg.bytes_per_block
        per_seq = math.ceil(target / page)
        if fit < per_seq:
            raise ConfigError(
                f"a {target}-token context needs {per_seq} blocks of {page} tokens "
                f"({format_bytes(per_seq * cfg.bytes_per_block)}), but vram_budget={format_bytes(budget)} "
                f"holds {fit} blocks: the longest context that fits is {fit * page} tokens")
        return replace(cfg, num_blocks=min(needed, fit))

    @classmethod
    def for_model(cls, path_or_config: str | os.PathLike[str] | Mapping[str, Any],
                  vram_budget: int | str | None = None, *, block_size: int = 16,
                  context_length: int | None = None, dtype: Any = None, **kwargs: Any) -> CacheConfig:
        """Size a cache for a Hugging Face model from its ``config.json``.

        ``path_or_config`` is a built-in model name
        (:data:`~kvforge.model_shapes.MODEL_SHAPES`, e.g. ``"llama-3-8b"``), a
        checkpoint folder, a ``config.json`` path or the parsed dict. With
        ``vram_budget`` the cache fills it; otherwise it holds one sequence of
        ``context_length`` (default: the model's ``max_position_embeddings``).
        ``dtype`` defaults to the checkpoint's; an fp8 ``dtype`` (``"fp8_e4m3"``)
        takes the checkpoint's dtype as its ``model_dtype`` unless one is given.
        """
        from kvforge.model_shapes import model_shape  # model_shapes imports this module

        shape = model_shape(path_or_config)
        dtype = resolve_kv_dtype(dtype) if dtype is not None else shape["dtype"]
        if is_fp8(dtype) and kwargs.get("model_dtype") is None:
            kwargs["model_dtype"] = shape["dtype"]
        if vram_budget is None:
            ctx = context_length or shape["max_position_embeddings"]
            return cls.for_context_length(ctx, shape["num_kv_heads"], shape["head_dim"], shape["num_layers"],
                                          dtype=dtype, block_size=block_size, **kwargs)
        budget = parse_bytes(vram_budget)
        one = cls(block_size=block_size, num_blocks=1, num_layers=shape["num_layers"],
                  num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], dtype=dtype, **kwargs)
        num_blocks = budget // one.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(f"vram_budget={format_bytes(budget)} holds no block of "
                              f"{format_bytes(one.bytes_per_block)} for this model")
        return replace(one, num_blocks=num_blocks)

    @classmethod
    def for_memory(cls, memory: int | str, num_layers: int, num_kv_heads: int, head_dim: int, *,
                   block_size: int = 16, dtype: Any = torch.float16, **kwargs: Any) -> CacheConfig:
        """As many whole blocks as ``memory`` (bytes or ``'8GiB'``) holds for this shape.

        Raises :class:`ConfigError` when the budget is not positive or holds no block."""
        budget = parse_bytes(memory)
        one = cls(block_size=block_size, num_blocks=1, num_layers=num_layers, num_kv_heads=num_kv_heads,
                  head_dim=head_dim, dtype=dtype, **kwargs)
        if budget <= 0:
            raise ConfigError(f"the KV memory budget must be positive, got {memory!r}")
        num_blocks = budget // one.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(f"a KV memory budget of {format_bytes(budget)} holds no block of "
                              f"{format_bytes(one.bytes_per_block)} ({num_layers} layers, {num_kv_heads} KV heads, "
                              f"head dim {head_dim}, block size {block_size})")
        return replace(one, num_blocks=int(num_blocks))

    # -------------------------------------------------------------- builders
    def with_compaction(self, enabled: bool) -> CacheConfig:
        """A copy with compaction switched on or off."""
        if not isinstance(enabled, bool):
            raise ConfigError(f"enable_compaction must be True or False, got {enabled!r}")
        return replace(self, enable_compaction=enabled)

    def with_compaction_threshold(self, threshold: float) -> CacheConfig:
        """A copy with another fragmentation threshold in [0, 1]."""
        return replace(self, compaction_threshold=threshold)

    def with_prefix_caching(self, enabled: bool) -> CacheConfig:
        """A copy with prefix caching switched on or off."""
        if not isinstance(enabled, bool):
            raise ConfigError(f"enable_prefix_caching must be True or False, got {enabled!r}")
        return replace(self, enable_prefix_caching=enabled)

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return replace(self, **changes)

    # ----------------------------------------------------------------- sizes
    @property
    def is_fp8(self) -> bool:
        """Whether keys and values are stored in fp8 (quantized with per-layer scales)."""
        return is_fp8(self.dtype)

    @property
    def resolved_model_dtype(self) -> torch.dtype:
        """The dtype keys, values and queries come in and ``gather()`` returns:
        ``model_dtype`` when set, bfloat16 for an fp8 cache without it, else ``dtype``."""
        if self.model_dtype is not None:
            return self.model_dtype  # type: ignore[no-any-return]
        return torch.bfloat16 if self.is_fp8 else self.dtype

    @property
    def dtype_bytes(self) -> int:
        """Bytes per stored element (1 for fp8)."""
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block: ``2 * page_layers * block_size * kv_heads * head_dim * dtype_bytes``
        (``page_layers`` is every layer unless the layers are split into groups)."""
        return 2 * self.page_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes * self.block_size

    @property
    def resolved_chunk_blocks(self) -> int:
        """Blocks per storage chunk.

        ``chunk_blocks`` when set; otherwise the divisor of ``num_blocks``
        nearest to 1/16 of the pool (at most 4x that, and at most 256 chunks),
        so that the chunks add up to exactly ``num_blocks``; a pool with no
        such divisor (a large prime, say) is one chunk. The pool is allocated and released
        in chunks, so compaction hands memory back one chunk at a time."""
        if self.chunk_blocks is not None:
            return min(self.chunk_blocks, self.num_blocks)
        return _chunk_divisor(self.num_blocks)

    @property
    def num_host_blocks(self) -> int:
        """Blocks the host tier holds (``host_memory // bytes_per_block``; 0: no host tier)."""
        return self.host_memory // self.bytes_per_block  # type: ignore[operator]

    @property
    def resolved_host_chunk_blocks(self) -> int:
        """Blocks per pinned host chunk: ``host_chunk_blocks`` when set, else the blocks of
        256 MiB (at least one, at most the tier). The host tier allocates chunk by chunk, as
        its blocks are first used: a large budget costs nothing until it is needed."""
        n = self.num_host_blocks
        if not n:
            return 0
        if self.host_chunk_blocks is not None:
            return min(self.host_chunk_blocks, n)
        return max(1, min(n, (256 * 2**20) // self.bytes_per_block))

    def estimated_memory_bytes(self) -> int:
        """Bytes the full pool takes on the device (all layers, keys and values)."""
        return self.num_blocks * self.bytes_per_block

    def estimated_memory_human(self) -> str:
        """:meth:`estimated_memory_bytes` formatted, e.g. ``'3.00 GiB'``."""
        return format_bytes(self.estimated_memory_bytes())

    def max_context_length(self, chunk_tokens: int | None = None) -> int:
        """Longest single sequence the full pool can hold, in tokens. With layer groups every
        full-attention group holds all of it and each window group its window and two prefill
        chunks of ``chunk_tokens`` (default: one block, decoding)."""
        groups = self._groups
        if len(groups) == 1:
            return self.num_blocks * self.block_size
        bs = self.block_size
        chunk = bs if chunk_tokens is None else int(chunk_tokens)
        full = sum(1 for g in groups if g.window is None)
        bounds = [-(-(g.window - 1 + 2 * chunk) // bs) + 1 for g in groups if g.window is not None]

        def blocks(x: int) -> int:  # a sequence of x blocks across every group
            return full * x + sum(min(x, b) for b in bounds)

        lo, hi = 0, self.num_blocks  # the most blocks x with blocks(x) <= num_blocks
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if blocks(mid) <= self.num_blocks else (lo, mid - 1)
        return lo * bs


def _chunk_divisor(num_blocks: int, parts: int = 16, max_chunks: int = 256) -> int:
    """The divisor of ``num_blocks`` nearest to ``num_blocks / parts`` that makes at
    most ``max_chunks`` chunks of at most 4x the target; else ``num_blocks``."""
    target = num_blocks / parts
    if target <= 1:
        return 1
    best = num_blocks
    low, high = num_blocks / max_chunks, target * 4
    for d in range(1, math.isqrt(num_blocks) + 1):
        if num_blocks % d:
            continue
        for c in (d, num_blocks // d):
            if low <= c <= high and abs(math.log(c / target)) < abs(math.log(best / target)):
                best = c
    return best


def __getattr__(name: str) -> Any:
    # model_shape moved to kvforge.model_shapes (which imports this module); kept importable from here
    if name == "model_shape":
        from kvforge.model_shapes import model_shape
        return model_shape
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
