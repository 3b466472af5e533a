"""Replay a workload through kvforge's bookkeeping alone: no model, no device.

The step model (the same for the paged and the static cache, see
``docs/simulate.md``). At every decode step ``t``:

1. requests whose arrival is ``<= t`` join the waiting queue (FCFS);
2. decode: every running request reserves one slot (for the token it feeds
   back) and produces one output token. When the pool cannot give the blocks
   the batch needs, the most recently admitted request is preempted
   (*recompute*: its blocks are freed, it returns to the head of the queue
   keeping its output so far) until it can;
3. admission: waiting requests are admitted in order while their blocks fit
   and fewer than ``max_num_seqs`` run. Admission reserves the prompt (plus,
   after a preemption, the output so far) and produces one output token;
4. the state the forward pass of step ``t`` sees is sampled (memory, tokens,
   running and waiting requests);
5. requests that have produced ``output_len`` tokens are freed (a finished
   sequence held ``prompt_len + output_len - 1`` slots);
6. with the ``eager`` eviction policy, cached blocks nobody references are
   evicted; with ``lru`` (the pool's policy) they stay until space is needed;
   then external fragmentation is sampled;
7. when external fragmentation exceeds the threshold and memory efficiency
   is below 70% (``KVCache.should_compact()`` on the bookkeeping), the pool is
   compacted with :meth:`~kvforge.core.manager.BlockManager.plan_compaction`.

The static comparison runs the same workload through a contiguous cache of
the same number of token slots in which every request reserves one
contiguous range (first fit) for its whole life: ``max_model_len`` tokens
(``max-model-len``), ``prompt + max_output_len`` (``max-output``: the
request's ``max_tokens``), or exactly what it will use (``oracle``, a lower
bound no real static cache reaches).

Waste is reserved-but-unused token slots over reserved token slots, summed
over all steps (a time average weighted by reservation).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from kvforge.core.manager import BlockManager
from kvforge.config import CacheConfig, format_bytes, model_shape, parse_bytes
from kvforge.errors import ConfigError, KVForgeError
from kvforge.tools.plot import BlockMap, block_map_of
from kvforge.tools.workload import BUILTIN_WORKLOADS, Workload, load_trace, make_workload, synthetic_token_ids

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "PagedSummary",
    "StaticSummary",
    "Timeline",
    "StaticTimeline",
    "CompactionEvent",
    "MODEL_SHAPES",
    "EVICTION_POLICIES",
    "STATIC_RESERVE_MODES",
    "simulate",
    "simulate_static",
    "resolve_model",
    "register",
    "run",
]

log = logging.getLogger(__name__)

#: Memory efficiency below which compaction may run (ROCmForge's rule, as ``KVCache.should_compact``).
COMPACTION_EFFICIENCY_LIMIT = 0.7

#: ``lru``: cached blocks nobody references stay until space is needed, least recently
#: released first (the pool's policy). ``eager``: they are evicted at the end of every step.
EVICTION_POLICIES = ("lru", "eager")
STATIC_RESERVE_MODES = ("max-model-len", "max-output", "oracle")

#: Built-in model shapes (Hugging Face ``config.json`` fields) for ``--model NAME``.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": 8192},
    "llama-3-70b": {"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "hidden_size": 8192, "torch_dtype": "bfloat16", "max_position_embeddings": 8192},
    "llama-2-7b": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "hidden_size": 4096, "torch_dtype": "float16", "max_position_embeddings": 4096},
    "mistral-7b": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": 32768},
    "qwen2.5-7b": {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "hidden_size": 3584, "torch_dtype": "bfloat16", "max_position_embeddings": 32768},
}


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What the simulated cache looks like and how it is scheduled.

    ``bytes_per_token`` (0: unknown) only turns block counts into bytes in
    the report; ``model`` names where it came from.
    """

    block_size: int = 16
    num_blocks: int = 4096
    enable_prefix_caching: bool = True
    enable_compaction: bool = True
    compaction_threshold: float = 0.3
    eviction_policy: str = "lru"
    max_num_seqs: int = 256
    static_reserve: str = "max-model-len"
    bytes_per_token: int = 0
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        t = self.compaction_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"compaction_threshold must be a number in [0, 1], got {t!r}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(f"eviction_policy {self.eviction_policy!r} is not one of {EVICTION_POLICIES}")
        if self.static_reserve not in STATIC_RESERVE_MODES:
            raise ConfigError(f"static_reserve {self.static_reserve!r} is not one of {STATIC_RESERVE_MODES}")
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, int) \
                or self.bytes_per_token < 0:
            raise ConfigError(f"bytes_per_token must be an integer >= 0, got {self.bytes_per_token!r}")

    @classmethod
    def from_cache_config(cls, config: CacheConfig, **kwargs: Any) -> SimulationConfig:
        """The simulated twin of a cache config (block size, blocks, prefix caching, compaction)."""
        base = dict(block_size=config.block_size, num_blocks=config.num_blocks,
                    enable_prefix_caching=config.enable_prefix_caching,
                    enable_compaction=config.enable_compaction,
                    compaction_threshold=config.compaction_threshold,
                    bytes_per_token=config.bytes_per_token, model=config.name)
        base.update(kwargs)
        return cls(**base)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block (0 when ``bytes_per_token`` is unknown)."""
        return self.bytes_per_token * self.block_size


class Timeline(NamedTuple):
    """Per-step samples of the paged run (numpy arrays of equal length).

    ``external_fragmentation`` and ``trapped_blocks`` (free blocks below the
    highest block in use: what compaction would hand back) are sampled between
    steps, before any compaction; the rest during the step's forward pass.
    """

    step: np.ndarray
    held_blocks: np.ndarray
    evictable_blocks: np.ndarray
    live_slots: np.ndarray
    wasted_slots: np.ndarray
    external_fragmentation: np.ndarray
    trapped_blocks: np.ndarray
    running: np.ndarray
    waiting: np.ndarray


class StaticTimeline(NamedTuple):
    """Per-step samples of the static run."""

    step: np.ndarray
    reserved_slots: np.ndarray
    live_slots: np.ndarray
    running: np.ndarray


class CompactionEvent(NamedTuple):
    """One compaction of the simulated pool."""

    step: int
    blocks_moved: int
    fragmentation_before: float
    memory_efficiency_before: float


@dataclass(frozen=True, slots=True)
class PagedSummary:
    """Totals of the paged run. Ratios are fractions (0.02 = 2%)."""

    steps: int
    requests_finished: int
    wall_s: float
    steps_per_s: float
    block_ops: int
    block_ops_per_s: float
    peak_blocks: int
    peak_step: int
    peak_bytes: int
    mean_blocks: float
    waste: float
    internal_fragmentation_max: float
    external_fragmentation_mean: float
    external_fragmentation_max: float
    memory_efficiency_mean: float
    memory_efficiency_max: float
    preemptions: int
    prefix_hit_rate: float
    prefix_hit_tokens: int
    evictions: int
    compactions: int
    blocks_moved: int
    max_concurrency: int
    mean_concurrency: float
    mean_wait_steps: float


@dataclass(frozen=True, slots=True)
class StaticSummary:
    """Totals of the static (contiguous reservation) run."""

    reserve_mode: str
    mean_reservation: float
    steps: int
    waste: float
    peak_reserved_slots: int
    max_concurrency: int
    mean_concurrency: float
    mean_wait_steps: float


@dataclass(frozen=True)
class SimulationResult:
    """Everything one :func:`simulate` call measured."""

    workload_name: str
    num_requests: int
    mean_prompt_len: float
    mean_output_len: float
    max_model_len: int
    config: SimulationConfig
    paged: PagedSummary
    static: StaticSummary | None
    static_note: str
    timeline: Timeline
    static_timeline: StaticTimeline | None
    compactions: list[CompactionEvent]
    peak_map: BlockMap | None = field(default=None, repr=False)

    def to_dict(self, timeline_points: int = 0) -> dict[str, Any]:
        """Summaries and config as plain values (for ``--json``); with ``timeline_points``
        the paged time series too, every k-th step so that at most that many remain."""
        out = {
            "workload": {"name": self.workload_name, "num_requests": self.num_requests,
                         "mean_prompt_len": self.mean_prompt_len, "mean_output_len": self.mean_output_len,
                         "max_model_len": self.max_model_len},
            "config": asdict(self.config),
            "paged": asdict(self.paged),
            "static": asdict(self.static) if self.static is not None else None,
            "static_note": self.static_note,
            "compaction_events": [e._asdict() for e in self.compactions],
        }
        if timeline_points > 0:
            stride = max(1, -(-len(self.timeline.step) // timeline_points))
            out["timeline"] = {"stride": stride, **{k: v[::stride].tolist()
                                                    for k, v in self.timeline._asdict().items()}}
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """The summary table: (metric, paged, static)."""
        p, s, c = self.paged, self.static, self.config

        def mem(blocks: float) -> str:
            text = f"{blocks:,.0f} blocks"
            return text + (f" ({format_bytes(blocks * c.bytes_per_block)})" if c.bytes_per_block else "")

        def smem(slots: float) -> str:
            return mem(slots / c.block_size)

        na = "-"
        rows = [
            ("steps to drain", f"{p.steps:,}", f"{s.steps:,}" if s else na),
            ("max concurrency", str(p.max_concurrency), str(s.max_concurrency) if s else na),
            ("mean concurrency", f"{p.mean_concurrency:.1f}", f"{s.mean_concurrency:.1f}" if s else na),
            ("mean queue wait (steps)", f"{p.mean_wait_steps:.1f}", f"{s.mean_wait_steps:.1f}" if s else na),
            ("waste (reserved, unused)", f"{p.waste:.2%}", f"{s.waste:.2%}" if s else na),
            ("peak memory reserved", mem(p.peak_blocks), smem(s.peak_reserved_slots) if s else na),
            ("reservation per request", f"{c.block_size} tokens at a time",
             f"{s.mean_reservation:,.0f} tokens ({s.reserve_mode})" if s else na),
            ("internal fragmentation max", f"{p.internal_fragmentation_max:.2%}", na),
            ("external fragmentation mean/max",
             f"{p.external_fragmentation_mean:.1%} / {p.external_fragmentation_max:.1%}", na),
            ("memory efficiency mean/max", f"{p.memory_efficiency_mean:.1%} / {p.memory_efficiency_max:.1%}", na),
            ("preemptions (recompute)", f"{p.preemptions:,}", "0"),
            ("prefix hit rate", f"{p.prefix_hit_rate:.1%}" if c.enable_prefix_caching else "off", na),
            ("cached-block evictions", f"{p.evictions:,}", na),
            ("compactions / blocks moved", f"{p.compactions} / {p.blocks_moved:,}"
             if c.enable_compaction else "off", na),
            ("simulated steps/s", f"{p.steps_per_s:,.0f}", na),
            ("block-ops/s", f"{p.block_ops_per_s:,.0f} ({p.block_ops:,} ops)", na),
        ]
        return rows

    def report(self) -> str:
        """An aligned table of the summary (the CLI prints it)."""
        c = self.config
        head = (f"workload {self.workload_name}: {self.num_requests} requests, mean prompt "
                f"{self.mean_prompt_len:.0f}, mean output {self.mean_output_len:.0f} tokens, "
                f"max_model_len {self.max_model_len}\n"
                f"pool: {c.num_blocks:,} blocks x {c.block_size} tokens"
                + (f" = {format_bytes(c.num_blocks * c.bytes_per_block)} ({c.model})" if c.bytes_per_block else "")
                + f"; prefix caching {'on' if c.enable_prefix_caching else 'off'}, compaction "
                + (f"at {c.compaction_threshold:.0%}" if c.enable_compaction else "off")
                + f", eviction {c.eviction_policy}, max {c.max_num_seqs} seqs")
        rows = [("metric", "paged (kvforge)", "static (contiguous)")] + self.rows()
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head, ""]
        for i, r in enumerate(rows):
            lines.append(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
            if i == 0:
                lines.append(f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}")
        if self.static_note:
            lines.append(f"static: {self.static_note}")
        return "\n".join(lines)


# ------------------------------------------------------------------ paged run
class _PagedRun:
    """The paged simulation's state (one instance per :func:`simulate` call)."""

    def __init__(self, workload: Workload, config: SimulationConfig, check: bool = False) -> None:
        self.w, self.c, self.check = workload, config, check
        bs = config.block_size
        longest = max(r.total_len for r in workload.requests)
        if -(-longest // bs) > config.num_blocks:
            raise ConfigError(f"the longest request holds {longest} tokens ({-(-longest // bs)} blocks of {bs}); "
                              f"the pool has only {config.num_blocks} blocks")
        self.mgr = BlockManager(config.num_blocks, bs, enable_prefix_caching=config.enable_prefix_caching)
        reqs = workload.requests
        n = len(reqs)
        self.prompt = np.array([r.prompt_len for r in reqs], dtype=np.int64)
        self.output = np.array([r.output_len for r in reqs], dtype=np.int64)
        self.index = np.array([r.index for r in reqs], dtype=np.int64)
        self.ntok = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.first_admit = np.full(n, -1, dtype=np.int64)
        self.running: list[int] = []
        self.waiting: deque[int] = deque()
        self.preemptions = 0
        self.compactions: list[CompactionEvent] = []
        self.samples: list[list[float]] = []
        self.peak_blocks = -1
        self.peak_step = 0
        self.peak_map: BlockMap | None = None

    def _decode(self) -> None:
        if not self.running:
            return
        bs, pool = self.c.block_size, self.mgr.pool
        run = np.asarray(self.running, dtype=np.int64)
        need = int((self.ntok[run] % bs == 0).sum())
        while need > pool.num_available_blocks:
            victim = self.running.pop()  # the most recently admitted
            self.mgr.free_sequence(victim)
            need -= int(self.ntok[victim] % bs == 0)
            self.ntok[victim] = 0
            self.waiting.appendleft(victim)
            self.preemptions += 1
            log.debug("preempted request %s", self.w.requests[victim].request_id)
        if not self.running:
            return
        run = np.asarray(self.running, dtype=np.int64)
        ids = synthetic_token_ids(self.index[run], self.ntok[run]) if self.c.enable_prefix_caching else None
        self.mgr.append_tokens_batch(self.running, 1, ids)
        self.ntok[run] += 1
        self.generated[run] += 1

    def _admit(self, t: int) -> None:
        mgr, bs, reqs = self.mgr, self.c.block_size, self.w.requests
        while self.waiting and len(self.running) < self.c.max_num_seqs:
            i = self.waiting[0]
            r = reqs[i]
            length = int(self.prompt[i] + self.generated[i])
            tokens = r.token_ids(length) if self.c.enable_prefix_caching else None
            # a cache hit only lowers the need, so the hash lookup runs only when it matters
            if mgr.pool.num_available_blocks < -(-length // bs) and \
                    not mgr.can_add_sequence(length, tokens, r.salt):
                break
            if tokens is not None:
                mgr.add_sequence(i, tokens, r.salt)
            else:
                mgr.add_sequence(i, num_tokens=length)
            self.waiting.popleft()
            self.running.append(i)
            self.ntok[i] = length
            self.generated[i] += 1
            if self.first_admit[i] < 0:
                self.first_admit[i] = t

    def _wasted_slots(self) -> int:
        if not self.running:
            return 0
        run = np.asarray(self.running, dtype=np.int64)
        # only a sequence's last block can be partly filled, and it is never shared
        # (prefix hits are full blocks and the simulator does not fork)
        return int((-self.ntok[run] % self.c.block_size).sum())

    def _sample(self, t: int) -> None:
        pool, bs = self.mgr.pool, self.c.block_size
        held = pool.num_allocated_blocks
        wasted = self._wasted_slots()
        # external fragmentation is filled in between steps (see run())
        self.samples.append([t, held, pool.num_evictable_blocks, held * bs - wasted, wasted,
                             0.0, 0, len(self.running), len(self.waiting)])
        if self.check:
            self._check(held, wasted)
        if held > self.peak_blocks:
            self.peak_blocks, self.peak_step = held, t
            self.peak_map = block_map_of(self.mgr)

    def _check(self, held: int, wasted: int) -> None:
        """Cross-check the simulator's own accounting against the manager's (tests)."""
        mgr, bs = self.mgr, self.c.block_size
        mgr.check_invariants()
        assert sorted(mgr.seq_ids) == sorted(self.running), "running set differs from the manager's"
        for i in self.running:
            assert mgr.num_tokens(i) == self.ntok[i], f"request {i}: token count differs"
        reserved = held * bs
        expect = 1.0 - (reserved - wasted) / reserved if reserved else 0.0
        assert abs(mgr.internal_fragmentation() - expect) < 1e-9, "internal fragmentation differs"
        assert mgr.live_token_slots() == reserved - wasted, "live token slots differ"

    def _finish(self) -> int:
        if not self.running:
            return 0
        run = np.asarray(self.running, dtype=np.int64)
        done = self.generated[run] >= self.output[run]
        if not done.any():
            return 0
        for i in run[done].tolist():
            self.mgr.free_sequence(i)
        self.running = run[~done].tolist()
        return int(done.sum())

    def _maybe_compact(self, t: int, frag: float) -> None:
        pool = self.mgr.pool
        if not self.c.enable_compaction or frag <= self.c.compaction_threshold or frag == 0:
            return
        live = pool.num_allocated_blocks * self.c.block_size - self._wasted_slots()
        eff = live / (pool.capacity * self.c.block_size)
        if eff >= COMPACTION_EFFICIENCY_LIMIT:
            return
        start = time.perf_counter()
        plan = self.mgr.plan_compaction()  # live blocks first, cached ones packed above them
        self.mgr.apply_compaction(plan)
        pool.record_compaction(time.time() * 1e3, (time.perf_counter() - start) * 1e3, plan.num_moves, 0)
        self.compactions.append(CompactionEvent(t, plan.num_moves, frag, eff))

    def run(self, progress: Callable[[int, int], None] | None) -> int:
        reqs, n = self.w.requests, len(self.w.requests)
        t = nxt = finished = 0
        report_every = max(1, n // 200)
        last_report = 0
        while finished < n:
            while nxt < n and reqs[nxt].arrival <= t:
                self.waiting.append(nxt)
                nxt += 1
            self._decode()
            self._admit(t)
            self._sample(t)
            finished += self._finish()
            if self.c.eviction_policy == "eager":
                self.mgr.pool.reclaim_unused_blocks()
            # sampled between steps, before any compaction: the value the trigger sees
            pool = self.mgr.pool
            frag = pool.fragmentation_ratio()
            self.samples[-1][5] = frag
            self.samples[-1][6] = pool.high_water_mark() - pool.num_allocated_blocks - pool.num_evictable_blocks
            self._maybe_compact(t, frag)
            if progress is not None and finished - last_report >= report_every:
                progress(finished, n)
                last_report = finished
            t += 1
        if progress is not None:
            progress(finished, n)
        return t


# ----------------------------------------------------------------- static run
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
    t = nxt = finished = 0
    reserved = 0
    while finished < n:
        while nxt < n and reqs[nxt].arrival <= t:
            waiting.append(nxt)
            nxt += 1
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
        if running:
            done = generated[run] >= output[run]
            for i in run[done].tolist():
                _release(holes, int(start_at[i]), int(reserve[i]))
                reserved -= int(reserve[i])
                finished += 1
            running = run[~done].tolist()
        t += 1
    arr = np.array(samples, dtype=np.int64)
    tl = StaticTimeline(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
    total_reserved = int(tl.reserved_slots.sum())
    waste = 1.0 - int(tl.live_slots.sum()) / total_reserved if total_reserved else 0.0
    arrival = np.array([r.arrival for r in reqs])
    summary = StaticSummary(config.static_reserve, float(reserve.mean()), t, waste,
                            int(tl.reserved_slots.max()), int(tl.running.max()), float(tl.running.mean()),
                            float(np.mean(first_admit - np.ceil(arrival))))
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


# -------------------------------------------------------------------- driver
def simulate(workload: Workload, config: SimulationConfig | None = None, *,
             progress: Callable[[int, int], None] | None = None,
             static: bool = True, check: bool = False) -> SimulationResult:
    """Replay ``workload`` through a :class:`~kvforge.core.manager.BlockManager` and,
    with ``static``, through a contiguous max-length reservation for comparison.

    ``progress(finished, total)`` is called as requests finish. ``check``
    cross-checks the simulator's accounting against the block manager and
    runs its ``check_invariants()`` at every step (slow; for tests). Raises
    :class:`~kvforge.errors.ConfigError` when a request can never fit the pool.
    """
    config = config or SimulationConfig()
    sim = _PagedRun(workload, config, check)
    start = time.perf_counter()
    steps = sim.run(progress)
    wall = time.perf_counter() - start
    arr = np.array(sim.samples, dtype=np.float64)
    tl = Timeline(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64),
                  arr[:, 3].astype(np.int64), arr[:, 4].astype(np.int64), arr[:, 5],
                  arr[:, 6].astype(np.int64), arr[:, 7].astype(np.int64), arr[:, 8].astype(np.int64))
    pool, bs = sim.mgr.pool, config.block_size
    stats = pool.stats
    reserved = tl.held_blocks * bs
    total_reserved = int(reserved.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        internal = np.where(reserved > 0, tl.wasted_slots / np.maximum(reserved, 1), 0.0)
    efficiency = tl.live_slots / (pool.capacity * bs)
    prefix = sim.mgr.prefix.stats()
    ops = stats.total_allocations + stats.total_deallocations
    arrival = np.array([r.arrival for r in workload.requests])
    paged = PagedSummary(
        steps=steps, requests_finished=len(workload), wall_s=wall,
        steps_per_s=steps / wall if wall > 0 else float("inf"),
        block_ops=ops, block_ops_per_s=ops / wall if wall > 0 else float("inf"),
        peak_blocks=sim.peak_blocks, peak_step=sim.peak_step, peak_bytes=sim.peak_blocks * config.bytes_per_block,
        mean_blocks=float(tl.held_blocks.mean()),
        waste=1.0 - int(tl.live_slots.sum()) / total_reserved if total_reserved else 0.0,
        internal_fragmentation_max=float(internal.max()),
        external_fragmentation_mean=float(tl.external_fragmentation.mean()),
        external_fragmentation_max=float(tl.external_fragmentation.max()),
        memory_efficiency_mean=float(efficiency.mean()), memory_efficiency_max=float(efficiency.max()),
        preemptions=sim.preemptions, prefix_hit_rate=prefix.hit_rate, prefix_hit_tokens=prefix.hit_tokens,
        evictions=stats.num_evictions, compactions=len(sim.compactions),
        blocks_moved=sum(e.blocks_moved for e in sim.compactions),
        max_concurrency=int(tl.running.max()), mean_concurrency=float(tl.running.mean()),
        mean_wait_steps=float(np.mean(sim.first_admit - np.ceil(arrival))),
    )
    log.info("simulated %s: %d steps in %.2f s (%.0f steps/s, %.0f block-ops/s), waste %.2f%%",
             workload.name, steps, wall, paged.steps_per_s, paged.block_ops_per_s, 100 * paged.waste)
    st_summary, st_tl, note = None, None, ""
    if static:
        try:
            st_summary, st_tl = simulate_static(workload, config)
        except ConfigError as exc:
            note = str(exc)
    ws = workload.stats()
    return SimulationResult(workload.name, len(workload), ws.mean_prompt_len, ws.mean_output_len,
                            workload.max_model_len, config, paged, st_summary, note, tl, st_tl,
                            sim.compactions, sim.peak_map)


def resolve_model(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """A built-in shape name (:data:`MODEL_SHAPES`) or a Hugging Face config path ->
    (label, :func:`~kvforge.config.model_shape` dict)."""
    if name_or_path in MODEL_SHAPES:
        return name_or_path, model_shape(MODEL_SHAPES[name_or_path])
    try:
        return name_or_path, model_shape(name_or_path)
    except ConfigError as exc:
        raise ConfigError(f"--model {name_or_path!r} is neither a built-in shape "
                          f"({', '.join(MODEL_SHAPES)}) nor a Hugging Face config: {exc}") from None


# ------------------------------------------------------------------------ CLI
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an ``argparse`` subparsers object; its
    handler is :func:`run` (set as the ``func`` default)."""
    p = subparsers.add_parser(
        "simulate", help="replay a workload through the allocator (no model, no device)",
        description="Replay a request workload through kvforge's bookkeeping and compare it with a "
                    "contiguous max-length reservation. See docs/simulate.md.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=sorted(BUILTIN_WORKLOADS), default="sharegpt",
                     help="built-in workload (default: sharegpt)")
    src.add_argument("--trace", metavar="FILE.jsonl", help="replay a JSONL trace (format in docs/simulate.md)")
    p.add_argument("--requests", type=int, metavar="N", help="requests of a built-in workload")
    p.add_argument("--rate", type=float, metavar="R", help="mean arrivals per decode step (built-in workloads)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, metavar="N", help="blocks in the pool (default 4096)")
    size.add_argument("--vram", metavar="BYTES", help="KV memory budget, e.g. 16GiB (sized with --model)")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"model shape: {', '.join(MODEL_SHAPES)} or a Hugging Face config path (default llama-3-8b)")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prefix blocks (default on)")
    p.add_argument("--compaction", action=argparse.BooleanOptionalAction, default=True,
                   help="compact when fragmentation exceeds the threshold (default on)")
    p.add_argument("--compaction-threshold", type=float, default=0.3, metavar="F",
                   help="external fragmentation that triggers compaction (default 0.3)")
    p.add_argument("--eviction-policy", choices=EVICTION_POLICIES, default="lru",
                   help="lru: keep unreferenced cached blocks until space is needed; eager: drop them at once")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most running requests (default 256)")
    p.add_argument("--static-reserve", choices=STATIC_RESERVE_MODES, default="max-model-len",
                   help="what each request reserves in the static comparison (default max-model-len)")
    p.add_argument("--max-model-len", type=int, help="context limit of a trace (default: its longest request)")
    p.add_argument("--step-ms", type=float, default=20.0, help="ms per decode step for 'arrival_s' (default 20)")
    p.add_argument("--out", default="kvforge-simulate", metavar="DIR", help="where the PNG plots go")
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of a table (with a time series of <= 1000 points)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {done}/{total} requests "
                         f"{time.perf_counter() - self.start:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _config_from_args(args: argparse.Namespace) -> SimulationConfig:
    label, shape = resolve_model(args.model)
    probe = CacheConfig(block_size=args.block_size, num_blocks=1, num_layers=shape["num_layers"],
                        num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], dtype=shape["dtype"])
    if args.vram is not None:
        num_blocks = parse_bytes(args.vram) // probe.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(f"--vram {args.vram} holds no block of {format_bytes(probe.bytes_per_block)}")
    else:
        num_blocks = args.num_blocks if args.num_blocks is not None else 4096
    return SimulationConfig(
        block_size=args.block_size, num_blocks=num_blocks, enable_prefix_caching=args.prefix_caching,
        enable_compaction=args.compaction, compaction_threshold=args.compaction_threshold,
        eviction_policy=args.eviction_policy, max_num_seqs=args.max_num_seqs,
        static_reserve=args.static_reserve, bytes_per_token=probe.bytes_per_token, model=label)


def _check_out_dir(out: str) -> None:
    """Fail before simulating when ``--out`` cannot take the plots."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out!r}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r}: the folder is not writable")


def run(args: argparse.Namespace) -> int:
    """Run ``kvforge simulate``: print the table (or JSON) and the PNG paths; exit status."""
    try:
        config = _config_from_args(args)
        if not args.no_plots:
            _check_out_dir(args.out)
        if args.trace and (args.requests is not None or args.rate is not None):
            raise ConfigError("--requests and --rate apply to built-in workloads, not to --trace")
        if not args.trace and args.max_model_len is not None:
            raise ConfigError("--max-model-len applies to --trace (built-in workloads set their own)")
        if args.trace:
            workload = load_trace(args.trace, step_ms=args.step_ms, max_model_len=args.max_model_len)
        else:
            workload = make_workload(args.workload, args.requests, seed=args.seed, rate=args.rate)
        result = simulate(workload, config, progress=_Progress(f"simulate {workload.name}",
                                                               not args.no_progress and not args.json))
    except KVForgeError as exc:
        print(f"kvforge simulate: error: {exc}", file=sys.stderr)
        return 2
    paths: list[str] = []
    if not args.no_plots:
        try:
            from kvforge.tools.plot import plot_simulation
            paths = [str(p) for p in plot_simulation(result, args.out)]
        except ImportError as exc:
            print(f"kvforge simulate: no plots ({exc})", file=sys.stderr)
        except OSError as exc:
            print(f"kvforge simulate: error: cannot write plots to {args.out!r}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    if args.json:
        out = result.to_dict(timeline_points=1000)
        out["plots"] = paths
        print(json.dumps(out, indent=2))
    else:
        print(result.report())
        for path in paths:
            print(f"wrote {path}")
    return 0
