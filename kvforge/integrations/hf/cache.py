"""``KVForgeCache``: a transformers ``Cache`` whose keys and values live in a kvforge :class:`~kvforge.storage.KVCache`.

Each row of the batch is one kvforge sequence; every layer's keys and values
go into the paged pool at the sequence's slots. Two modes, fixed when the
first tokens arrive, by the model's attention implementation:

- **paged** (``attn_implementation="kvforge"``, :mod:`.attention`): ``update``
  stores nothing and hands the new keys/values on; the kvforge attention
  function then stores the real (unpadded) tokens and runs the paged
  kernels on the pool. Left padding is never stored.
- **dense** (any other implementation: ``sdpa``, ``eager``): ``update`` stores
  every cell of the ``[batch, seq]`` grid (padding too, masked later by the
  model's own mask) and returns the layer's whole history gathered from the
  pool, ``[batch, kv_heads, seq_len, head_dim]``, as a ``DynamicCache`` would.

A step is the set of layer updates of one forward: the first layer to see
new columns reserves the slots of every row (one ``append_tokens_batch``),
and the other layers reuse them. Beam search and batch reordering fork
sequences (shared blocks, copy-on-write), so no keys are copied; ``crop``
(assisted and prompt-lookup decoding) truncates every row's sequence.

Sliding-window layers (the model config's ``layer_types`` and
``sliding_window``): in paged mode, with ``sliding_window_blocks="free"``
(the default) and a model that mixes full-attention and window layers, the
pool is built with ``CacheConfig.layer_windows``, so the window layers get
block tables of their own (layer groups, :mod:`kvforge.core.groups`) and
release every block before their window as the rows grow; each layer reads
its group's slots and tables (:meth:`PagedInputs.for_group`). Dense mode
returns every layer's whole history, so it keeps every block, as does
``"keep"``. A crop goes back to any length at or after the first token of
the last step (what assisted and prompt-lookup decoding crop: the rejected
drafts of the step that verified them); further back, a window layer may
already have released what that length reads, and the crop is refused.
"""
from __future__ import annotations

import contextvars
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvforge.config import CacheConfig, is_fp8, plan_kv_groups, resolve_kv_dtype
from kvforge.errors import ConfigError, KVForgeError, OutOfBlocksError, SequenceError
from kvforge.integrations.hf.paged import (
    PagedInputs, counts_of, cu_lens, from_tokens, paged_attention, to_tokens,
)
from kvforge.kernels import fp8, reference
from kvforge.storage import KVCache

__all__ = ["KVForgeCache", "KVForgeLayer", "layer_windows_of", "take_pending"]

#: layer types a KVForgeCache can hold (attention layers with ordinary keys and values)
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

#: what ``KVForgeCache(sliding_window_blocks=...)`` takes (``EngineConfig.sliding_window_blocks``' values)
SLIDING_WINDOW_BLOCKS = ("free", "keep")


class _Pending(NamedTuple):
    """A paged-mode update waiting for its attention call (the same key and value objects)."""

    cache: KVForgeCache
    layer_idx: int
    key: Tensor
    value: Tensor


#: the last paged-mode update not yet consumed by the kvforge attention function (per thread / task)
_PENDING: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("kvforge_hf_pending", default=None)


def take_pending(key: Tensor, value: Tensor) -> tuple[KVForgeCache, int] | None:
    """``(cache, layer_idx)`` when ``key``/``value`` are what a paged-mode :class:`KVForgeCache`
    update just returned (then the pending update is consumed), else None."""
    p = _PENDING.get()
    if p is None or p.key is not key or p.value is not value:
        return None
    _PENDING.set(None)
    return p.cache, p.layer_idx


class KVForgeLayer(CacheLayerMixin):
    """One layer's view of a :class:`KVForgeCache`: it counts the grid columns it has seen
    (``get_seq_length``) and hands updates to the cache. It holds no tensors (``keys`` and
    ``values`` stay None: the data lives in the kvforge pool)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False
    # the mask hook is handed every column; the kernels apply a layer's window (and in paged
    # mode its layer group holds only the blocks the window reads)
    is_sliding = False

    def __init__(self, cache: KVForgeCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.num_columns = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.cache._update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.num_columns = 0

    def __repr__(self) -> str:
        return f"KVForgeLayer({self.layer_idx}, columns={self.num_columns})"


class KVForgeCache(Cache):
    """A transformers ``Cache`` backed by a kvforge :class:`~kvforge.storage.KVCache`.

    ``model.generate(ids, past_key_values=KVForgeCache(model.config))`` (transformers
    5 also takes ``cache=``) keeps every layer's keys and values in kvforge's paged
    pool. ``config``: the model's config (its decoder text config is used).
    ``num_blocks``: blocks of ``block_size`` tokens in the pool; None sizes it, when
    the first tokens arrive, for ``max_position_embeddings`` tokens per batch row
    (backed by device memory in chunks as the rows grow). ``device``/``dtype``:
    where and how keys/values are stored; None takes the model's keys' device and
    dtype (the device must be the model's); an fp8 ``dtype`` (``"fp8_e4m3"``,
    ``"fp8_e5m2"``) stores one byte an element, taking and giving keys/values in
    the model's dtype (scales 1.0 unless set on :attr:`kv_cache` before the
    first tokens: ``docs/fp8.md``). ``backend``: kvforge's kernels
    (``"auto"``: Triton on GPUs, the torch reference on the CPU).
    ``sliding_window_blocks``: ``"free"`` (the default) lets sliding-window
    layers release the blocks before their window in paged mode, when the
    model mixes them with full-attention layers (the module docstring says
    when); ``"keep"`` keeps every block of every layer. :attr:`layer_windows`
    is each layer's window as the config says it (None: full attention).

    Rows are kvforge sequences (:attr:`seq_ids`); :attr:`kv_cache` is the
    underlying KVCache (None until the first tokens). ``crop`` takes tokens
    back (assisted and prompt-lookup decoding). Limits: layer types other than
    full and sliding attention are refused at construction; the batch size is fixed by
    the first tokens (beam search and ``num_return_sequences`` reorder rows
    by forking them).
    """

    def __init__(self, config: Any, *, num_blocks: int | None = None, block_size: int = 16,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 backend: str = "auto", sliding_window_blocks: str = "free") -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"KVForgeCache needs a model config with num_hidden_layers, got {type(config).__name__}")
        layer_types = list(getattr(text, "layer_types", None) or [])
        odd = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if odd or getattr(text, "kv_sharing_modes", None):
            raise ConfigError(f"KVForgeCache holds full and sliding attention layers; this model "
                              f"({type(text).__name__}) has {', '.join(odd) or 'KV sharing between layers'}")
        for name, value in (("block_size", block_size), ("num_blocks", num_blocks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"KVForgeCache {name} must be a positive int, got {value!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"KVForgeCache backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if not isinstance(sliding_window_blocks, str) or sliding_window_blocks not in SLIDING_WINDOW_BLOCKS:
            raise ConfigError(f"KVForgeCache sliding_window_blocks must be 'free' or 'keep', "
                              f"got {sliding_window_blocks!r:.40}")
        self.layer_windows = layer_windows_of(text, num_layers)
        super().__init__(layers=[KVForgeLayer(self, i) for i in range(num_layers)])
        self.config = text
        self.sliding_window_blocks = sliding_window_blocks
        self.block_size = block_size
        self.requested_num_blocks = num_blocks
        self.device = None if device is None else torch.device(device)
        # an fp8 dtype ("fp8_e4m3", "fp8_e5m2") stores one byte an element, quantized with the
        # pool's scales (1.0: set others with kv_cache.set_kv_scales before the first tokens)
        self.dtype = None if dtype is None else resolve_kv_dtype(dtype, "KVForgeCache dtype")
        self.backend = backend
        self.kv_cache: KVCache | None = None
        self.seq_ids: list[int] = []
        self._next_seq_id = 0
        self._num_columns = 0            # grid columns with slots reserved (the current step's included)
        self._step: PagedInputs | None = None
        self.is_paged: bool | None = None  # fixed by the first tokens (see the module docstring)

    # ------------------------------------------------------------ transformers' Cache API
    def _update(self, layer: KVForgeLayer, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, seq, _ = key.shape
        if self.is_paged is None:
            is_paged = getattr(self.config, "_attn_implementation", None) == _attention_name()
            if not is_paged and self.kv_cache is not None and self.kv_cache.groups is not None:
                raise KVForgeError(
                    f"KVForgeCache: this pool was built for paged mode (attn_implementation='{_attention_name()}'), "
                    f"where its sliding-window layers release the blocks before their window; "
                    f"{self.config._attn_implementation!r} attention (dense mode) needs every layer's whole history. "
                    f"Use a new KVForgeCache, or sliding_window_blocks='keep'")
            self.is_paged = is_paged
        self._ensure_storage(key)
        if self.is_paged:
            pending = _PENDING.get()
            if pending is not None and pending.cache is self:
                raise KVForgeError(
                    f"KVForgeCache: layer {pending.layer_idx}'s keys/values were never attended on the kvforge "
                    f"backend (its attention did not run as attn_implementation='{_attention_name()}'); "
                    f"load the model with it, or use this cache with another implementation from the start")
            layer.num_columns += seq
            _PENDING.set(_Pending(self, layer.layer_idx, key, value))
            return key, value
        self._enter_step(layer.layer_idx, layer.num_columns, seq, None)
        layer.num_columns += seq
        step = self._step
        assert step is not None and self.kv_cache is not None
        dtype = self.kv_cache.config.resolved_model_dtype  # what write() takes (an fp8 pool quantizes it)
        self.kv_cache.write(layer.layer_idx, step.slot_mapping, to_tokens(key, None).to(dtype),
                            to_tokens(value, None).to(dtype))
        return self._gather(layer.layer_idx, key.dtype)

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None, *,
               scale: float, sliding_window: int | None, soft_cap: float | None) -> Tensor:
        """Paged mode: store layer ``layer_idx``'s new keys/values ``[B, Hkv, S, D]`` (the real
        cells of ``padding`` ``[B, >= S]`` bool, or all) and attend ``query`` ``[B, Hq, S, D]``
        over each row's stored tokens; returns ``[B, S, Hq, D]`` in the query dtype."""
        layer = self.layers[layer_idx]
        batch, _, seq, _ = key.shape
        real = None if padding is None else padding[:, -seq:]
        try:
            group = self._check_window(layer_idx, sliding_window)
            self._enter_step(layer_idx, layer.num_columns - seq, seq, real)
        except KVForgeError:
            layer.num_columns -= seq  # update() counted the columns; a refused step leaves no trace
            raise
        kv = self.kv_cache
        assert self._step is not None and kv is not None
        step = self._step.for_group(group)
        dtype = kv.config.resolved_model_dtype  # what write() and the kernels take (an fp8 pool quantizes)
        kv.write(layer_idx, step.slot_mapping, to_tokens(key, step.real).to(dtype), to_tokens(value, step.real).to(dtype))
        q = to_tokens(query, step.real).to(dtype)
        out = paged_attention(q, kv.layer_view(layer_idx), None, step, scale=scale, sliding_window=sliding_window,
                              soft_cap=soft_cap, backend=kv.backend)
        return from_tokens(out.to(query.dtype), step.real, batch, seq)

    def reset(self) -> None:
        """Free every row's sequence; the pool stays allocated for the next generation."""
        if self.kv_cache is not None:
            for s in self.seq_ids:
                self.kv_cache.free_sequence(s)
        self.seq_ids = []
        self._num_columns = 0
        self._step = None
        self.is_paged = None
        for layer in self.layers:
            layer.reset()
        pending = _PENDING.get()
        if pending is not None and pending.cache is self:
            _PENDING.set(None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes row ``beam_idx[i]`` (beam search): forks, no keys copied."""
        self._reindex([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (forks)."""
        self._reindex([r for r in range(len(self.seq_ids)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (forks, then the others are freed)."""
        self._reindex([int(i) for i in indices.tolist()])

    def crop(self, tokens_to_remove: int) -> None:
        """Take the last ``-tokens_to_remove`` tokens back from every row (transformers' convention:
        a negative count; 0 does nothing), with :meth:`KVCache.truncate_batch`: the blocks past the
        new end go back to the pool (or stay to the rows that share them). What assisted and
        prompt-lookup decoding call to drop rejected drafts. The cropped columns must hold a token
        in every row (true after any step without padding: those decodings run one row); a
        positive count (transformers' legacy absolute length) is refused, as transformers does.
        With sliding-window layers releasing blocks, a crop back to the last step's first token
        or later always works; one further back is refused (:class:`SequenceError`, nothing
        changed) when a window layer released what the shorter rows would read."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise ConfigError(f"KVForgeCache.crop takes an int, got {tokens_to_remove!r}")
        if tokens_to_remove > 0:
            raise ConfigError(f"KVForgeCache.crop({tokens_to_remove}): pass a negative count of tokens to remove "
                              f"(a positive one is transformers' legacy absolute length, refused there too)")
        n = -tokens_to_remove
        if n == 0:
            return
        kv = self.kv_cache
        if kv is None or n > self._num_columns:
            raise ConfigError(f"KVForgeCache.crop({tokens_to_remove}): the cache holds {self._num_columns} columns")
        lens = [kv.seq_len(s) for s in self.seq_ids]
        if min(lens, default=0) < n:
            raise ConfigError(f"KVForgeCache.crop({tokens_to_remove}): a row holds only {min(lens)} tokens "
                              f"(its cropped columns are padding)")
        try:
            kv.truncate_batch(self.seq_ids, [length - n for length in lens])
        except SequenceError as exc:
            raise SequenceError(
                f"KVForgeCache.crop({tokens_to_remove}) goes back further than the sliding-window layers hold: "
                f"{exc} (a crop back to the last step's first token always works; "
                f"KVForgeCache(..., sliding_window_blocks='keep') keeps every block)") from None
        self._num_columns -= n
        for layer in self.layers:
            layer.num_columns = min(layer.num_columns, self._num_columns)
        self._step = None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids) if self.kv_cache is not None else -1

    # ------------------------------------------------------------ kvforge side
    @property
    def num_blocks(self) -> int | None:
        """Blocks of the pool (None until it is created)."""
        return None if self.kv_cache is None else self.kv_cache.config.num_blocks

    def gather(self, row: int, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Row ``row``'s stored keys and values of one layer, ``[num_tokens, kv_heads, head_dim]``
        each, read from the pool (padding is absent in paged mode). A sliding-window layer that
        released blocks no longer has them: :class:`KVForgeError` names the layer."""
        if self.kv_cache is None:
            raise KVForgeError("KVForgeCache.gather(): nothing is stored yet")
        if not 0 <= row < len(self.seq_ids):
            raise KVForgeError(f"KVForgeCache.gather(): row {row} out of range ({len(self.seq_ids)} rows)")
        return self.kv_cache.gather(self.seq_ids[row], layer_idx)

    def check_invariants(self) -> None:
        """Assert the pool's bookkeeping holds and the layers agree with the reserved columns."""
        for layer in self.layers:
            assert 0 <= layer.num_columns <= self._num_columns, (layer, self._num_columns)
        if self.kv_cache is None:
            assert not self.seq_ids and self._num_columns == 0
            return
        self.kv_cache.check_invariants()
        assert len(set(self.seq_ids)) == len(self.seq_ids)
        for s in self.seq_ids:
            n = self.kv_cache.seq_len(s)
            assert n == self._num_columns if not self.is_paged else n <= self._num_columns, (s, n)

    def __repr__(self) -> str:
        mode = {None: "unset", True: "paged", False: "dense"}[self.is_paged]
        return (f"KVForgeCache(rows={len(self.seq_ids)}, columns={self._num_columns}, mode={mode}, "
                f"kv_cache={self.kv_cache!r})")

    # ------------------------------------------------------------ internals
    def _ensure_storage(self, key: Tensor) -> None:
        """Create the pool and one sequence per row on the first tokens; check later ones fit it."""
        batch, heads, seq, head_dim = key.shape
        if self.kv_cache is not None:
            c = self.kv_cache.config
            if (heads, head_dim) != (c.num_kv_heads, c.head_dim):
                raise KVForgeError(f"KVForgeCache: keys of {heads} heads x {head_dim} dims, but the pool holds "
                                   f"{c.num_kv_heads} x {c.head_dim} (layers of different shapes are not supported)")
            if not self.seq_ids:
                self.seq_ids = self._new_sequences(batch)
            if batch != len(self.seq_ids):
                raise KVForgeError(f"KVForgeCache: a batch of {batch} rows, but the cache holds {len(self.seq_ids)}")
            return
        device = key.device if self.device is None else self.device
        if device != key.device:
            raise KVForgeError(f"KVForgeCache: device {device} was asked, but the model's keys are on {key.device}")
        # dense mode reads every layer's whole history (_gather): only paged mode frees blocks
        windows = self.layer_windows if self.is_paged and self.sliding_window_blocks == "free" else None
        # with layer groups a block holds one group's layers, and every group takes blocks: size
        # for each group keeping every block (the bytes of the pool without groups)
        num_groups = len(plan_kv_groups(windows, len(self.layers)))
        max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        per_row = math.ceil(max(max_positions, seq) / self.block_size) * num_groups
        num_blocks = self.requested_num_blocks or batch * per_row
        first = min(num_blocks, batch * math.ceil(seq / self.block_size) * num_groups)
        store = self.dtype or key.dtype
        cfg = CacheConfig(block_size=self.block_size, num_blocks=num_blocks, num_layers=len(self.layers),
                          num_kv_heads=heads, head_dim=head_dim, dtype=store, device=str(device),
                          model_dtype=key.dtype if is_fp8(store) else None, layer_windows=windows,
                          enable_prefix_caching=False, initial_blocks=max(first, 1), name="KVForgeCache")
        self.kv_cache = KVCache(cfg, backend=self.backend)
        self.seq_ids = self._new_sequences(batch)

    def _new_sequences(self, n: int) -> list[int]:
        assert self.kv_cache is not None
        ids = list(range(self._next_seq_id, self._next_seq_id + n))
        self._next_seq_id += n
        for s in ids:
            self.kv_cache.add_sequence(s)
        return ids

    def _enter_step(self, layer_idx: int, layer_columns: int, seq: int, real: Tensor | None) -> None:
        """The layer that has seen ``layer_columns`` columns brings ``seq`` more: the first
        layer to do so reserves every row's slots (the step's :class:`PagedInputs`)."""
        if layer_columns == self._num_columns:
            self._reserve(seq, real)
        elif layer_columns + seq != self._num_columns:
            raise KVForgeError(f"KVForgeCache: layer {layer_idx} brings columns {layer_columns}..{layer_columns + seq}, "
                               f"but the step in progress reserved up to {self._num_columns}")
        elif real is not None and self._step is not None and self._step.real is not None and \
                not torch.equal(real, self._step.real):
            raise KVForgeError(f"KVForgeCache: layer {layer_idx}'s padding differs from the step's first layer")

    def _reserve(self, seq: int, real: Tensor | None) -> None:
        kv = self.kv_cache
        assert kv is not None
        batch = len(self.seq_ids)
        if real is not None and bool(real.all()):
            real = None
        counts = counts_of(real, batch, seq)
        try:
            slots = kv.append_tokens_batch(self.seq_ids, counts)
        except OutOfBlocksError as exc:
            c = kv.config
            grouped = f", each holding {c.page_layers} of the {c.num_layers} layers" if kv.groups is not None else ""
            raise OutOfBlocksError(
                f"KVForgeCache is full: {exc} (pass a larger num_blocks; the pool has {c.num_blocks} "
                f"blocks of {c.block_size} tokens{grouped})", requested=exc.requested, available=exc.available) from None
        step = PagedInputs(
            slot_mapping=kv.slot_mapping(slots), block_tables=kv.block_tables(self.seq_ids),
            context_lens=kv.context_lens(self.seq_ids), cu_query_lens=cu_lens(counts, kv.device),
            real=None if real is None else real.to(kv.device), is_decode=all(n == 1 for n in counts))
        self._step = step._replace(groups=self._group_inputs(step, counts))
        self._num_columns += seq

    def _group_inputs(self, step: PagedInputs, counts: list[int]) -> tuple[PagedInputs, ...]:
        """The other layer groups' slots and tables for the step just reserved (each row's last
        ``counts`` tokens). Not :meth:`KVCache.prepare_step`: its staging buffer is reused by the
        next step, safe only for a caller that syncs between steps (the engine); transformers'
        loop promises a cache no such thing, so these are uploaded as the group-0 inputs are."""
        kv = self.kv_cache
        assert kv is not None
        if kv.groups is None:
            return ()
        ends = [kv.seq_len(s) for s in self.seq_ids]
        positions = np.concatenate([np.arange(end - k, end, dtype=np.int64) for end, k in zip(ends, counts)])
        query_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        parts = kv.groups.step_parts(self.seq_ids, positions, query_start, step.block_tables.shape[1])

        def tables_on_device(tables: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(tables, dtype=np.int32)).to(kv.device)

        return tuple(step._replace(slot_mapping=kv.slot_mapping(slots), block_tables=tables_on_device(tables))
                     for slots, tables in parts)

    def _check_window(self, layer_idx: int, sliding_window: int | None) -> int:
        """Layer ``layer_idx``'s group; raises when its attention reads further back than the
        group's window keeps (a model whose layers do not attend as its config says)."""
        kv = self.kv_cache
        assert kv is not None
        group = kv.layer_groups[layer_idx]
        window = kv.config.kv_groups[group].window
        if window is not None and (sliding_window is None or sliding_window > window):
            raise KVForgeError(
                f"KVForgeCache: layer {layer_idx} attends to {sliding_window or 'every'} past token(s), but its "
                f"blocks before the last {window} are released (the config's sliding window for it); "
                f"pass sliding_window_blocks='keep' to keep every block")
        return group

    def _gather(self, layer_idx: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Dense mode: every row's whole history of one layer, ``[B, Hkv, columns, D]`` each."""
        kv, step = self.kv_cache, self._step
        assert kv is not None and step is not None and kv.groups is None  # dense pools keep every block
        view = kv.layer_view(layer_idx)
        n, bs = self._num_columns, kv.config.block_size
        ids = step.block_tables[:, : math.ceil(n / bs)].long()
        batch = ids.shape[0]

        def dense(chunks: tuple[Tensor, ...], scale: Tensor | None) -> Tensor:
            blocks = reference.gather_blocks(chunks, ids)  # [B, blocks, block_size, Hkv, D]
            if scale is not None:  # fp8: stored * scale, per KV head
                blocks = fp8.dequantize(blocks, scale, dtype)
            return blocks.reshape(batch, -1, view.num_kv_heads, view.head_dim)[:, :n].transpose(1, 2).to(dtype)

        return dense(view.k_chunks, view.k_scale), dense(view.v_chunks, view.v_scale)

    def _reindex(self, rows: list[int]) -> None:
        """The new row ``i`` is the old row ``rows[i]``: fork each, then free the old sequences."""
        if self.kv_cache is None or not self.seq_ids:
            return
        if any(not 0 <= r < len(self.seq_ids) for r in rows):
            raise KVForgeError(f"KVForgeCache: row indices {rows} out of range ({len(self.seq_ids)} rows)")
        kv = self.kv_cache
        new = list(range(self._next_seq_id, self._next_seq_id + len(rows)))
        self._next_seq_id += len(rows)
        for child, r in zip(new, rows):
            kv.fork(self.seq_ids[r], child)
        for s in self.seq_ids:
            kv.free_sequence(s)
        self.seq_ids = new
        self._step = None  # the next step reserves again (its tables are the new rows')


def layer_windows_of(config: Any, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention) as a transformers text config says:
    ``sliding_window`` for the ``"sliding_attention"`` entries of ``layer_types`` when it has
    them (Gemma 2 and 3, Qwen2 with ``use_sliding_window``), else for every layer (Mistral,
    Phi-3); no window without ``sliding_window``."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        window = None
    layer_types = list(getattr(config, "layer_types", None) or [])
    if not layer_types:
        return (window,) * num_layers
    if len(layer_types) != num_layers:
        raise ConfigError(f"KVForgeCache: the config lists {len(layer_types)} layer_types for "
                          f"{num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _attention_name() -> str:
    from kvforge.integrations.hf.attention import ATTENTION_NAME
    return ATTENTION_NAME
