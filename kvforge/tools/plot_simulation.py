"""Figures of a simulation: memory over time and fragmentation (PNG files).

:func:`plot_simulation` writes both for a
:class:`~kvforge.tools.simulate.SimulationResult`; the block-map pictures are in
:mod:`kvforge.tools.plot`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvforge.tools.plot import _format_bytes, _mpl, _save, block_map

if TYPE_CHECKING:
    from kvforge.tools.simulate import SimulationResult

__all__ = ["fragmentation_figure", "memory_figure", "plot_simulation"]

# ------------------------------------------------------------ simulations
#: one colour per series of the simulation plots (colour-blind-safe Okabe-Ito hues)
_SERIES = {
    "paged_live": "#0072B2", "paged_reserved": "#0072B2", "paged_cached": "#56B4E9",
    "static_reserved": "#D55E00", "static_live": "#E69F00",
    "internal": "#E69F00", "efficiency": "#009E73", "external": "#7B3294", "free": "#999999",
    "threshold": "#444444", "compaction": "#000000", "host_used": "#CC79A7",
}


def _pool_label(cfg: Any) -> str:
    size = f"{cfg.num_blocks} blocks x {cfg.block_size} tokens"
    if cfg.bytes_per_token:
        size += f" = {_format_bytes(cfg.num_blocks * cfg.block_size * cfg.bytes_per_token)}"
    return size


def memory_figure(result: SimulationResult) -> Any:
    """The memory-over-time figure of a simulation (a matplotlib ``Figure``):
    paged live tokens, reserved blocks and cached blocks beside the static
    reservation, in % of the pool's token slots; with a host tier, a second
    panel below draws the host blocks in use, in % of the tier."""
    figure_cls, _ = _mpl()
    tl, st, cfg = result.timeline, result.static_timeline, result.config
    cap_tokens = cfg.num_blocks * cfg.block_size
    pct = 100 / cap_tokens
    bs = cfg.block_size
    if cfg.num_host_blocks:
        fig = figure_cls(figsize=(9.5, 7.6))
        ax, host_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0.1})
    else:
        fig = figure_cls(figsize=(9.5, 5.4))
        ax, host_ax = fig.add_subplot(1, 1, 1), None
    ax.fill_between(tl.step, 0, tl.live_slots * pct, color=_SERIES["paged_live"], alpha=0.25, linewidth=0,
                    label="paged: live tokens", step="post")
    ax.plot(tl.step, tl.held_blocks * bs * pct, color=_SERIES["paged_reserved"], lw=1.6,
            label="paged: reserved blocks", drawstyle="steps-post")
    ax.plot(tl.step, (tl.held_blocks + tl.evictable_blocks) * bs * pct, color=_SERIES["paged_cached"], lw=1.4,
            ls="--", label="paged: reserved + cached evictable blocks", drawstyle="steps-post")
    if st is not None and result.static is not None:
        ax.plot(st.step, st.reserved_slots * pct, color=_SERIES["static_reserved"], lw=1.6,
                label=f"static ({result.static.reserve_mode}): reserved", drawstyle="steps-post")
        ax.plot(st.step, st.live_slots * pct, color=_SERIES["static_live"], lw=1.2, ls="--",
                label="static: live tokens", drawstyle="steps-post")
    ax.set_ylabel(f"% of the pool's token slots\n({_pool_label(cfg)})")
    ax.set_ylim(0, 105)
    ax.set_xlim(left=0)
    ax.set_title(f"{result.workload_name}: memory over time (paged waste {result.paged.waste:.1%}"
                 + (f", static waste {result.static.waste:.1%}" if result.static is not None else "") + ")")
    ax.grid(alpha=0.3)
    if host_ax is None:
        ax.set_xlabel("decode step")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
        return fig
    p = result.paged
    size = f"{cfg.num_host_blocks} blocks"
    if cfg.bytes_per_block:
        size += f" = {_format_bytes(cfg.num_host_blocks * cfg.bytes_per_block)}"
    host_ax.plot(tl.step, tl.host_used_blocks / cfg.num_host_blocks * 100, color=_SERIES["host_used"], lw=1.5,
                 drawstyle="steps-post",
                 label=f"host tier: blocks in use ({p.spilled_blocks} spilled, {p.onboarded_blocks} onboarded, "
                       f"{p.dropped_host_blocks} dropped)")
    host_ax.set_ylabel(f"% of the host tier\n({size})")
    host_ax.set_ylim(0, 105)
    host_ax.set_xlabel("decode step")
    handles, labels = ax.get_legend_handles_labels()
    more = host_ax.get_legend_handles_labels()
    host_ax.legend(handles + more[0], labels + more[1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.38),
                   ncol=3, frameon=False)
    host_ax.grid(alpha=0.3)
    return fig


def fragmentation_figure(result: SimulationResult) -> Any:
    """The fragmentation figure of a simulation (a matplotlib ``Figure``): memory
    efficiency and internal fragmentation above; external fragmentation, the
    free share of the pool, the compaction threshold and the compactions below."""
    # Two panels: the external fragmentation ratio swings between 0 and 100%, which
    # would bury efficiency and internal fragmentation in one panel.
    figure_cls, _ = _mpl()
    tl, cfg = result.timeline, result.config
    bs = cfg.block_size
    fig = figure_cls(figsize=(9.5, 7.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"hspace": 0.12})
    reserved = np.maximum(tl.held_blocks * bs, 1)
    top.plot(tl.step, tl.live_slots / (cfg.num_blocks * bs) * 100, lw=1.5, color=_SERIES["efficiency"],
             label="memory efficiency (live tokens / pool)")
    top.plot(tl.step, np.where(tl.held_blocks > 0, tl.wasted_slots / reserved, 0) * 100, lw=1.5,
             color=_SERIES["internal"], label="internal fragmentation (empty slots / reserved slots)")
    top.set_ylabel("%")
    top.set_ylim(0, 105)
    top.set_title(f"{result.workload_name}: fragmentation and efficiency "
                  f"({result.paged.compactions} compactions, {result.paged.blocks_moved} blocks moved; "
                  f"pool {_pool_label(cfg)})", fontsize=10)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    # the ratio reads 100% when the few blocks left free sit below live ones: the
    # free share of the pool, drawn beside it, shows when that is a handful of blocks
    bottom.plot(tl.step, (cfg.num_blocks - tl.held_blocks) / cfg.num_blocks * 100, lw=1.4,
                color=_SERIES["free"], label="free blocks, cached evictable included (% of the pool)")
    bottom.plot(tl.step, tl.external_fragmentation * 100, lw=1.2, color=_SERIES["external"],
                label="external fragmentation (free blocks below a live one / free blocks)")
    bottom.axhline(cfg.compaction_threshold * 100, color=_SERIES["threshold"], lw=1.2, ls="--",
                   label=f"compaction threshold ({cfg.compaction_threshold:.0%})")
    if result.compactions:
        steps = [ev.step for ev in result.compactions]
        bottom.plot(steps, [2.0] * len(steps), "|", color=_SERIES["compaction"], ms=10, mew=1.5,
                    label="compaction")
    bottom.set_ylabel("%")
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("decode step")
    bottom.set_xlim(left=0)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


def plot_simulation(result: SimulationResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write a simulation's plots into ``out_dir``: memory over time, fragmentation
    and efficiency over time, and the block map at the peak. Returns the paths."""
    _mpl()  # before anything is drawn: a missing matplotlib names its extra
    out = Path(out_dir)
    name = result.workload_name.replace(os.sep, "_").replace(" ", "_")
    paths = [_save(memory_figure(result), out / f"{name}_memory.png"),
             _save(fragmentation_figure(result), out / f"{name}_fragmentation.png")]
    if result.peak_map is not None:
        paths.append(block_map(None, out / f"{name}_block_map_peak.png", snapshot=result.peak_map,
                               title=f"{result.workload_name}: block map at the peak (step {result.paged.peak_step})"))
    return paths
