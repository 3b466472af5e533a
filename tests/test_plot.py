"""Block maps, compaction before/after pictures and simulation plots are written as PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from kvforge import BlockManager, CacheConfig, KVCache  # noqa: E402
from kvforge.tools import plot  # noqa: E402
from kvforge.tools.plot import (  # noqa: E402
    CACHED,
    FREE,
    SHARED,
    UNBACKED,
    block_map,
    block_map_of,
    compaction_maps,
    fragmentation_figure,
    memory_figure,
    plot_simulation,
)
from kvforge.tools.simulate import SimulationConfig, simulate  # noqa: E402
from kvforge.tools.workload import make_workload  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path, min_bytes: int = 5000) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == PNG and len(data) >= min_bytes


def _fragmented_cache() -> KVCache:
    cfg = CacheConfig(block_size=8, num_blocks=64, num_layers=1, num_kv_heads=1, head_dim=16, device="cpu",
                      enable_compaction=True, chunk_blocks=8)
    cache = KVCache(cfg)
    for i in range(12):
        cache.add_sequence(i, list(range(100 * i, 100 * i + 20)))  # 3 blocks each, tail holds 4 tokens
    for i in range(0, 12, 2):
        cache.free_sequence(i)
    cache.reclaim_unused_blocks()  # cached prompt blocks back to the free list: holes below live blocks
    for c in cache.chunks:
        c.normal_()
    return cache


def test_block_map_of_states_and_fill():
    m = BlockManager(num_blocks=12, block_size=4)
    m.add_sequence("a", list(range(10)))       # blocks 0, 1 full and cached; 2 holds 2 tokens
    m.add_sequence("b", list(range(10)))       # shares 0, 1; own tail 3
    m.add_sequence("c", list(range(50, 59)))   # 4, 5 (cached), 6
    m.free_sequence("c")                       # 4, 5 evictable; 6 free
    bm = block_map_of(m)
    assert bm.states[:4].tolist() == [SHARED, SHARED, 0, 1]
    assert bm.states[4:7].tolist() == [CACHED, CACHED, FREE]
    assert bm.fill[:4].tolist() == [4, 4, 2, 2]
    assert bm.owners == ("a", "b")
    assert bm.counts() == {"owned": 2, "shared": 2, "cached": 2, "free": 6, "unbacked": 0}


def test_block_map_png_for_a_cache_and_a_manager(tmp_path):
    cache = _fragmented_cache()
    p1 = block_map(cache, tmp_path / "cache.png")
    m = BlockManager(num_blocks=40, block_size=8)
    for i in range(5):
        m.add_sequence(i, num_tokens=13 * (i + 1))
    p2 = block_map(m, tmp_path / "sub" / "manager.png")
    assert _is_png(p1) and _is_png(p2)
    with pytest.raises(TypeError):
        block_map(object(), tmp_path / "x.png")


def test_compaction_maps_before_and_after(tmp_path):
    cache = _fragmented_cache()
    assert cache.should_compact()
    held = len(cache.manager.held_blocks())
    keys = {s: cache.gather(s, 0)[0].clone() for s in cache.seq_ids}
    r = compaction_maps(cache, tmp_path / "compact")
    assert all(_is_png(p) for p in (r.before, r.after, r.combined))
    assert r.before.name == "compact_before.png" and r.combined.name == "compact.png"
    assert r.blocks_moved > 0 and r.bytes_returned > 0
    assert r.before_map.external_fragmentation > 0.3 and r.after_map.external_fragmentation == 0
    after = r.after_map.states
    assert (after[:held] != FREE).all() and (after[held:] < 0).all() and (after == UNBACKED).any()
    for s, k in keys.items():  # the data moved with the blocks
        assert (cache.gather(s, 0)[0] == k).all()
    cache.check_invariants()


def test_compaction_maps_on_a_manager_and_with_a_custom_step(tmp_path):
    m = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    for i in range(6):
        m.add_sequence(i, num_tokens=8)
    for i in (0, 2, 4):
        m.free_sequence(i)
    r = compaction_maps(m, tmp_path / "mgr")
    # held: 2, 3, 6, 7, 10, 11 -> the four at or above 6 move into 0, 1, 4, 5
    assert r.blocks_moved == 4 and r.bytes_returned == 0
    assert sorted(m.held_blocks()) == list(range(6))
    m.check_invariants()
    calls = []
    r2 = compaction_maps(m, tmp_path / "noop", compact=lambda t: calls.append(t))
    assert calls == [m] and r2.blocks_moved == 0


def test_simulation_plots(tmp_path):
    w = make_workload("bursty", 40, seed=1, rate=2.0)
    result = simulate(w, SimulationConfig(num_blocks=300, bytes_per_token=1024, model="toy"))
    paths = plot_simulation(result, tmp_path)
    assert [p.name for p in paths] == ["bursty_memory.png", "bursty_fragmentation.png",
                                       "bursty_block_map_peak.png"]
    assert all(_is_png(p, 10000) for p in paths)
    peak = result.peak_map
    assert peak is not None and int(np.sum(peak.states >= 0) + np.sum(peak.states == SHARED)) \
        == result.paged.peak_blocks


def test_simulation_plots_of_a_jumped_idle_stretch(tmp_path):
    from kvforge.tools.workload import parse_trace_lines

    # too long to expand: the idle stretch is one sample the plots hold until the next step
    w = parse_trace_lines(['{"arrival": 0, "prompt_len": 40, "output_len": 20}',
                           '{"arrival": 4e8, "prompt_len": 40, "output_len": 20}'])
    r = simulate(w, SimulationConfig(block_size=16, num_blocks=64))
    assert len(r.timeline.step) == r.paged.steps_executed == 41 and r.paged.steps == 400_000_020
    paths = plot_simulation(r, tmp_path)
    assert len(paths) == 3 and all(_is_png(p) for p in paths)


def test_plot_needs_matplotlib_and_names_the_extra(monkeypatch):
    import builtins

    from kvforge.errors import MissingExtraError
    from kvforge.tools import plot

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingExtraError, match=r'pip install "kvforge\[plot\]"'):
        plot.require_matplotlib()
    with pytest.raises(ImportError):  # a MissingExtraError is an ImportError too
        plot.block_map(None, "x.png", snapshot=block_map_of(BlockManager(4, 2)))


# ------------------------------------------------------ pictures that explain themselves
def _rgb_set(colors) -> set[tuple[float, float, float]]:
    return {tuple(round(float(c), 3) for c in color[:3]) for color in colors}


def _drawn_map(bm):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    plot._draw_map(ax, bm, "map")
    return ax


def test_block_map_legend_shows_the_sequence_colours_and_every_state():
    from matplotlib.patches import Rectangle

    m = BlockManager(num_blocks=12, block_size=4)
    m.add_sequence("a", list(range(10)))
    ax = _drawn_map(block_map_of(m))
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["held by one sequence (colour = sequence)", "the same, partly filled (paler = emptier)",
                      "shared by several sequences", "cached, evictable (no owner; kept for prefix reuse)", "free",
                      "not backed by device memory (released)"]
    # the first entry is a row of several sequence colours, as the map draws them
    drawn = _rgb_set(r.get_facecolor() for r in legend.findobj(Rectangle))
    palette = _rgb_set(plot._palette())
    assert len(drawn & palette) == 6
    # every state has its own colour, none of them a sequence colour, and no sequence colour is grey
    states = _rgb_set(plot._COLORS.values())
    assert len(states) == 4 and not states & palette
    assert all(not (r == g == b) for r, g, b in palette)
    assert len(palette) == 18


def test_first_sequences_get_distinct_hues_not_light_twins():
    # a light twin of a dark hue would read as a partly filled block of the same sequence
    import colorsys

    hues = [round(colorsys.rgb_to_hsv(*c)[0], 2) for c in plot._palette()[:9]]
    assert len(set(hues)) == 9


def test_unbacked_blocks_are_hatched_and_padding_is_not():
    cache = _fragmented_cache()
    cache.compact_cache()  # releases the tail: unbacked blocks
    bm = block_map_of(cache)
    n_unbacked = int((bm.states == UNBACKED).sum())
    assert n_unbacked > 0
    ax = _drawn_map(bm)
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert sum(int(p.get_width()) for p in hatched) == n_unbacked
    # each run lies within one row of the grid, over unbacked ids only
    cols = ax.images[0].get_array().shape[1]
    for p in hatched:
        row, col = int(p.get_y() + 0.5), int(p.get_x() + 0.5)
        ids = np.arange(row * cols + col, row * cols + col + int(p.get_width()))
        assert col + int(p.get_width()) <= cols and (bm.states[ids] == UNBACKED).all()


def _simulation():
    w = make_workload("bursty", 60, seed=1, rate=2.0)
    return simulate(w, SimulationConfig(num_blocks=200, bytes_per_token=1024, model="toy"))


def test_every_line_of_the_simulation_plots_is_readable_and_labelled():
    result = _simulation()
    assert result.compactions  # so the compaction markers are drawn
    for fig in (memory_figure(result), fragmentation_figure(result)):
        for ax in fig.axes:
            assert ax.get_ylabel() and "%" in ax.get_ylabel()
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            assert lines
            for ln in lines:
                assert ln.get_alpha() is None or ln.get_alpha() >= 0.8, ln.get_label()
                if ln.get_linestyle() not in ("None", ""):
                    assert ln.get_linewidth() >= 1.0, ln.get_label()
            colors = [ln.get_color() for ln in lines]
            assert len(set(colors)) == len(colors), colors  # one colour per series
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert {ln.get_label() for ln in lines} <= set(legend)
        assert fig.axes[-1].get_xlabel() == "decode step"
    frag = fragmentation_figure(result)
    labels = [t.get_text() for ax in frag.axes for t in ax.get_legend().get_texts()]
    assert any(label.startswith("external fragmentation") for label in labels)
    assert "compaction" in labels and any(label.startswith("compaction threshold") for label in labels)
    memory = memory_figure(result)
    assert "blocks x 16 tokens" in memory.axes[0].get_ylabel()


# ------------------------------------------------------------ the host tier
def _tiered(host_chunk_blocks: int = 2) -> KVCache:
    """A 4-block device pool (block_size 8, 4 KiB blocks) and an 8-block host tier."""
    import torch

    cfg = CacheConfig(block_size=8, num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device="cpu", host_memory="32KiB", host_chunk_blocks=host_chunk_blocks)
    return KVCache(cfg, backend="torch")


def test_host_map_of_every_state_step_by_step():
    from kvforge.tools.plot import COPY, host_map_of

    cache = _tiered()
    hm = host_map_of(cache)
    assert hm.owners == () and hm.allocated_blocks == 0 and hm.block_size == 8
    assert hm.states.tolist() == [UNBACKED] * 8  # no host memory until the first spill
    cache.add_sequence("a", list(range(16)))
    cache.free_sequence("a")
    cache.add_sequence("b", list(range(100, 130)))  # 30 tokens, the whole pool: a's 2 blocks spill to host 0, 1
    hm = host_map_of(cache)
    assert hm.states.tolist() == [CACHED, CACHED] + [UNBACKED] * 6 and hm.allocated_blocks == 2
    assert hm.fill.tolist() == [8, 8, 0, 0, 0, 0, 0, 0]
    cache.swap_out(["b"])                           # host 2..5; b's tail holds 6 tokens
    hm = host_map_of(cache)
    assert hm.owners == ("b",) and hm.allocated_blocks == 6
    assert hm.states.tolist() == [CACHED, CACHED, 0, 0, 0, 0, UNBACKED, UNBACKED]
    assert hm.fill.tolist() == [8, 8, 8, 8, 8, 6, 0, 0]
    cache.add_sequence("c", list(range(16)) + [5])  # a's prefix onboarded: host 0, 1 now copy c's blocks
    hm = host_map_of(cache)
    assert hm.states.tolist() == [COPY, COPY, 0, 0, 0, 0, UNBACKED, UNBACKED]
    assert hm.counts() == {"swapped": 4, "shared": 0, "cached": 0, "copies": 2, "free": 0, "unallocated": 2}
    cache.free_sequence("c")
    cache.swap_in(["b"])                            # evicts c's blocks: host 0, 1 host-only again
    cache.check_invariants()
    hm = host_map_of(cache)
    assert hm.owners == ()                          # b's full host blocks now copy its device blocks
    assert hm.states.tolist() == [CACHED, CACHED, COPY, COPY, COPY, FREE, UNBACKED, UNBACKED]
    assert hm.fill[:6].tolist() == [8] * 5 + [0]    # b's partial tail has no key: its host block was freed
    assert hm.counts() == {"swapped": 0, "shared": 0, "cached": 2, "copies": 3, "free": 1, "unallocated": 2}
    # the device map knows nothing of the host tier
    assert block_map_of(cache).owners == ("b",)


def test_host_map_of_shared_swapped_blocks_and_a_bare_manager():
    from kvforge.tools.plot import host_map_of

    cache = _tiered(host_chunk_blocks=4)
    cache.add_sequence("p", list(range(20)))        # 3 blocks
    cache.fork("p", "q")
    cache.add_sequence("r", list(range(50, 55)))    # 1 block
    cache.swap_out(["p", "q"])                      # shared blocks come along once: 3 host blocks
    hm = host_map_of(cache)
    assert hm.owners == ("p", "q") and hm.allocated_blocks == 4
    assert hm.states.tolist() == [SHARED] * 3 + [FREE] + [UNBACKED] * 4
    assert hm.fill[:3].tolist() == [8, 8, 4]
    m = BlockManager(num_blocks=4, block_size=4, num_host_blocks=3)
    m.add_sequence(1, list(range(8)))
    m.free_sequence(1)
    m.add_sequence(2, list(range(50, 66)))          # 1's 2 cached blocks spill
    hm = host_map_of(m)
    assert hm.allocated_blocks == 3 and hm.states.tolist() == [CACHED, CACHED, FREE]  # no memory: all "allocated"
    assert host_map_of(BlockManager(4, 4)) is None and host_map_of(_fragmented_cache()) is None


def test_block_map_of_a_cache_with_a_host_tier_has_a_host_panel(tmp_path):
    from kvforge.tools.plot import COPY, block_map_figure, host_map_of

    cache = _tiered()
    cache.add_sequence("a", list(range(16)))
    cache.free_sequence("a")
    cache.add_sequence("b", list(range(100, 130)))
    cache.swap_out(["b"])
    cache.add_sequence("c", list(range(16)) + [5])
    cache.add_sequence("d", list(range(500, 505)))
    fig = block_map_figure(cache)
    device_ax, host_ax = fig.axes
    assert device_ax.get_title().splitlines()[0] == "KV cache block map: device"
    assert host_ax.get_title().splitlines() == [
        "KV cache block map: host tier",
        "8 host blocks: 4 held by 1 swapped sequence (0 shared), 0 cached (host only), 2 copies of device blocks, "
        "0 free, 2 without memory yet"]
    labels = [t.get_text() for t in host_ax.get_legend().get_texts()]
    assert labels == ["held by a swapped sequence (colour = sequence)", "the same, partly filled (paler = emptier)",
                      "shared by several swapped sequences", "cached, host only (its device block was evicted)",
                      "copy of a cached device block (on both tiers)", "free",
                      "no host memory yet (allocated on first use)"]
    # the host grid: the copies in their grey, b in the colour after the device's two sequences, then hatching
    grid = host_ax.images[0].get_array().reshape(-1, 3)[:8]
    palette = plot._palette()
    assert np.allclose(grid[0], plot._HOST_COLORS[COPY]) and np.allclose(grid[1], plot._HOST_COLORS[COPY])
    assert np.allclose(grid[2], palette[2]) and np.allclose(grid[4], palette[2])
    assert np.allclose(grid[5], plot._paler(palette[2:3], np.array([6 / 8]))[0])  # b's tail: 6 of 8 tokens
    hatched = [p for p in host_ax.patches if p.get_hatch()]
    assert sum(int(p.get_width()) for p in hatched) == 2
    assert _is_png(block_map(cache, tmp_path / "tiers.png"))
    # a snapshot alone draws the device panel only, unless the host snapshot comes with it
    snap, host = block_map_of(cache), host_map_of(cache)
    assert len(block_map_figure(None, snapshot=snap).axes) == 1
    assert len(block_map_figure(None, snapshot=snap, host_snapshot=host).axes) == 2


def test_block_map_without_a_host_tier_is_one_panel_as_before():
    from kvforge.tools.plot import block_map_figure

    fig = block_map_figure(_fragmented_cache())
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == (7.5, 6.5)
    assert fig.axes[0].get_title().splitlines()[0] == "KV cache block map"


def test_host_colours_are_their_own():
    from kvforge.tools.plot import COPY

    host = _rgb_set(plot._HOST_COLORS.values())
    assert len(host) == 5 and not host & _rgb_set(plot._palette())
    assert plot._HOST_COLORS[COPY] not in plot._COLORS.values()
