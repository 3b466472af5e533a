"""The static comparison: every request reserves one contiguous range for its life.

A contiguous cache of ``num_blocks * block_size`` token slots, first fit,
under the same step model as the paged run. What a request reserves is the
config's ``static_reserve``: ``max_model_len`` tokens (``max-model-len``),
``prompt + max_output_len`` (``max-output``: the request's ``max_tokens``),
or exactly what it will use (``oracle``, a lower bound no real static cache
reaches). Idle time (nothing running or waiting) is jumped to the next
arrival, as in the paged run.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from kvforge.errors import ConfigError
from kvforge.tools.simulate.config import SimulationConfig
from kvforge.tools.simulate.records import StaticSummary, StaticTimeline, timeline_arrays, weighted_mean
from kvforge.tools.workload import Workload

__all__ = ["simulate_static"]


def _reservations(workload: Workload, mode: str) -> np.ndarray:
    if mode == "max-model-len":
        return np.full(len(workload), workload.max_model_len, dtype=np.int64)
    if mode == "oracle":
        return np.array([r.total_len for r in workload.requests], dtype=np.int64)
    return np.array([workload.max_reservation(r) for r in workload.requests], dtype=np.int64)


def simulate_static(workload: Workload, config: SimulationConfig) -> tuple[StaticSummary, StaticTimeline]:
    """The workload under a contiguous cache of ``num_blocks * block_size`` token slots in
    which each request reserves one range (first fit) for its life; same step model.

    Raises :class:`~kvforge.errors.ConfigError` when one reservation exceeds the cache.
    """
    cap = config.num_blocks * config.block_size
    reqs, n = workload.requests, len(workload)
    reserve = _reservations(workload, config.static_reserve)
    if reserve.max() > cap:
        raise ConfigError(f"a static cache of {cap} token slots cannot hold one reservation of "
                          f"{int(reserve.max())} tokens ({config.static_reserve})")
    prompt = np.array([r.prompt_len for r in reqs], dtype=np.int64)
    output = np.array([r.output_len for r in reqs], dtype=np.int64)
    ntok = np.zeros(n, dtype=np.int64)
    generated = np.zeros(n, dtype=np.int64)
    start_at = np.zeros(n, dtype=np.int64)
    first_admit = np.zeros(n, dtype=np.int64)
    holes: list[list[int]] = [[0, cap]]  # [start, length], sorted by start, never adjacent
    running: list[int] = []
    waiting: deque[int] = deque()
    samples: list[tuple[int, int, int, int]] = []
    sample_steps: list[int] = []  # steps each sample stands for (idle time jumped)
    t = nxt = finished = executed = 0
    reserved = 0
    while finished < n:
        while nxt < n and reqs[nxt].arrival <= t:
            waiting.append(nxt)
            nxt += 1
        idle = not running and not waiting
        if running:
            run = np.asarray(running, dtype=np.int64)
            ntok[run] += 1
            generated[run] += 1
        while waiting and len(running) < config.max_num_seqs:
            i = waiting[0]
            k = next((j for j, h in enumerate(holes) if h[1] >= reserve[i]), None)
            if k is None:
                break
            start_at[i] = holes[k][0]
            holes[k][0] += int(reserve[i])
            holes[k][1] -= int(reserve[i])
            if holes[k][1] == 0:
                del holes[k]
            waiting.popleft()
            running.append(i)
            reserved += int(reserve[i])
            ntok[i] = prompt[i]
            generated[i] = 1
            first_admit[i] = t
        run = np.asarray(running, dtype=np.int64)
        samples.append((t, reserved, int(ntok[run].sum()) if running else 0, len(running)))
        sample_steps.append(1)
        if running:
            done = generated[run] >= output[run]
            for i in run[done].tolist():
                _release(holes, int(start_at[i]), int(reserve[i]))
                reserved -= int(reserve[i])
                finished += 1
            running = run[~done].tolist()
        t += 1
        executed += 1
        if idle and nxt < n:  # an empty cache stays empty until the next arrival
            resume = max(t, math.ceil(reqs[nxt].arrival))
            sample_steps[-1] += resume - t
            t = resume
    arr, num_steps, expanded = timeline_arrays(samples, sample_steps, np.int64)
    tl = StaticTimeline(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], num_steps)
    total_reserved = int((tl.reserved_slots * num_steps).sum())
    waste = 1.0 - int((tl.live_slots * num_steps).sum()) / total_reserved if total_reserved else 0.0
    arrival = np.array([r.arrival for r in reqs])
    summary = StaticSummary(config.static_reserve, float(reserve.mean()), t, waste,
                            int(tl.reserved_slots.max()), int(tl.running.max()),
                            weighted_mean(tl.running, None if expanded else num_steps),
                            float(np.mean(first_admit - np.ceil(arrival))), executed)
    return summary, tl


def _release(holes: list[list[int]], start: int, length: int) -> None:
    """Return ``[start, start + length)`` to the sorted hole list, merging neighbours."""
    k = 0
    while k < len(holes) and holes[k][0] < start:
        k += 1
    holes.insert(k, [start, length])
    if k + 1 < len(holes) and start + length == holes[k + 1][0]:
        holes[k][1] += holes[k + 1][1]
        del holes[k + 1]
    if k > 0 and holes[k - 1][0] + holes[k - 1][1] == start:
        holes[k - 1][1] += holes[k][1]
        del holes[k]
