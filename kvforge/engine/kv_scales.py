"""A checkpoint's fp8 KV cache scales: which tensors they are, their checks, and applying them.

Checkpoints quantized for an fp8 KV cache ship one dequantization scale per
layer for the keys and one for the values (``stored = k / k_scale``, read as
``stored * k_scale``: the convention of :meth:`kvforge.storage.KVCache.set_kv_scales`).
The tensor names differ between the tools that make them; the ones vLLM's
loader accepts are accepted here (``N`` is the layer):

- ``model.layers.N.self_attn.k_scale`` / ``v_scale`` (vLLM, llm-compressor's
  current export, AutoFP8);
- ``model.layers.N.self_attn.attn.k_scale`` / ``v_scale`` (vLLM's own module path);
- ``model.layers.N.self_attn.k_proj.k_scale`` / ``v_proj.v_scale`` (NVIDIA ModelOpt);
- ``model.layers.N.self_attn.k_proj.output_scale`` / ``v_proj.output_scale``
  (compressed-tensors' older kv-cache scheme);
- ``model.layers.N.self_attn.kv_scale``: the deprecated single scale for both.

Each is a scalar, ``[1]`` (per tensor) or ``[num_kv_heads]`` (per KV head),
a float, positive and finite. Anything else under these names (another
shape, an integer dtype, a layer the model does not have, two names for one
scale) is refused with a :class:`~kvforge.errors.ModelError` naming the tensor.
A layer without scales keeps the cache's default of 1.0. A bf16/fp16/fp32
cache stores keys unscaled: the scales are checked like the others and then
not used, which the engine logs as a warning (never silently).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

from kvforge.errors import ModelError

__all__ = ["KV_SCALE_NAME_RE", "LayerKVScales", "is_kv_scale_name", "check_kv_scale_specs", "read_kv_scales",
           "apply_kv_scales", "needs_per_head"]

log = logging.getLogger(__name__)

#: the tensor names of a checkpoint's KV cache scales (group 1: the layer)
KV_SCALE_NAME_RE = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(?:(?P<plain>[kv])_scale|attn\.(?P<attn>[kv])_scale|"
    r"(?P<proj>[kv])_proj\.(?P=proj)_scale|(?P<out>[kv])_proj\.output_scale|(?P<both>kv)_scale)")

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class LayerKVScales(NamedTuple):
    """One layer's scales from a checkpoint: float32 ``[1]`` or ``[num_kv_heads]`` each;
    None where the checkpoint has none (the cache's 1.0 stays)."""

    k_scale: Tensor | None
    v_scale: Tensor | None


def is_kv_scale_name(name: str) -> bool:
    """Whether ``name`` is one of the KV cache scale tensor names (module docstring)."""
    return KV_SCALE_NAME_RE.fullmatch(name) is not None


def _which(name: str) -> tuple[int, str] | None:
    """(layer, ``"k"`` / ``"v"`` / ``"kv"``) of a scale tensor's name, or None."""
    m = KV_SCALE_NAME_RE.fullmatch(name)
    if m is None:
        return None
    kind = m.group("plain") or m.group("attn") or m.group("proj") or m.group("out") or m.group("both")
    return int(m.group(1)), kind


def check_kv_scale_specs(specs: Mapping[str, Any], num_layers: int, num_kv_heads: int,
                         where: str = "checkpoint") -> dict[int, dict[str, str]]:
    """Check every scale tensor's header (``spec.shape``, ``spec.dtype``): a float, of shape
    ``[]``, ``[1]`` or ``[num_kv_heads]``, of a layer in range, one tensor per scale.
    Returns layer -> {``"k"``/``"v"``: tensor name}; raises :class:`ModelError`."""
    found: dict[int, dict[str, str]] = {}
    for name, spec in specs.items():
        which = _which(name)
        if which is None:
            continue
        layer, kind = which
        file = f" in {spec.file}" if getattr(spec, "file", None) else ""
        if layer >= num_layers:
            raise ModelError(f"{where}: KV scale {name!r}{file} is for layer {layer}, but the model has "
                             f"{num_layers} layers")
        if spec.dtype not in _FLOAT_DTYPES:
            raise ModelError(f"{where}: KV scale {name!r}{file} has dtype {spec.dtype}; scales are float "
                             f"({'/'.join(_FLOAT_DTYPES)})")
        shape = tuple(spec.shape)
        if shape not in ((), (1,), (num_kv_heads,)):
            raise ModelError(f"{where}: KV scale {name!r}{file} has shape {shape}; a scale is a number "
                             f"([] or [1]) or one per KV head ([{num_kv_heads}])")
        slots = found.setdefault(layer, {})
        for part in ("k", "v") if kind == "kv" else (kind,):
            if part in slots:
                raise ModelError(f"{where}: layer {layer}'s {part}_scale is given twice, by {slots[part]!r} and "
                                 f"{name!r}")
            slots[part] = name
    return found


def read_kv_scales(weights: Mapping[str, Tensor], specs: Mapping[str, Any], num_layers: int, num_kv_heads: int,
                   where: str = "checkpoint") -> dict[int, LayerKVScales]:
    """The checkpoint's scales, layer -> :class:`LayerKVScales` (only layers that have one),
    each checked positive and finite (a :class:`ModelError` naming the tensor); empty when
    the checkpoint has none. Reads only the scale tensors."""
    names = check_kv_scale_specs(specs, num_layers, num_kv_heads, where)
    out: dict[int, LayerKVScales] = {}
    for layer, slots in sorted(names.items()):
        got: dict[str, Tensor] = {}
        for part, name in slots.items():
            t = weights[name].detach().to("cpu", torch.float32).reshape(-1)
            bad = [x for x in t.tolist() if not (math.isfinite(x) and x > 0)]
            if bad:
                raise ModelError(f"{where}: KV scale {name!r} holds {bad[0]!r}; scales must be positive and finite")
            got[part] = t
        out[layer] = LayerKVScales(got.get("k"), got.get("v"))
    return out


def needs_per_head(scales: Mapping[int, LayerKVScales]) -> bool:
    """Whether any scale has one value per KV head (the cache then needs
    ``kv_scale_granularity="head"``)."""
    return any(s is not None and s.numel() > 1 for pair in scales.values() for s in pair)


def apply_kv_scales(cache: Any, scales: Mapping[int, LayerKVScales]) -> None:
    """Set a fresh fp8 cache's scales from ``scales`` (:meth:`~kvforge.storage.KVCache.set_kv_scales`,
    layer by layer; a missing key or value scale keeps the current one). A cache that is not
    fp8 ignores them, with a warning."""
    if not scales:
        return
    if not cache.config.is_fp8:
        log.warning("the checkpoint has KV cache scales for %d layer(s), but the KV cache is %s (unscaled): "
                    "they are not used (kv_dtype='fp8_e4m3' uses them)", len(scales),
                    str(cache.config.dtype).removeprefix("torch."))
        return
    missing = cache.config.num_layers - len(scales)
    if missing:
        log.warning("the checkpoint has KV cache scales for %d of %d layers; the others keep 1.0",
                    len(scales), cache.config.num_layers)
    per_head = cache.config.kv_scale_granularity == "head"
    for layer, pair in sorted(scales.items()):
        current = cache.kv_scales(layer)  # [num_kv_heads] each, equal values for a per-tensor cache
        k = pair.k_scale if pair.k_scale is not None else current.k_scale
        v = pair.v_scale if pair.v_scale is not None else current.v_scale
        cache.set_kv_scales(layer, _fit(k, per_head), _fit(v, per_head))


def _fit(t: Tensor, per_head: bool) -> Tensor:
    """A scale as the cache takes it: 0-d for one value (or a per-tensor cache's current
    per-head copy, whose values are equal), else ``[num_kv_heads]``."""
    if t.numel() == 1 or not per_head:
        return t.reshape(-1)[0].clone()
    return t
