"""How a running sequence gives up its blocks: swap to the host tier, or recompute later.

The rule (``preemption_mode="auto"``). Preempting a decoding sequence of
``t`` tokens in ``b`` blocks either

- *recomputes*: its blocks are freed and it is admitted again later with its
  ``t`` tokens as the prompt, costing ``t / prefill_rate`` seconds of prefill
  (less its prefix-cache hits, which this rule ignores: a preempted
  sequence's own blocks are the first to be evicted), or
- *swaps*: its ``b`` blocks move to the host tier and back, costing
  ``2 * b * bytes_per_block / bandwidth`` seconds of copying, on a side
  stream the steps in between do not wait for.

It swaps when the copy costs less than the recompute. Both rates are measured
on this machine: ``prefill_rate`` is the highest prompt tokens per second of
the engine's last :data:`RATE_WINDOW` steps that computed at least
:data:`LARGE_PROMPT_STEP` prompt tokens (a step's fixed cost, its decodes and
launches, is small next to such a prompt; the highest, because the slow ones
are outliers, a kernel compiled on first use or a step the host held up,
and a prefix-heavy workload may see few such steps); until one was seen, the
running mean over all its prompt steps. ``bandwidth`` is the
host tier's copy rate, probed once at startup (a batch of blocks out and back,
timed on the device). Until a prefill step has been measured the rule
recomputes. ``"swap"`` swaps whenever the host tier has room and
``"recompute"`` never swaps; without a host tier every mode recomputes.
Sequences whose prompt is still being prefilled always recompute.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvforge.storage import KVCache

__all__ = ["PreemptionPolicy", "measure_tier_bandwidth"]

log = logging.getLogger(__name__)

#: weight of the newest measurement in the running mean of the prefill rate
EMA_WEIGHT = 0.2
#: prompt tokens a step computes for its rate to count as the prefill rate (fixed costs amortised)
LARGE_PROMPT_STEP = 512
#: recent large prompt steps whose highest rate is the prefill rate
RATE_WINDOW = 32


def measure_tier_bandwidth(cache: KVCache, num_blocks: int = 16) -> float:
    """Bytes per second of the host tier's copies, out and back, over ``num_blocks``
    blocks (fewer when the pools are smaller); 0.0 without a host tier."""
    storage = cache.host_storage
    if storage is None:
        return 0.0
    n = max(1, min(num_blocks, cache.capacity_blocks, storage.num_blocks, storage.staging_blocks))
    pairs = [(i, i) for i in range(n)]  # reads and writes back the same blocks: nothing changes
    storage.to_host(pairs)  # warm: allocates the first host chunk and the staging buffer
    cache.synchronize_tiers()
    if cache.device.type == "cuda":
        torch.cuda.synchronize(cache.device)
    start = time.perf_counter()
    storage.to_host(pairs)
    storage.to_device(pairs)
    cache.synchronize_tiers()
    if cache.device.type == "cuda":
        torch.cuda.synchronize(cache.device)
    seconds = time.perf_counter() - start
    return 2 * n * cache.config.bytes_per_block / max(seconds, 1e-9)


class PreemptionPolicy:
    """Decides swap or recompute for each preemption (see the module docstring)."""

    def __init__(self, mode: str, bytes_per_block: int, bandwidth: float) -> None:
        self.mode = mode
        self.bytes_per_block = bytes_per_block
        self.bandwidth = bandwidth  # bytes/s; 0: no host tier
        self._mean_rate = 0.0      # tokens/s of prompt steps, a running mean; 0: none yet
        self._large: deque[float] = deque(maxlen=RATE_WINDOW)  # tokens/s of recent large prompt steps

    @property
    def prefill_rate(self) -> float:
        """Prompt tokens per second (0.0: not measured yet); see the module docstring."""
        return max(self._large) if self._large else self._mean_rate

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step computed ``num_tokens`` prompt tokens (with its decodes) in ``seconds``."""
        if num_tokens <= 0 or seconds <= 0:
            return
        rate = num_tokens / seconds
        self._mean_rate = rate if not self._mean_rate else (1 - EMA_WEIGHT) * self._mean_rate + EMA_WEIGHT * rate
        if num_tokens >= LARGE_PROMPT_STEP:
            self._large.append(rate)

    def swap_seconds(self, num_blocks: int) -> float:
        """Modelled seconds to move ``num_blocks`` out and back."""
        return 2 * num_blocks * self.bytes_per_block / self.bandwidth if self.bandwidth else float("inf")

    def recompute_seconds(self, num_tokens: int) -> float:
        """Modelled seconds to prefill ``num_tokens`` again."""
        return num_tokens / self.prefill_rate if self.prefill_rate else 0.0

    def should_swap(self, num_tokens: int, num_blocks: int) -> bool:
        """Whether to swap a decoding sequence of ``num_tokens`` tokens in ``num_blocks`` blocks."""
        if self.mode == "recompute" or not self.bandwidth:
            return False
        if self.mode == "swap":
            return True
        return self.swap_seconds(num_blocks) < self.recompute_seconds(num_tokens)
