"""Built-in workloads: seeded generators of request lengths and arrivals.

:data:`BUILTIN_WORKLOADS` names them; :func:`make_workload` makes one,
deterministic in its seed (``docs/simulate.md`` describes each).
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import numpy as np

from kvforge.errors import ConfigError
from kvforge.tools.workload.request import Request, Workload

__all__ = ["BUILTIN_WORKLOADS", "make_workload", "MAX_REQUESTS", "MAX_RATE", "MIN_RATE"]

#: Most requests of a built-in workload (each is a Python object: 10**7 take gigabytes).
MAX_REQUESTS = 10**7
#: Highest and lowest mean arrival rate, in requests per decode step.
MAX_RATE = 1e6
MIN_RATE = 1e-6


def _lognormal(rng: np.random.Generator, mu: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    return np.clip(rng.lognormal(mu, sigma, n).astype(np.int64), lo, hi)


def _poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def _sharegpt(n: int, rng: np.random.Generator, rate: float) -> Workload:
    # lengths as /work/shared/bench/alloc_trace.py: lognormal means ~150 in, ~300 out
    # (ShareGPT in the vLLM paper: 161 in, 338 out); each sequence fits 2048 tokens.
    prompt = _lognormal(rng, 4.6, 0.9, n, 4, 2044)
    output = np.minimum(_lognormal(rng, 5.4, 0.8, n, 4, 2048), 2048 - prompt)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("sharegpt", tuple(reqs), 2048, 2048,
                    "ShareGPT-like chat: lognormal prompts (mean ~150) and outputs (mean ~300), Poisson arrivals")


def _shared_prefix(n: int, rng: np.random.Generator, rate: float) -> Workload:
    groups = 4
    sys_len = rng.integers(512, 1536, groups)
    pick = rng.choice(groups, n, p=np.array([0.4, 0.3, 0.2, 0.1]))
    user = _lognormal(rng, 4.3, 0.8, n, 4, 1024)
    output = _lognormal(rng, 4.8, 0.7, n, 4, 1024)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = []
    for i in range(n):
        g = int(pick[i])
        plen = int(sys_len[g] + user[i])
        reqs.append(Request(f"r{i}", i, float(arrival[i]), plen, int(output[i]),
                            prefix_group=f"system-{g}", prefix_len=int(sys_len[g])))
    return Workload("shared-prefix", tuple(reqs), 4096, 1024,
                    "4 long system prompts (512-1535 tokens) under short user turns")


def _long_context(n: int, rng: np.random.Generator, rate: float) -> Workload:
    prompt = _lognormal(rng, 9.0, 0.6, n, 2048, 30000)
    output = _lognormal(rng, 5.5, 0.6, n, 16, 2048)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("long-context", tuple(reqs), 32768, 2048,
                    "document QA: prompts 2k-30k tokens (median ~8k), outputs ~300")


def _bursty(n: int, rng: np.random.Generator, rate: float) -> Workload:
    prompt = _lognormal(rng, 4.6, 0.9, n, 4, 2044)
    output = np.minimum(_lognormal(rng, 5.4, 0.8, n, 4, 2048), 2048 - prompt)
    # bursts of ~400 steps' worth of arrivals at once (half to 1.5 times that),
    # then quiet until the mean rate catches up
    burst = max(1, int(round(rate * 400)))
    arrival = np.empty(n)
    t, i = 0.0, 0
    while i < n:
        k = min(n - i, int(rng.integers(burst // 2 + 1, burst + burst // 2 + 2)))
        arrival[i: i + k] = t
        i += k
        t += k / rate  # same mean rate as a Poisson stream
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("bursty", tuple(reqs), 2048, 2048,
                    "ShareGPT lengths arriving in bursts (hundreds at once, then quiet)")


class _Builtin(NamedTuple):
    make: Callable[[int, np.random.Generator, float], Workload]
    num_requests: int
    rate: float
    summary: str


#: Built-in workloads: name -> (generator, default request count, default arrivals per step, summary).
BUILTIN_WORKLOADS: dict[str, _Builtin] = {
    "sharegpt": _Builtin(_sharegpt, 1000, 0.5, "chat lengths like ShareGPT, Poisson arrivals"),
    "shared-prefix": _Builtin(_shared_prefix, 1000, 1.0, "a few long system prompts shared by many requests"),
    "long-context": _Builtin(_long_context, 100, 0.02, "prompts of 2k-30k tokens"),
    "bursty": _Builtin(_bursty, 1000, 0.5, "ShareGPT lengths arriving in bursts"),
}


def make_workload(name: str, num_requests: int | None = None, *, seed: int = 0,
                  rate: float | None = None) -> Workload:
    """A built-in workload (see :data:`BUILTIN_WORKLOADS`), deterministic in ``seed``.

    ``rate`` is the mean number of arrivals per decode step. Raises
    :class:`~kvforge.errors.ConfigError` naming the argument for an unknown
    name, ``num_requests`` outside [1, :data:`MAX_REQUESTS`], ``rate``
    outside [:data:`MIN_RATE`, :data:`MAX_RATE`] or not a number, a ``seed`` that is not an
    integer >= 0.
    """
    if name not in BUILTIN_WORKLOADS:
        raise ConfigError(f"unknown workload {name!r} (built-in: {', '.join(BUILTIN_WORKLOADS)})")
    spec = BUILTIN_WORKLOADS[name]
    n = spec.num_requests if num_requests is None else num_requests
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REQUESTS:
        raise ConfigError(f"num_requests must be an integer in [1, {MAX_REQUESTS:,}], got {num_requests!r:.40}")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, numbers.Real)):
        raise ConfigError(f"rate must be a number of arrivals per step, got {rate!r:.40}")
    r = spec.rate if rate is None else rate
    if not MIN_RATE <= r <= MAX_RATE:  # nan fails too
        raise ConfigError(f"rate must be a positive number of arrivals per step in [{MIN_RATE:g}, {MAX_RATE:g}], "
                          f"got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r:.40}")
    return spec.make(n, np.random.default_rng(int(seed)), float(r))
