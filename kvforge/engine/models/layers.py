"""Building blocks of the Llama-family forward pass: RMSNorm and RoPE.

Both follow transformers' arithmetic step for step (RMSNorm in float32,
RoPE angles in float32 and then cast to the activation dtype), so that greedy
decoding in float32 reproduces transformers' tokens.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["rms_norm", "RotaryEmbedding", "rope_inv_freq"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / rms(x)`` over the last dim, computed in float32; ``x`` ``[..., dim]``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for default, ``linear`` and ``llama3`` RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """RoPE with a precomputed cos/sin table ``[max_positions, head_dim]``.

    :meth:`apply` rotates queries ``[T, Hq, D]`` and keys ``[T, Hkv, D]`` at
    ``positions`` ``[T]`` (int). The table lives on the model's device and is
    only indexed, so the call is safe inside a CUDA graph.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Mapping[str, Any] | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        inv = rope_inv_freq(head_dim, theta, scaling)
        pos = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
        self.max_positions = max_positions

    def apply(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated ``(q, k)``; ``positions`` ``[T]`` must be < ``max_positions``."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
