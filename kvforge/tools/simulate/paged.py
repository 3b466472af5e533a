"""The paged replay: a workload through :class:`~kvforge.core.manager.BlockManager`.

One :class:`PagedRun` per replay holds the scheduler state (running and
waiting requests, their token counts) next to the block manager, and steps
them through the model of :mod:`kvforge.tools.simulate`: decode (preempting
the most recent request while the pool is short), admit, sample, finish,
evict (``eager``), then compact when :func:`~kvforge.core.compaction.should_compact`
(the cache's own trigger) says so. :func:`simulate_paged` runs one and sums it up.

With a host tier (``num_host_blocks``) the run plays the storage's part: it
hands the manager's queued spills over (:meth:`~kvforge.core.manager.BlockManager.flush_spills`)
after every allocating call, and its ``copy_to_host`` / ``copy_to_device``
callbacks copy nothing but count the blocks of each batch, which the copy-time
model prices. With ``preemption="swap"`` a victim is swapped out
(:meth:`~kvforge.core.manager.BlockManager.swap_out`) and, back at the head of
the queue, swapped in and decoded in the admission phase; when the host tier has
no room it is recomputed instead, and when nothing runs and the head cannot come
back, every swapped request waiting is dropped to recompute (its device blocks
may be what the head needs), so the run always drains.

Idle time is jumped, not stepped: after a step that began with nothing
running or waiting and changed nothing (no eviction, no compaction), every
step until the next arrival would repeat it, so the replay goes straight to
that arrival's step and the step's sample stands for all of them. A trace
whose one request arrives after a billion steps takes two steps of work.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Callable, NamedTuple

import numpy as np

from kvforge.core.compaction import should_compact
from kvforge.core.manager import BlockManager
from kvforge.errors import ConfigError, OutOfBlocksError
from kvforge.tools.plot import BlockMap, block_map_of
from kvforge.tools.simulate.config import SimulationConfig
from kvforge.tools.simulate.records import CompactionEvent, PagedSummary, Timeline, timeline_arrays, weighted_mean
from kvforge.tools.workload import Workload, synthetic_token_ids

__all__ = ["PagedRun", "PagedOutcome", "simulate_paged"]

log = logging.getLogger(__name__)


class PagedOutcome(NamedTuple):
    """What one paged replay measured."""

    summary: PagedSummary
    timeline: Timeline
    compactions: list[CompactionEvent]
    peak_map: BlockMap | None


class PagedRun:
    """The paged simulation's state: the block manager and the scheduler (one per replay)."""

    def __init__(self, workload: Workload, config: SimulationConfig, check: bool = False) -> None:
        self.w, self.c, self.check = workload, config, check
        bs = config.block_size
        longest = max(r.total_len for r in workload.requests)
        if -(-longest // bs) > config.num_blocks:
            raise ConfigError(f"the longest request holds {longest} tokens ({-(-longest // bs)} blocks of {bs}); "
                              f"the pool has only {config.num_blocks} blocks")
        self.mgr = BlockManager(config.num_blocks, bs, enable_prefix_caching=config.enable_prefix_caching,
                                num_host_blocks=config.num_host_blocks)
        self.tiered = config.num_host_blocks > 0
        self.swap = config.preemption == "swap"
        self.swap_preemptions = 0
        self.swap_drops = 0  # swapped requests dropped to recompute (nothing ran, the head could not return)
        self.copy_batches = 0
        self.step_to_host = self.step_to_device = 0  # blocks copied in the current step
        self.total_to_host = self.total_to_device = 0
        if self.tiered:
            self.mgr.copy_to_host = self._copied_to_host
            self.mgr.copy_to_device = self._copied_to_device
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
        self.sample_steps: list[int] = []  # how many steps each sample stands for (idle time jumped)
        self.steps_executed = 0
        self.peak_blocks = -1
        self.peak_step = 0
        self.peak_map: BlockMap | None = None

    # ------------------------------------------------------------ the storage's part
    def _copied_to_host(self, pairs: list[tuple[int, int]]) -> None:
        self.step_to_host += len(pairs)
        self.copy_batches += 1

    def _copied_to_device(self, pairs: list[tuple[int, int]]) -> None:
        self.step_to_device += len(pairs)
        self.copy_batches += 1

    def _flush(self) -> None:
        """Hand the queued spills over, as the storage does after every allocating call."""
        if self.tiered:
            self.mgr.flush_spills()

    # ------------------------------------------------------------ the step
    def _preempt(self, victim: int) -> None:
        if self.swap:
            try:
                self.mgr.swap_out([victim])
                self.swap_preemptions += 1
                return
            except OutOfBlocksError:  # no room on the host: recompute instead
                pass
        self.mgr.free_sequence(victim)
        self.ntok[victim] = 0

    def _decode(self) -> None:
        if not self.running:
            return
        bs, pool = self.c.block_size, self.mgr.pool
        run = np.asarray(self.running, dtype=np.int64)
        need = int((self.ntok[run] % bs == 0).sum())
        while need > pool.num_available_blocks:
            victim = self.running.pop()  # the most recently admitted
            need -= int(self.ntok[victim] % bs == 0)
            self._preempt(victim)
            self.waiting.appendleft(victim)
            self.preemptions += 1
            log.debug("preempted request %s", self.w.requests[victim].request_id)
        if not self.running:
            return
        self._append(self.running)

    def _append(self, seqs: list[int]) -> None:
        """Every one of ``seqs`` feeds its last token back and produces one."""
        run = np.asarray(seqs, dtype=np.int64)
        ids = synthetic_token_ids(self.index[run], self.ntok[run]) if self.c.enable_prefix_caching else None
        self.mgr.append_tokens_batch(seqs, 1, ids)
        self._flush()
        self.ntok[run] += 1
        self.generated[run] += 1

    def _swap_in(self, i: int) -> bool:
        """Bring the swapped request ``i`` back and decode it; False when it does not fit."""
        mgr = self.mgr
        need = mgr.num_blocks_to_swap_in([i]) + int(self.ntok[i] % self.c.block_size == 0)
        if need > mgr.pool.num_available_blocks:
            if not self.running:  # nothing will free blocks: what swapped requests hold is recomputed
                self._unswap_waiting()
            return False
        mgr.swap_in([i])
        self._flush()
        self._append([i])
        return True

    def _unswap_waiting(self) -> None:
        for j in self.waiting:
            if self.mgr.is_swapped(j):
                self.mgr.free_sequence(j)
                self.ntok[j] = 0
                self.swap_drops += 1

    def _admit(self, t: int) -> None:
        mgr, bs, reqs = self.mgr, self.c.block_size, self.w.requests
        while self.waiting and len(self.running) < self.c.max_num_seqs:
            i = self.waiting[0]
            if self.swap and mgr.host.swapped and mgr.is_swapped(i):
                if not self._swap_in(i):
                    if mgr.is_swapped(i):
                        break
                    continue  # dropped to recompute: admitted as a new request
                self.waiting.popleft()
                self.running.append(i)
                continue
            r = reqs[i]
            length = int(self.prompt[i] + self.generated[i])
            tokens = r.token_ids(length) if self.c.enable_prefix_caching else None
            # a cache hit only lowers the need, so the hash lookup runs only when it matters
            if mgr.pool.num_available_blocks < -(-length // bs) and \
                    not mgr.can_add_sequence(length, tokens, r.salt):
                if self.swap and not self.running and mgr.host.swapped:
                    self._unswap_waiting()  # their device blocks may be what this request needs
                    continue
                break
            if tokens is not None:
                mgr.add_sequence(i, tokens, r.salt)
            else:
                mgr.add_sequence(i, num_tokens=length)
            self._flush()
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
                             0.0, 0, len(self.running), len(self.waiting), self.mgr.host.num_used_blocks(),
                             0, 0, 0.0])
        self.sample_steps.append(1)
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
        assert sorted(mgr.swapped_seq_ids) == sorted(i for i in self.waiting if mgr.is_swapped(i)), \
            "swapped set differs from the manager's"
        assert mgr.host.num_used_blocks() <= self.c.num_host_blocks, "host tier over its blocks"
        if any(rec.device_blocks() for rec in mgr.host.swapped.values()):
            return  # a swapped request's device blocks are held, not in the manager's live rows
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
        if not self.c.enable_compaction:
            return
        live = pool.num_allocated_blocks * self.c.block_size - self._wasted_slots()
        eff = live / (pool.capacity * self.c.block_size)
        # the cache's trigger; the simulated pool has no chunks to release
        if not should_compact(frag, eff, self.c.compaction_threshold):
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
            idle = not self.running and not self.waiting
            num_compactions = len(self.compactions)
            evicted = 0
            self._decode()
            self._admit(t)
            self._sample(t)
            finished += self._finish()
            if self.c.eviction_policy == "eager":
                evicted = self.mgr.pool.reclaim_unused_blocks()
                self._flush()
            # sampled between steps, before any compaction: the value the trigger sees
            pool = self.mgr.pool
            frag = pool.fragmentation_ratio()
            self.samples[-1][5] = frag
            self.samples[-1][6] = pool.high_water_mark() - pool.num_allocated_blocks - pool.num_evictable_blocks
            self._maybe_compact(t, frag)
            self._flush()
            if self.step_to_host or self.step_to_device:
                sample = self.samples[-1]
                sample[10], sample[11] = self.step_to_host, self.step_to_device
                sample[12] = (self.step_to_host + self.step_to_device) * self.c.copy_s_per_block
                self.total_to_host += self.step_to_host
                self.total_to_device += self.step_to_device
                self.step_to_host = self.step_to_device = 0
            self.steps_executed += 1
            if progress is not None and finished - last_report >= report_every:
                progress(finished, n)
                last_report = finished
            t += 1
            if idle and not evicted and len(self.compactions) == num_compactions and nxt < n:
                # the step found nothing to do and changed nothing: so would every step
                # before the next arrival; this step's sample stands for them all
                resume = max(t, math.ceil(reqs[nxt].arrival))
                self.sample_steps[-1] += resume - t
                t = resume
        if progress is not None:
            progress(finished, n)
        return t


def simulate_paged(workload: Workload, config: SimulationConfig, *,
                   progress: Callable[[int, int], None] | None = None, check: bool = False) -> PagedOutcome:
    """Replay ``workload`` through a block manager; ``progress(finished, total)`` as
    requests finish; ``check`` cross-checks the accounting at every step (tests).

    Raises :class:`~kvforge.errors.ConfigError` when a request can never fit the pool."""
    sim = PagedRun(workload, config, check)
    start = time.perf_counter()
    steps = sim.run(progress)
    wall = time.perf_counter() - start
    arr, num_steps, expanded = timeline_arrays(sim.samples, sim.sample_steps, np.float64)
    tl = Timeline(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64),
                  arr[:, 3].astype(np.int64), arr[:, 4].astype(np.int64), arr[:, 5],
                  arr[:, 6].astype(np.int64), arr[:, 7].astype(np.int64), arr[:, 8].astype(np.int64),
                  arr[:, 9].astype(np.int64), arr[:, 10].astype(np.int64), arr[:, 11].astype(np.int64), arr[:, 12],
                  num_steps)
    w = None if expanded else num_steps  # weights of the means over steps
    pool, bs = sim.mgr.pool, config.block_size
    stats = pool.stats
    reserved = tl.held_blocks * bs
    total_reserved = int((reserved * num_steps).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        internal = np.where(reserved > 0, tl.wasted_slots / np.maximum(reserved, 1), 0.0)
    efficiency = tl.live_slots / (pool.capacity * bs)
    prefix = sim.mgr.prefix.stats()
    host = sim.mgr.host.stats()
    query = prefix.query_tokens
    bpb = config.bytes_per_block
    ops = stats.total_allocations + stats.total_deallocations
    arrival = np.array([r.arrival for r in workload.requests])
    executed = sim.steps_executed
    paged = PagedSummary(
        steps=steps, requests_finished=len(workload), wall_s=wall,
        steps_per_s=executed / wall if wall > 0 else float("inf"),
        block_ops=ops, block_ops_per_s=ops / wall if wall > 0 else float("inf"),
        peak_blocks=sim.peak_blocks, peak_step=sim.peak_step, peak_bytes=sim.peak_blocks * config.bytes_per_block,
        mean_blocks=weighted_mean(tl.held_blocks, w),
        waste=1.0 - int((tl.live_slots * num_steps).sum()) / total_reserved if total_reserved else 0.0,
        internal_fragmentation_max=float(internal.max()),
        external_fragmentation_mean=weighted_mean(tl.external_fragmentation, w),
        external_fragmentation_max=float(tl.external_fragmentation.max()),
        memory_efficiency_mean=weighted_mean(efficiency, w), memory_efficiency_max=float(efficiency.max()),
        preemptions=sim.preemptions, prefix_hit_rate=prefix.hit_rate, prefix_hit_tokens=prefix.hit_tokens,
        evictions=stats.num_evictions, compactions=len(sim.compactions),
        blocks_moved=sum(e.blocks_moved for e in sim.compactions),
        max_concurrency=int(tl.running.max()), mean_concurrency=weighted_mean(tl.running, w),
        mean_wait_steps=float(np.mean(sim.first_admit - np.ceil(arrival))),
        steps_executed=executed,
        device_hit_tokens=prefix.hit_tokens - prefix.host_hit_tokens, host_hit_tokens=prefix.host_hit_tokens,
        device_hit_rate=(prefix.hit_tokens - prefix.host_hit_tokens) / query if query else 0.0,
        host_hit_rate=prefix.host_hit_tokens / query if query else 0.0,
        host_peak_blocks=int(tl.host_used_blocks.max()), host_mean_blocks=weighted_mean(tl.host_used_blocks, w),
        spilled_blocks=host.spilled_blocks, spill_reuses=host.spill_reuses, onboarded_blocks=host.onboarded_blocks,
        dropped_host_blocks=host.dropped_blocks, swapped_out_blocks=host.swapped_out_blocks,
        swapped_in_blocks=host.swapped_in_blocks, swap_preemptions=sim.swap_preemptions,
        swap_drops=sim.swap_drops,
        bytes_to_host=sim.total_to_host * bpb, bytes_to_device=sim.total_to_device * bpb,
        copy_batches=sim.copy_batches, copy_s=(sim.total_to_host + sim.total_to_device) * config.copy_s_per_block,
        copy_s_per_step_mean=weighted_mean(tl.copy_s, w), copy_s_per_step_max=float(tl.copy_s.max()),
    )
    log.info("simulated %s: %d steps (%d run, idle time jumped) in %.2f s (%.0f steps/s, %.0f block-ops/s), "
             "waste %.2f%%", workload.name, steps, executed, wall, paged.steps_per_s, paged.block_ops_per_s,
             100 * paged.waste)
    return PagedOutcome(paged, tl, sim.compactions, sim.peak_map)
