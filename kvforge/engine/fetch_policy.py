"""Whether a prompt's blocks come from the remote tier or are computed.

A prompt whose full blocks beyond its local (device and host) hits are in the
remote tier can have them fetched (``b`` bytes over the tier's read
bandwidth) or computed (``t`` tokens over the engine's prefill rate). Either
way the step loop waits for it: a fetch runs inside admission, a prefill
inside the step. Fetching pays only when it is the faster of the two, and on
a fast GPU it often is not: a TinyLlama-shaped model prefills about 60,000
tokens/s on an H200, 1.35 GB/s of KV, more than one Redis client connection
on loopback reads (about 1 GB/s). With ``EngineConfig.remote_fetch="auto"``
the engine fetches when ``b / read_bandwidth < t / prefill_rate``; both rates
are measured on this machine, the tier's over its recent fetches
(``RedisTier.read_bandwidth``) and the prefill rate over the engine's own
prompt steps (:class:`~kvforge.engine.preemption.PreemptionPolicy`),
seeded by :meth:`RemoteFetchPolicy.calibrate`, which the engine runs before
its first step: one prompt computed on the still empty cache (2,048 tokens
twice on a GPU, the first run compiling; 512 once on the CPU), so the first decisions do not rest on a compiling step, nor on the
small prompt steps a workload that fetches its prefixes leaves to compute
(their fixed costs make the rate look low and fetching look cheap). Until
both are known it fetches, and it fetches again once every
``probe_interval`` seconds even when computing looked faster, so a rate that
changed (a warmer server, a busier GPU) is seen. ``"always"`` fetches every
time (a tier without a ``read_bandwidth`` is always fetched from).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from kvforge.engine.preemption import LARGE_PROMPT_STEP, PreemptionPolicy

if TYPE_CHECKING:
    from kvforge.storage import KVCache, StepBatch

__all__ = ["RemoteFetchPolicy"]


class RemoteFetchPolicy:
    """``policy(num_tokens, num_bytes) -> bool``, the cache's ``remote_fetch_policy``
    (see the module docstring); counts its answers in ``num_fetched`` and ``num_declined``."""

    def __init__(self, mode: str, tier: Any, rates: PreemptionPolicy, probe_interval: float = 30.0) -> None:
        self.mode = mode
        self.tier = tier
        self.rates = rates
        self.probe_interval = probe_interval
        self.num_fetched = 0
        self.num_declined = 0
        #: whether :meth:`calibrate` ran (the engine runs it before its first step under ``"auto"``)
        self.calibrated = False
        self._last_fetch = time.monotonic()  # probing counts from here

    def calibrate(self, logits: Callable[[StepBatch], Any], cache: KVCache, max_tokens: int, vocab_size: int,
                  probe_tokens: int | None = None) -> float | None:
        """Measure the prefill rate once (see the module docstring) and record it with the
        rates; the tokens/s, or None when the cache cannot hold a prompt of
        :data:`~kvforge.engine.preemption.LARGE_PROMPT_STEP` tokens (nothing recorded).
        ``logits(batch)`` runs the model over a step (``ModelRunner.logits``). The probe has
        2,048 tokens and runs twice on a GPU (the first run compiles), and on the CPU
        :data:`~kvforge.engine.preemption.LARGE_PROMPT_STEP` tokens once (a large model's
        prompt is slow there). Its sequence is freed, unpublished, and registered nowhere."""
        self.calibrated = True
        gpu = cache.device.type == "cuda"
        bs = cache.config.block_size
        wanted = probe_tokens if probe_tokens is not None else (2048 if gpu else LARGE_PROMPT_STEP)
        n = min(wanted, max_tokens, (cache.num_available_blocks - 1) * bs)
        if n < LARGE_PROMPT_STEP:
            return None
        seq_id = ("kvforge-prefill-probe", id(self))
        ids = np.random.default_rng(0).integers(0, vocab_size, n)
        cache.add_sequence(seq_id)
        try:
            cache.append_tokens(seq_id, n)  # no token ids: nothing is registered for prefix reuse
            seconds = float("inf")
            for _ in range(2 if gpu else 1):
                start = time.perf_counter()
                with torch.inference_mode():
                    logits(cache.prepare_step([seq_id], [n], num_decodes=0, logits_indices=[n - 1], input_ids=ids))
                if gpu:
                    torch.cuda.synchronize(cache.device)
                seconds = min(seconds, time.perf_counter() - start)
        finally:
            cache.free_sequence(seq_id, publish=False)
        self.rates.record_prefill(n, seconds)
        return n / seconds

    def fetch_seconds(self, num_bytes: int) -> float | None:
        """Modelled seconds to fetch ``num_bytes`` (None: the tier's rate is unknown)."""
        bandwidth = getattr(self.tier, "read_bandwidth", None)
        return num_bytes / bandwidth if bandwidth else None

    def compute_seconds(self, num_tokens: int) -> float | None:
        """Modelled seconds to prefill ``num_tokens`` (None: not measured yet)."""
        rate = self.rates.prefill_rate
        return num_tokens / rate if rate else None

    def __call__(self, num_tokens: int, num_bytes: int) -> bool:
        now = time.monotonic()
        fetch, compute = self.fetch_seconds(num_bytes), self.compute_seconds(num_tokens)
        if (self.mode == "always" or fetch is None or compute is None or fetch < compute
                or now - self._last_fetch >= self.probe_interval):
            self.num_fetched += 1
            self._last_fetch = now
            return True
        self.num_declined += 1
        return False
