"""Pictures of the pool: block maps, compaction before/after, simulation time series.

matplotlib is imported lazily, and only its object-oriented API with the Agg
canvas is used (no ``pyplot``), so importing or calling this module never
changes the global backend of an interactive session. Every function writes
a PNG and returns its path.

:func:`block_map_of` (no matplotlib) snapshots which sequence owns each
block; :func:`block_map` draws it. Block states: owned by one sequence
(coloured by the owner, lighter when the block is only partly filled),
shared by several sequences (dark), cached-evictable (grey: no reference,
kept for prefix reuse), free (light) and not backed by device memory (white,
for an elastic pool that has shrunk).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple

import numpy as np

from kvforge.core.compaction import plan_compaction
from kvforge.errors import MissingExtraError

if TYPE_CHECKING:
    from kvforge.core.manager import BlockManager
    from kvforge.tools.simulate import SimulationResult

__all__ = [
    "BlockMap",
    "CompactionMaps",
    "block_map_of",
    "block_map",
    "compaction_maps",
    "plot_simulation",
    "require_matplotlib",
    "FREE",
    "CACHED",
    "SHARED",
    "UNBACKED",
]

#: Codes in :attr:`BlockMap.states` (values >= 0 are owner indices).
FREE, CACHED, SHARED, UNBACKED = -1, -2, -3, -4

_COLORS = {FREE: (0.93, 0.93, 0.93), CACHED: (0.60, 0.60, 0.60), SHARED: (0.13, 0.13, 0.13),
           UNBACKED: (1.0, 1.0, 1.0)}


class BlockMap(NamedTuple):
    """Who holds each block of a pool at one moment.

    ``states[b]`` (int32, one per block id up to the pool's maximum) is the
    index into ``owners`` of the one sequence holding block ``b``, or
    :data:`SHARED`, :data:`CACHED`, :data:`FREE`, :data:`UNBACKED`.
    ``fill[b]`` is the number of token slots of ``b`` holding a token.
    """

    states: np.ndarray
    fill: np.ndarray
    owners: tuple[Hashable, ...]
    block_size: int
    capacity: int
    external_fragmentation: float

    def counts(self) -> dict[str, int]:
        """Blocks per state: ``owned``, ``shared``, ``cached``, ``free``, ``unbacked``."""
        s = self.states
        return {"owned": int((s >= 0).sum()), "shared": int((s == SHARED).sum()),
                "cached": int((s == CACHED).sum()), "free": int((s == FREE).sum()),
                "unbacked": int((s == UNBACKED).sum())}


def _manager_of(target: Any) -> BlockManager:
    manager = getattr(target, "manager", target)
    if not hasattr(manager, "block_table_array") or not hasattr(manager, "pool"):
        raise TypeError(f"expected a KVCache or a BlockManager, got {type(target).__name__}")
    return manager


def block_map_of(target: Any) -> BlockMap:
    """Snapshot the owner of every block of a :class:`~kvforge.storage.cache.KVCache` or a
    :class:`~kvforge.core.manager.BlockManager` (vectorised; cheap enough per step)."""
    manager = _manager_of(target)
    pool, bs = manager.pool, manager.block_size
    seq_ids = manager.seq_ids
    states = np.full(pool.num_blocks, UNBACKED, dtype=np.int32)
    states[: pool.capacity] = FREE
    fill = np.zeros(pool.num_blocks, dtype=np.int32)
    evictable = np.asarray(pool.evictable_blocks(), dtype=np.int64)
    states[evictable] = CACHED
    fill[evictable] = bs
    if seq_ids:
        tables = np.asarray(manager.block_table_array(seq_ids), dtype=np.int64)
        lens = np.asarray(manager.context_lens(seq_ids), dtype=np.int64)
        nblk = -(-lens // bs)
        mask = tables >= 0
        blocks = tables[mask]
        owner = np.repeat(np.arange(len(seq_ids), dtype=np.int32), mask.sum(axis=1))
        states[blocks] = owner
        states[np.bincount(blocks, minlength=pool.num_blocks) > 1] = SHARED
        has = nblk > 0
        rows = np.flatnonzero(has)
        tails = tables[rows, nblk[has] - 1]
        tail_tokens = lens[has] - (nblk[has] - 1) * bs
        full = np.ones(len(blocks), dtype=bool)
        full[np.cumsum(mask.sum(axis=1))[has] - 1] = False  # each row's last entry is its tail
        np.maximum.at(fill, blocks[full], bs)
        np.maximum.at(fill, tails, tail_tokens.astype(np.int32))
    return BlockMap(states, fill, tuple(seq_ids), bs, pool.capacity, pool.fragmentation_ratio())


# ------------------------------------------------------------------ drawing
def require_matplotlib() -> None:
    """Raise :class:`~kvforge.errors.MissingExtraError` (an ``ImportError``) naming
    the extra to install unless matplotlib imports: tools call it before long work."""
    _mpl()


def _mpl() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(f"the plots need matplotlib ({exc}): pip install 'kvforge[plot]'") from exc
    return Figure, FigureCanvasAgg


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    _, canvas_cls = _mpl()
    canvas_cls(fig)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def _rgb(bm: BlockMap) -> np.ndarray:
    from matplotlib import colormaps

    palette = np.asarray(colormaps["tab20"].colors)[:, :3]
    palette = np.delete(palette, [14, 15], axis=0)  # tab20's greys read as cached/free
    s = bm.states
    rgb = np.empty((len(s), 3))
    owned = s >= 0
    rgb[owned] = palette[s[owned] % len(palette)]
    # lighter when partly filled: internal fragmentation shows as pale blocks
    frac = np.clip(bm.fill[owned] / bm.block_size, 0.0, 1.0)[:, None]
    rgb[owned] = rgb[owned] * (0.45 + 0.55 * frac) + (1 - (0.45 + 0.55 * frac))
    for code, color in _COLORS.items():
        rgb[s == code] = color
    return rgb


def _draw_map(ax: Any, bm: BlockMap, title: str, cols: int | None = None) -> None:
    from matplotlib.patches import Patch

    n = len(bm.states)
    cols = cols or max(8, min(512, int(np.ceil(np.sqrt(n * 2)))))
    rows = -(-n // cols)
    grid = np.ones((rows * cols, 3))
    grid[:n] = _rgb(bm)
    ax.imshow(grid.reshape(rows, cols, 3), interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([0, rows - 1])
    ax.set_yticklabels(["block 0", f"block {(rows - 1) * cols}"], fontsize=7)
    c = bm.counts()
    ax.set_title(f"{title}\n{c['owned'] + c['shared']} held by {len(bm.owners)} seqs "
                 f"({c['shared']} shared), {c['cached']} cached, {c['free']} free"
                 + (f", {c['unbacked']} released" if c["unbacked"] else "")
                 + f"; external frag {bm.external_fragmentation:.0%}", fontsize=8)
    handles = [Patch(color=_COLORS[SHARED], label="shared"), Patch(color=_COLORS[CACHED], label="cached, evictable"),
               Patch(facecolor=_COLORS[FREE], edgecolor="0.7", label="free")]
    if c["unbacked"]:
        handles.append(Patch(facecolor=_COLORS[UNBACKED], edgecolor="0.7", label="not backed (released)"))
    handles.insert(0, Patch(color=(0.12, 0.47, 0.71), label="one sequence (pale: partly filled)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7,
              frameon=False)


def block_map(target: Any, path: str | os.PathLike[str], *, title: str = "KV cache block map",
              snapshot: BlockMap | None = None) -> Path:
    """Write a PNG of the pool of ``target`` (a KVCache or a BlockManager), each block
    coloured by its owner sequence, shared, cached-evictable, free or released;
    or of a ``snapshot`` taken earlier (then ``target`` may be None)."""
    bm = snapshot if snapshot is not None else block_map_of(target)
    figure_cls, _ = _mpl()
    fig = figure_cls(figsize=(7.5, 6.5))
    _draw_map(fig.add_subplot(1, 1, 1), bm, title)
    return _save(fig, path)


class CompactionMaps(NamedTuple):
    """What :func:`compaction_maps` wrote and did."""

    before: Path
    after: Path
    combined: Path
    blocks_moved: int
    bytes_returned: int
    before_map: BlockMap
    after_map: BlockMap


def _compact(target: Any) -> int:
    if hasattr(target, "compact_cache"):  # a KVCache: move the data, release the tail
        return int(target.compact_cache())
    manager = _manager_of(target)  # bookkeeping only: nothing to release
    manager.apply_compaction(manager.plan_compaction())
    return 0


def compaction_maps(target: Any, path_prefix: str | os.PathLike[str], *,
                    compact: Callable[[Any], int | None] | None = None) -> CompactionMaps:
    """Draw the block map, compact, draw it again.

    Writes ``<prefix>_before.png``, ``<prefix>_after.png`` and both side by
    side in ``<prefix>.png``. ``compact(target)`` performs the compaction
    (returning bytes released, or None); by default a KVCache runs
    :meth:`~kvforge.storage.cache.KVCache.compact_cache` and a BlockManager applies
    :func:`~kvforge.core.compaction.plan_compaction` to its bookkeeping.
    """
    manager = _manager_of(target)
    prefix = os.fspath(path_prefix)
    before = block_map_of(manager)
    moved0 = manager.pool.stats.total_blocks_moved
    held0 = set(manager.held_blocks())
    returned = (compact or _compact)(target) or 0
    after = block_map_of(manager)
    moved = manager.pool.stats.total_blocks_moved - moved0
    if moved == 0:  # the compaction did not record its moves: count blocks that changed id
        moved = len(held0 - set(manager.held_blocks()))
    paths = (block_map(None, f"{prefix}_before.png", title="before compaction", snapshot=before),
             block_map(None, f"{prefix}_after.png", title="after compaction", snapshot=after))
    figure_cls, _ = _mpl()
    fig = figure_cls(figsize=(14, 6.5))
    _draw_map(fig.add_subplot(1, 2, 1), before, "before compaction")
    _draw_map(fig.add_subplot(1, 2, 2), after, f"after compaction: {moved} blocks moved, "
              f"{_fmt_bytes(int(returned))} returned")
    combined = _save(fig, f"{prefix}.png")
    return CompactionMaps(paths[0], paths[1], combined, int(moved), int(returned), before, after)


def _fmt_bytes(n: int) -> str:
    from kvforge.config import format_bytes
    return format_bytes(n)


# ------------------------------------------------------------ simulations
def plot_simulation(result: SimulationResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write a simulation's plots into ``out_dir``: memory over time, fragmentation
    and efficiency over time, and the block map at the peak. Returns the paths."""
    figure_cls, _ = _mpl()
    out = Path(out_dir)
    name = result.workload_name.replace(os.sep, "_").replace(" ", "_")
    tl, st, cfg = result.timeline, result.static_timeline, result.config
    cap_tokens = cfg.num_blocks * cfg.block_size
    paths = []

    fig = figure_cls(figsize=(9, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    bs = cfg.block_size
    held = tl.held_blocks * bs / cap_tokens * 100
    ax.fill_between(tl.step, 0, tl.live_slots / cap_tokens * 100, color="tab:blue", alpha=0.35,
                    label="paged: live tokens", step="post")
    ax.plot(tl.step, held, color="tab:blue", lw=1.2, label="paged: reserved blocks", drawstyle="steps-post")
    ax.plot(tl.step, (tl.held_blocks + tl.evictable_blocks) * bs / cap_tokens * 100, color="tab:blue", lw=0.8,
            ls=":", label="paged: + cached evictable", drawstyle="steps-post")
    if st is not None:
        ax.plot(st.step, st.reserved_slots / cap_tokens * 100, color="tab:red", lw=1.2,
                label=f"static ({result.static.reserve_mode}): reserved", drawstyle="steps-post")
        ax.plot(st.step, st.live_slots / cap_tokens * 100, color="tab:red", lw=0.8, ls="--",
                label="static: live tokens", drawstyle="steps-post")
    ax.set_xlabel("decode step")
    ax.set_ylabel(f"% of pool ({cfg.num_blocks} blocks x {bs} tokens"
                  + (f", {_fmt_bytes(cfg.num_blocks * bs * cfg.bytes_per_token)}" if cfg.bytes_per_token else "")
                  + ")")
    ax.set_ylim(0, 105)
    ax.set_title(f"{result.workload_name}: memory over time (paged waste {result.paged.waste:.1%}"
                 + (f", static waste {result.static.waste:.1%}" if result.static is not None else "") + ")")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / f"{name}_memory.png"))

    fig = figure_cls(figsize=(9, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    reserved = np.maximum(tl.held_blocks * bs, 1)
    ax.plot(tl.step, np.where(tl.held_blocks > 0, tl.wasted_slots / reserved, 0) * 100, lw=1,
            label="internal fragmentation", color="tab:orange")
    # the ratio swings between 0 and 100% when only a few blocks are free, so the
    # trapped blocks themselves (what compaction would hand back) are drawn too
    ax.plot(tl.step, tl.external_fragmentation * 100, lw=0.5, alpha=0.35, color="tab:purple",
            label="external fragmentation (trapped / free blocks)")
    ax.plot(tl.step, tl.trapped_blocks / cfg.num_blocks * 100, lw=1.2, color="tab:purple",
            label="trapped free blocks (% of pool)")
    ax.plot(tl.step, tl.live_slots / cap_tokens * 100, lw=1, label="memory efficiency", color="tab:green")
    if result.compactions:
        steps = [ev.step for ev in result.compactions]
        ax.plot(steps, [1.5] * len(steps), "|", color="k", ms=8, label="compaction")
    ax.axhline(cfg.compaction_threshold * 100, color="tab:purple", lw=0.6, ls=":",
               label="compaction threshold")
    ax.set_xlabel("decode step")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{result.workload_name}: fragmentation and efficiency "
                 f"({result.paged.compactions} compactions, {result.paged.blocks_moved} blocks moved)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / f"{name}_fragmentation.png"))

    if result.peak_map is not None:
        paths.append(block_map(None, out / f"{name}_block_map_peak.png", snapshot=result.peak_map,
                               title=f"{result.workload_name}: block map at the peak (step {result.paged.peak_step})"))
    return paths
