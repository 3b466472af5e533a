"""The engine's attention for transformers models: one step's paged metadata, read by every layer.

When the engine drives a transformers model (``model_impl="transformers"``,
:mod:`kvforge.engine.hf_model`), the model runs its own code for one
flattened ragged batch per engine step: batch dim 1, every sequence's new
tokens concatenated, ``position_ids`` given. Its attention layers call
:func:`engine_attention_forward`, registered with transformers'
``AttentionInterface`` as :data:`ENGINE_ATTENTION_NAME`. That function reads
the step's :class:`~kvforge.storage.StepBatch` from :func:`attention_step`
(a context variable, so it needs nothing from the model's kwargs), stores the
new tokens' keys/values at the step's ``slot_mapping`` and attends with
kvforge's paged kernels: decode rows through the decode kernel, prefill
chunks through the prefill kernel, as the native model does.

No mask function is registered under the name, so transformers builds no
mask at all (``create_causal_mask`` returns None at once: no packed-sequence
detection, no device sync): causality, per-sequence separation, sliding
windows and soft-capping are the kernels' job, read from the block tables,
context lengths and the layer's own ``sliding_window`` / ``softcap``.

This is the engine layer's own function (it knows the engine's step
inputs); :mod:`kvforge.integrations.hf` registers ``"kvforge"`` for
transformers' own ``generate``, over a ``KVForgeCache``.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from kvforge import kernels
from kvforge.errors import KVForgeError
from kvforge.storage import KVCache, StepBatch

__all__ = ["ENGINE_ATTENTION_NAME", "StepAttention", "attention_step", "engine_attention_forward", "register"]

#: the ``attn_implementation`` the engine sets on the transformers models it drives
ENGINE_ATTENTION_NAME = "kvforge_engine"


class StepAttention:
    """One engine step as every attention layer of a transformers model reads it.

    ``cache``: the engine's :class:`~kvforge.storage.KVCache`; ``batch``: the
    step's inputs (``T`` tokens). :attr:`num_calls` counts the layers that
    attended, so that the caller can tell a model whose layers do not all go
    through the attention interface (:meth:`check_complete`)."""

    __slots__ = ("cache", "batch", "num_calls", "layers_seen")

    def __init__(self, cache: KVCache, batch: StepBatch) -> None:
        self.cache = cache
        self.batch = batch
        self.num_calls = 0
        self.layers_seen: set[int] = set()

    def attend(self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, *, scale: float,
               sliding_window: int | None, soft_cap: float | None) -> Tensor:
        """Store ``key``/``value`` ``[1, Hkv, T, D]`` of layer ``module.layer_idx`` and attend
        ``query`` ``[1, Hq, T, D]``; returns ``[1, T, Hq, D]`` (transformers' layout)."""
        name = type(module).__name__
        layer = getattr(module, "layer_idx", None)
        cfg = self.cache.config
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cfg.num_layers:
            raise KVForgeError(f"{name}: layer_idx {layer!r} is not a layer of the cache (0..{cfg.num_layers - 1})")
        if layer in self.layers_seen:
            raise KVForgeError(f"{name}: layer {layer} attended twice in one step (layers sharing an index, or "
                               f"KV shared between layers, are not supported)")
        t = self.batch.num_tokens
        if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != t:
            raise KVForgeError(f"{name}: expected a query of [1, heads, {t}, head_dim] (the step's flattened tokens), "
                               f"got {tuple(query.shape)}")
        if tuple(key.shape) != (1, cfg.num_kv_heads, t, cfg.head_dim) or value.shape != key.shape:
            raise KVForgeError(f"{name} (layer {layer}): keys {tuple(key.shape)} and values {tuple(value.shape)}, but "
                               f"the cache holds {cfg.num_kv_heads} KV heads x {cfg.head_dim} dims per layer "
                               f"(layers of different shapes are not supported)")
        if query.shape[-1] != cfg.head_dim or query.shape[1] % cfg.num_kv_heads:
            raise KVForgeError(f"{name} (layer {layer}): {query.shape[1]} query heads of dim {query.shape[-1]} over "
                               f"{cfg.num_kv_heads} KV heads of dim {cfg.head_dim}")
        batch = self.batch
        if batch.groups:  # a sliding-window layer's own slots and tables
            group = self.cache.layer_groups[layer]
            window = cfg.kv_groups[group].window
            if window is not None and (sliding_window is None or sliding_window > window):
                raise KVForgeError(f"{name} (layer {layer}): attends to {sliding_window or 'every'} past token(s), but "
                                   f"the cache keeps only the last {window} for this layer (its layer_windows entry)")
            batch = batch.for_group(group)
        self.layers_seen.add(layer)
        self.num_calls += 1
        self.cache.write(layer, batch.slot_mapping, _rows(key), _rows(value))
        return _paged(_rows(query), self.cache, layer, batch, scale=scale, sliding_window=sliding_window,
                      soft_cap=soft_cap).unsqueeze(0)

    def check_complete(self, num_layers: int) -> None:
        """Raise unless exactly ``num_layers`` layers attended in the step."""
        if self.num_calls != num_layers:
            raise KVForgeError(f"{self.num_calls} of the model's {num_layers} layers attended through "
                               f"attn_implementation='{ENGINE_ATTENTION_NAME}': the others do not use transformers' "
                               f"attention interface (recurrent, state-space or custom attention layers?)")


def _rows(x: Tensor) -> Tensor:
    """``[1, H, T, D]`` -> ``[T, H, D]``: a view (the kernels take any token and head strides),
    copied only when ``head_dim`` is not its unit-stride dimension."""
    rows = x[0].transpose(0, 1)
    return rows if rows.stride(2) == 1 else rows.contiguous()


def _paged(q: Tensor, cache: KVCache, layer: int, batch: StepBatch, *, scale: float, sliding_window: int | None,
           soft_cap: float | None) -> Tensor:
    """The native model's split: decode rows through the decode kernel, prefill chunks
    through the prefill kernel (each gets tiles shaped for its rows); ``[T, Hq, D]``."""
    view = cache.layer_view(layer)
    backend = cache.backend
    if batch.is_decode:
        assert batch.decode_block_tables is not None and batch.decode_context_lens is not None
        return kernels.paged_decode_attention(q, view, None, batch.decode_block_tables, batch.decode_context_lens,
                                              scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                              backend=backend)
    assert batch.prefill_block_tables is not None and batch.prefill_context_lens is not None
    assert batch.cu_query_lens is not None
    nd = batch.num_decodes
    out = q.new_empty(q.shape)
    if nd:
        assert batch.decode_block_tables is not None and batch.decode_context_lens is not None
        kernels.paged_decode_attention(q[:nd], view, None, batch.decode_block_tables, batch.decode_context_lens,
                                       scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, out=out[:nd],
                                       backend=backend)
    kernels.paged_prefill_attention(q[nd:], view, None, batch.prefill_block_tables, batch.cu_query_lens,
                                    batch.prefill_context_lens, scale=scale, sliding_window=sliding_window,
                                    soft_cap=soft_cap, out=out[nd:], backend=backend)
    return out


#: the step being run (per thread / task); None outside :func:`attention_step`
_STEP: contextvars.ContextVar[StepAttention | None] = contextvars.ContextVar("kvforge_engine_step", default=None)


@contextmanager
def attention_step(cache: KVCache, batch: StepBatch) -> Iterator[StepAttention]:
    """Run a transformers forward inside this block: its attention layers read ``batch``."""
    step = StepAttention(cache, batch)
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


def engine_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention contract, inside :func:`attention_step` only: ``query``
    ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]`` (the step's new tokens);
    returns ``([1, T, Hq, D], None)``. ``sliding_window`` w keeps the last w positions
    (the token's own included); ``softcap`` c maps logits to ``c * tanh(logits / c)``."""
    name = type(module).__name__
    step = _STEP.get()
    if step is None:
        raise KVForgeError(f"{name}: attn_implementation='{ENGINE_ATTENTION_NAME}' runs only inside kvforge's "
                           f"Engine (model_impl='transformers'); for transformers' own generate use "
                           f"attn_implementation='kvforge' (import kvforge.integrations.hf)")
    if dropout:
        raise KVForgeError(f"{name}: attention dropout {dropout} is not supported by the engine (eval only)")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise KVForgeError(f"{name}: the engine's attention is causal only (this layer is bidirectional)")
    if getattr(module, "sinks", None) is not None:
        raise KVForgeError(f"{name}: attention sinks are not supported by the engine's paged kernels")
    if attention_mask is not None:
        raise KVForgeError(f"{name}: this model builds its own attention mask ({type(attention_mask).__name__}), "
                           f"which the engine's paged kernels cannot honour")
    if key.shape[-1] != value.shape[-1]:
        raise KVForgeError(f"{name}: keys of head dim {key.shape[-1]} and values of {value.shape[-1]} differ")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = step.attend(module, query, key, value, scale=scale,
                      sliding_window=int(sliding_window) if sliding_window is not None else None,
                      soft_cap=float(softcap) if softcap is not None else None)
    return out.to(query.dtype), None


def register() -> None:
    """Register :func:`engine_attention_forward` with transformers (idempotent). No mask
    function is registered: transformers then builds no mask for this implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION_NAME, engine_attention_forward)
