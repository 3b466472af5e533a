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
prompt steps (:class:`~kvforge.engine.preemption.PreemptionPolicy`). Until
both are known it fetches, and it fetches again once every
``probe_interval`` seconds even when computing looked faster, so a rate that
changed (a warmer server, a busier GPU) is seen. ``"always"`` fetches every
time (a tier without a ``read_bandwidth`` is always fetched from).
"""
from __future__ import annotations

import time
from typing import Any

from kvforge.engine.preemption import PreemptionPolicy

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
        self._last_fetch = time.monotonic()  # probing counts from here

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
