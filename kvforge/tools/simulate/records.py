"""What a simulation measured: per-step timelines, run summaries, the result.

:class:`SimulationResult` is what :func:`~kvforge.tools.simulate.simulate`
returns; its :meth:`~SimulationResult.report` is the table ``kvforge
simulate`` prints and :meth:`~SimulationResult.to_dict` its ``--json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from kvforge.config import format_bytes
from kvforge.tools.output import format_table
from kvforge.tools.plot import BlockMap
from kvforge.tools.simulate.config import SimulationConfig

__all__ = ["Timeline", "StaticTimeline", "CompactionEvent", "PagedSummary", "StaticSummary", "SimulationResult",
           "REPORT_HEADERS", "MAX_TIMELINE_STEPS", "timeline_arrays", "weighted_mean"]

#: the columns of :meth:`SimulationResult.report` (metric names left, values right)
REPORT_HEADERS = ("metric", "paged (kvforge)", "static (contiguous)")

#: Runs of at most this many steps get one timeline sample per step; longer runs keep
#: one sample per step executed, an idle stretch jumped over being one sample.
MAX_TIMELINE_STEPS = 1_000_000


class Timeline(NamedTuple):
    """Per-step samples of the paged run (numpy arrays of equal length).

    ``external_fragmentation`` and ``trapped_blocks`` (free blocks below the
    highest block in use: what compaction would hand back) are sampled between
    steps, before any compaction; the rest during the step's forward pass.

    The simulator jumps over idle time (nothing running, nothing waiting, no
    arrival) instead of stepping through it. A run of at most
    :data:`MAX_TIMELINE_STEPS` steps still has one sample per step
    (``step`` is ``0, 1, 2, ...`` and ``num_steps`` all ones); in a longer run an
    idle stretch is one sample at its first step whose ``num_steps`` is the
    stretch's length (so the samples hold until the next ``step``, and every
    mean over steps is weighted by ``num_steps``).

    The host tier's columns (zeros without one): ``host_used_blocks``, host
    blocks holding data (cached or swapped) during the forward pass;
    ``blocks_to_host`` / ``blocks_to_device``, blocks copied in the step
    (spills and swap-outs / onboarded prefix hits and swap-ins); ``copy_s``,
    the step's modelled copy time (see :class:`~kvforge.tools.simulate.SimulationConfig`).
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
    host_used_blocks: np.ndarray
    blocks_to_host: np.ndarray
    blocks_to_device: np.ndarray
    copy_s: np.ndarray
    num_steps: np.ndarray


class StaticTimeline(NamedTuple):
    """Per-step samples of the static run (``num_steps`` as in :class:`Timeline`)."""

    step: np.ndarray
    reserved_slots: np.ndarray
    live_slots: np.ndarray
    running: np.ndarray
    num_steps: np.ndarray


def timeline_arrays(samples: list, num_steps: list[int], dtype: type) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(rows, num_steps, expanded)`` of a run's samples (column 0 the step), each
    standing for ``num_steps`` steps: one row per step when the run has at most
    :data:`MAX_TIMELINE_STEPS` steps (``expanded``), else as given."""
    arr = np.array(samples, dtype=dtype)
    weights = np.array(num_steps, dtype=np.int64)
    total = int(weights.sum())
    if total > MAX_TIMELINE_STEPS or (weights == 1).all():
        return arr, weights, total <= MAX_TIMELINE_STEPS
    arr = np.repeat(arr, weights, axis=0)
    arr[:, 0] = np.arange(total)
    return arr, np.ones(total, dtype=np.int64), True


def weighted_mean(values: np.ndarray, num_steps: np.ndarray | None) -> float:
    """Mean over steps of per-sample ``values`` (``num_steps`` None: one step each)."""
    if num_steps is None:
        return float(values.mean())
    return float(np.average(values, weights=num_steps))


class CompactionEvent(NamedTuple):
    """One compaction of the simulated pool."""

    step: int
    blocks_moved: int
    fragmentation_before: float
    memory_efficiency_before: float


@dataclass(frozen=True, slots=True)
class PagedSummary:
    """Totals of the paged run. Ratios are fractions (0.02 = 2%).

    ``prefix_hit_rate`` / ``prefix_hit_tokens`` count hits on both tiers; the
    ``device_`` and ``host_`` ones split them (their rates add up to the total).
    The host-tier fields are zeros without a host tier: ``spilled_blocks``
    (device evictions copied to the host), ``spill_reuses`` (evictions whose
    host copy existed), ``onboarded_blocks`` (host prefix hits copied back),
    ``dropped_host_blocks`` (host blocks dropped when the tier was full),
    ``swapped_out_blocks`` / ``swapped_in_blocks`` (swap preemption),
    ``swap_preemptions`` (preemptions that swapped the request out; the rest of
    ``preemptions`` recomputed it), ``swap_drops`` (swapped requests recomputed
    after all: nothing ran and the queue's head could not come back), ``bytes_to_host`` / ``bytes_to_device`` (what the copies moved),
    ``copy_batches`` (copy calls), ``copy_s`` (their modelled time, in all) and
    its mean and max over steps."""

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
    steps_executed: int
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    device_hit_rate: float = 0.0
    host_hit_rate: float = 0.0
    host_peak_blocks: int = 0
    host_mean_blocks: float = 0.0
    spilled_blocks: int = 0
    spill_reuses: int = 0
    onboarded_blocks: int = 0
    dropped_host_blocks: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_preemptions: int = 0
    swap_drops: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    copy_batches: int = 0
    copy_s: float = 0.0
    copy_s_per_step_mean: float = 0.0
    copy_s_per_step_max: float = 0.0


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
    steps_executed: int


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
        the paged time series too, every k-th sample so that at most that many remain
        (``num_steps``: the steps each sample stands for, see :class:`Timeline`)."""
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
            *self._preemption_rows(),
            ("prefix hit rate", f"{p.prefix_hit_rate:.1%}" if c.enable_prefix_caching else "off", na),
            *self._host_rows(),
            ("cached-block evictions", f"{p.evictions:,}", na),
            ("compactions / blocks moved", f"{p.compactions} / {p.blocks_moved:,}"
             if c.enable_compaction else "off", na),
            ("steps run (idle time jumped)", f"{p.steps_executed:,}", f"{s.steps_executed:,}" if s else na),
            ("simulated steps/s", f"{p.steps_per_s:,.0f}", na),
            ("block-ops/s", f"{p.block_ops_per_s:,.0f} ({p.block_ops:,} ops)", na),
        ]
        return rows

    def _preemption_rows(self) -> list[tuple[str, str, str]]:
        p = self.paged
        if self.config.preemption == "recompute":
            return [("preemptions (recompute)", f"{p.preemptions:,}", "0")]
        drops = f" ({p.swap_drops:,} swapped, then recomputed)" if p.swap_drops else ""
        return [("preemptions (swap / recompute)",
                 f"{p.swap_preemptions:,} / {p.preemptions - p.swap_preemptions:,}{drops}", "0")]

    def _host_rows(self) -> list[tuple[str, str, str]]:
        """The host tier's rows (none without one)."""
        p, c, na = self.paged, self.config, "-"
        if not c.num_host_blocks:
            return []
        bpb = c.bytes_per_block

        def blocks(n: float) -> str:
            return f"{n:,.0f}" + (f" ({format_bytes(n * bpb)})" if bpb else "")

        def ms(seconds: float) -> str:
            return f"{seconds * 1e3:,.3f} ms" if bpb else "-"

        rows = []
        if c.enable_prefix_caching:
            rows.append(("prefix hits device / host", f"{p.device_hit_rate:.1%} / {p.host_hit_rate:.1%}", na))
        rows += [
            ("host blocks used peak/mean", f"{blocks(p.host_peak_blocks)} / {p.host_mean_blocks:,.0f}", na),
            ("spills / onboards (blocks)", f"{p.spilled_blocks:,} / {p.onboarded_blocks:,}", na),
            ("host blocks dropped", f"{p.dropped_host_blocks:,}", na),
        ]
        if c.preemption == "swap":
            rows.append(("swapped out / in (blocks)", f"{p.swapped_out_blocks:,} / {p.swapped_in_blocks:,}", na))
        rows += [
            ("moved to host / device", f"{format_bytes(p.bytes_to_host)} / {format_bytes(p.bytes_to_device)}"
             if bpb else "-", na),
            ("modelled copy time", f"{p.copy_s:,.3f} s in {p.copy_batches:,} batches" if bpb else "-", na),
            ("copy time per step mean/max", f"{ms(p.copy_s_per_step_mean)} / {ms(p.copy_s_per_step_max)}"
             if bpb else "-", na),
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
                + f", eviction {c.eviction_policy}, max {c.max_num_seqs} seqs"
                + (f"\nhost tier: {c.num_host_blocks:,} blocks"
                   + (f" = {format_bytes(c.num_host_blocks * c.bytes_per_block)}" if c.bytes_per_block else "")
                   + f", copies at {c.host_bandwidth / 1e9:g} GB/s, preemption {c.preemption}"
                   if c.num_host_blocks else ""))
        table = format_table(REPORT_HEADERS, self.rows(), align="lrr")
        lines = [head, "", table]
        if self.static_note:
            lines.append(f"static: {self.static_note}")
        return "\n".join(lines)
