"""Sampling parameters and the batched sampler.

:class:`SamplingParams` is a frozen, validated description of how one request
picks its tokens. :func:`sample` turns a batch of float32 logits into token
ids on the logits' device in a handful of kernels, whatever the mix of
greedy and random rows.

Reproducibility: a random row draws Gumbel noise from a counter-based hash of
``(seed, output index, token id)`` instead of a stateful generator, so a
request's tokens depend only on its seed and its logits: not on which other
requests share the batch, on preemption and recompute, or on the step that
sampled them. Requests without a seed get one from the engine's seeded
generator at arrival.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from kvforge.errors import ConfigError

__all__ = ["SamplingParams", "SamplingBatch", "sample", "to_device", "uniform_noise", "MAX_SEED"]

#: Largest accepted ``SamplingParams.seed`` (seeds are int64 on the device).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops.

    ``temperature`` 0 (the default) is greedy; above 0 the token is drawn
    from ``softmax(logits / temperature)`` restricted by ``top_k`` (0 = off)
    and then ``top_p`` (1.0 = off), in that order, as transformers applies
    them. ``seed`` makes a random request reproducible. ``n`` completions
    share the prompt's blocks through :meth:`~kvforge.storage.cache.KVCache.fork`.
    A request stops after ``max_tokens`` tokens, on an end-of-sequence token
    of the model (unless ``ignore_eos``) or on any of ``stop_token_ids``; the
    stopping token is part of the output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ConfigError(f"SamplingParams.{name} must be an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))

        integer("max_tokens", 1)
        integer("n", 1)
        integer("top_k", 0)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) < float("inf"):
            raise ConfigError(f"SamplingParams.temperature must be a finite number >= 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < float(p) <= 1.0:
            raise ConfigError(f"SamplingParams.top_p must lie in (0, 1], got {p!r}")
        object.__setattr__(self, "top_p", float(p))
        if self.seed is not None:
            # the sampler hashes seeds as int64: refuse what would overflow there, mid-step
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) \
                    or not 0 <= self.seed <= MAX_SEED:
                raise ConfigError(f"SamplingParams.seed must be None or an integer in [0, 2**63 - 1], "
                                  f"got {self.seed!r}")
            object.__setattr__(self, "seed", int(self.seed))
        raw = self.stop_token_ids
        try:
            items = list(raw) if not isinstance(raw, (str, bytes)) else [raw]
            if any(isinstance(t, bool) for t in items):
                raise TypeError
            stop = tuple(operator.index(t) for t in items)  # ints, numpy ints; not floats
        except TypeError:
            raise ConfigError(f"SamplingParams.stop_token_ids must be token ids, got {raw!r:.80}") from None
        if any(t < 0 for t in stop):
            raise ConfigError(f"SamplingParams.stop_token_ids must be >= 0, got {stop!r:.80}")
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        """Temperature 0: always the most likely token."""
        return self.temperature == 0.0


class SamplingBatch(NamedTuple):
    """Per-row sampling settings, host-side (one row per token to sample).

    ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p``, ``seed`` and
    ``step`` (the index of the output token being drawn) are lists of
    length ``N``.
    """

    temperature: Sequence[float]
    top_k: Sequence[int]
    top_p: Sequence[float]
    seed: Sequence[int]
    step: Sequence[int]


_M = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _M
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_STEP = _signed(0xD6E8FEB86659FD93)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Uniform floats in (0, 1), ``[N, vocab_size]``: a splitmix64 hash of
    ``(seeds[i], steps[i], token id)``; int64 ``seeds``/``steps`` ``[N]``."""
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds * _GOLDEN + steps * _STEP)[:, None] + ids[None, :] * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a device tensor without waiting for the device: on a GPU through
    page-locked memory and a non-blocking copy (a copy from pageable memory waits until every
    queued kernel has finished, which would undo the overlap of asynchronous scheduling)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def sample(logits: Tensor, batch: SamplingBatch | None) -> Tensor:
    """Token ids (int64 ``[N]``) from float32 ``logits`` ``[N, vocab]``.

    ``batch`` None means every row is greedy (one argmax)."""
    greedy = logits.argmax(dim=-1)
    if batch is None or not any(t > 0 for t in batch.temperature):
        return greedy
    dev = logits.device
    n, vocab = logits.shape
    temp = to_device(batch.temperature, torch.float32, dev)
    is_greedy = temp == 0
    scaled = logits / torch.where(is_greedy, 1.0, temp)[:, None]
    noise = uniform_noise(to_device(batch.seed, torch.int64, dev), to_device(batch.step, torch.int64, dev), vocab)
    gumbel = -torch.log(-torch.log(noise))
    if any(k > 0 for k in batch.top_k) or any(p < 1.0 for p in batch.top_p):
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        k = to_device([k if 0 < k < vocab else vocab for k in batch.top_k], torch.int64, dev)
        keep = rank < k[:, None]
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = to_device(batch.top_p, torch.float32, dev)
        keep &= (mass_before < top_p[:, None]) | (rank == 0)
        scores = sorted_logits.masked_fill(~keep, float("-inf")) + gumbel.gather(1, order)
        drawn = order.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    else:
        drawn = (scaled + gumbel).argmax(dim=-1)
    return torch.where(is_greedy, greedy, drawn)
