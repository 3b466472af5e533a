"""The ``"kvforge"`` attention implementation for transformers models.

:func:`register` adds :func:`kvforge_attention_forward` to transformers'
``AttentionInterface`` and :func:`kvforge_mask` to its
``AttentionMaskInterface`` under :data:`ATTENTION_NAME`, so that
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvforge")``
runs the model's own code with kvforge's store and paged prefill/decode
kernels (the cache's backend: the torch reference on the CPU, Triton on
GPUs). Importing :mod:`kvforge.integrations.hf` registers it.

The mask function builds no 4D mask: the kernels apply causality, the
sliding window and soft-capping themselves, so the attention function gets
only the 2D padding mask ``[batch, kv_len]`` (bool), or None when nothing is
padded.

With a :class:`~kvforge.integrations.hf.KVForgeCache` the keys/values are
stored once, in the paged pool, and read from there. With any other cache
(the ``DynamicCache`` plain ``generate`` makes) or none, the attention
function receives the whole history from transformers and lays it out in a
scratch paged pool for the same kernels on every call: correct, but the
storage is transformers' (pass a KVForgeCache to keep keys/values in kvforge).

kvforge's engine over a transformers model (``Engine(model_impl="transformers")``)
does not go through this function: the engine layer registers its own,
``"kvforge_engine"`` (:mod:`kvforge.engine.hf_attention`), which reads the
engine step's paged metadata (one flattened ragged batch per forward).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from kvforge import kernels
from kvforge.errors import KVForgeError
from kvforge.integrations.hf.cache import take_pending
from kvforge.integrations.hf.paged import PagedInputs, counts_of, cu_lens, from_tokens, paged_attention, to_tokens

__all__ = ["ATTENTION_NAME", "kvforge_attention_forward", "kvforge_mask", "register"]

log = logging.getLogger(__name__)

#: the name to pass as ``attn_implementation``
ATTENTION_NAME = "kvforge"

#: block size of the scratch pool used without a KVForgeCache
SCRATCH_BLOCK_SIZE = 16


def register(name: str = ATTENTION_NAME) -> None:
    """Register the attention and mask functions with transformers under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, kvforge_attention_forward)
    AttentionMaskInterface.register(name, kvforge_mask)


def kvforge_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Any = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """transformers' mask hook for ``"kvforge"``: the 2D padding mask ``[batch, kv_length]``
    (bool; its last ``kv_length`` columns), or None when no cell is padding.

    Causality and sliding windows are the kernels' job; a custom overlay
    (``or_mask_function`` / ``and_mask_function``: bidirectional or image-token
    attention) cannot be expressed and raises."""
    if kwargs.get("use_vmap"):
        raise KVForgeError(f"attn_implementation='{ATTENTION_NAME}' supports causal and sliding-window masks "
                           f"only; this model adds a custom mask overlay (or_/and_mask_function)")
    if attention_mask is None:
        return None
    m = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(m.all()) else m


def kvforge_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              sliding_window: int | None = None, softcap: float | None = None,
                              **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention contract: ``query`` ``[B, Hq, S, D]``, ``key``/``value``
    ``[B, Hkv, L, D]`` (the new tokens only, from a paged-mode KVForgeCache; otherwise
    the whole visible history), ``attention_mask`` from :func:`kvforge_mask`. Returns
    ``([B, S, Hq, D], None)`` (no attention weights). ``sliding_window`` w keeps the
    last w positions (the token's own included); ``softcap`` c maps logits to
    ``c * tanh(logits / c)``."""
    name = type(module).__name__
    if dropout:
        raise KVForgeError(f"{name}: attention dropout {dropout} is not supported by '{ATTENTION_NAME}' (eval only)")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise KVForgeError(f"{name}: '{ATTENTION_NAME}' attention is causal only (this layer is bidirectional)")
    if getattr(module, "sinks", None) is not None:
        raise KVForgeError(f"{name}: attention sinks are not supported by '{ATTENTION_NAME}'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise KVForgeError(f"{name}: '{ATTENTION_NAME}' takes a 2D padding mask, got a {attention_mask.dim()}D mask "
                           f"(a prepared 4D mask cannot be honoured)")
    if key.shape[-1] != value.shape[-1]:
        raise KVForgeError(f"{name}: keys of head dim {key.shape[-1]} and values of {value.shape[-1]} differ")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window is not None else None
    cap = float(softcap) if softcap is not None else None
    pending = take_pending(key, value)
    if pending is None and not _said_scratch:
        _note_scratch()
    if pending is not None:
        cache, layer_idx = pending
        out = cache.attend(layer_idx, query, key, value, attention_mask, scale=scale, sliding_window=window,
                           soft_cap=cap)
    else:
        out = _scratch_attention(query, key, value, attention_mask, scale=scale, sliding_window=window, soft_cap=cap)
    return out, None


_said_scratch = False


def _note_scratch() -> None:
    global _said_scratch
    _said_scratch = True
    log.info("attn_implementation='%s' without a KVForgeCache: keys/values stay in transformers' cache and are "
             "copied into a scratch paged pool on every call (pass cache=KVForgeCache(model.config) to keep "
             "them in kvforge)", ATTENTION_NAME)


def _scratch_attention(query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None, *, scale: float,
                       sliding_window: int | None, soft_cap: float | None) -> Tensor:
    """Without a KVForgeCache: store the real cells of the history ``[B, Hkv, L, D]`` in a
    scratch pool (row b in blocks ``b * n .. b * n + n - 1``), attend the query's real cells
    (the last ``S`` columns) with the paged kernels; ``[B, S, Hq, D]``."""
    batch, _, seq, head_dim = query.shape
    kv_len, kv_heads = key.shape[2], key.shape[1]
    if padding is not None and padding.shape != (batch, kv_len):
        raise KVForgeError(f"padding mask of shape {tuple(padding.shape)} for keys of {batch} rows x {kv_len}")
    bs = SCRATCH_BLOCK_SIZE
    per_row = max(1, math.ceil(kv_len / bs))
    dev = key.device
    base = torch.arange(batch, device=dev)[:, None] * (per_row * bs)
    if padding is None:
        slots = (base + torch.arange(kv_len, device=dev)[None, :]).reshape(-1)
        ctx = torch.full((batch,), kv_len, dtype=torch.int32, device=dev)
        real_q = None
    else:
        padding = padding.to(dev)
        slots = (base + padding.long().cumsum(1) - 1)[padding]
        ctx = padding.sum(1).to(torch.int32)
        real_q = padding[:, -seq:]
        if bool(real_q.all()):
            real_q = None
    # the scratch pool is in the keys' own dtype, never fp8: raw block tensors suffice (an fp8
    # pool is a KVForgeCache's, passed to the kernels as its layer_view with the scales)
    pool_k = key.new_empty(batch * per_row, bs, kv_heads, head_dim)
    pool_v = value.new_empty(batch * per_row, bs, kv_heads, head_dim)
    kernels.store_kv(to_tokens(key, padding), to_tokens(value, padding), pool_k, pool_v, slots)
    counts = counts_of(real_q, batch, seq)
    inputs = PagedInputs(slot_mapping=slots, block_tables=torch.arange(batch * per_row, dtype=torch.int32,
                                                                       device=dev).view(batch, per_row),
                         context_lens=ctx, cu_query_lens=cu_lens(counts, dev), real=real_q,
                         is_decode=all(n == 1 for n in counts))
    out = paged_attention(to_tokens(query, real_q).to(key.dtype), pool_k, pool_v, inputs, scale=scale,
                          sliding_window=sliding_window, soft_cap=soft_cap, backend="auto")
    return from_tokens(out.to(query.dtype), real_q, batch, seq)
