"""Pictures of the pool: block maps, compaction before/after, simulation time series.

matplotlib is imported lazily, and only its object-oriented API with the Agg
canvas is used (no ``pyplot``), so importing or calling this module never
changes the global backend of an interactive session. Every function writes
a PNG and returns its path.

:func:`block_map_of` (no matplotlib) snapshots which sequence owns each
block; :func:`block_map` draws it. Block states: held by one sequence
(each sequence its own colour, paler when the block is only partly filled;
the legend's swatch shows several colours, as the map does), shared by
several sequences (near black), cached-evictable (mid grey: no reference,
kept for prefix reuse), free (light grey) and not backed by device memory
(white, hatched: an elastic pool that has shrunk). Cells past the last
block id, which fill the last row, are plain white.

The simulation plots give every series its own colour and a legend entry,
and every axis its unit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple

import numpy as np

from kvforge.errors import MissingExtraError
from kvforge.tools.extras import install_hint

if TYPE_CHECKING:
    from kvforge.core.manager import BlockManager

__all__ = [
    "BlockMap",
    "CompactionMaps",
    "block_map_of",
    "block_map",
    "compaction_maps",
    "plot_simulation",
    "memory_figure",
    "fragmentation_figure",
    "require_matplotlib",
    "FREE",
    "CACHED",
    "SHARED",
    "UNBACKED",
]

#: Codes in :attr:`BlockMap.states` (values >= 0 are owner indices).
FREE, CACHED, SHARED, UNBACKED = -1, -2, -3, -4

_COLORS = {FREE: (0.86, 0.86, 0.86), CACHED: (0.55, 0.55, 0.55), SHARED: (0.10, 0.10, 0.10),
           UNBACKED: (1.0, 1.0, 1.0)}
#: the hatch and its colour over blocks not backed by device memory
_UNBACKED_HATCH, _HATCH_COLOR = "////", (0.62, 0.62, 0.62)
#: colour weight of a block holding no token yet (a full block has weight 1)
_PALE = 0.45


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
        raise MissingExtraError(f"the plots need matplotlib ({exc}): {install_hint('plot')}") from exc
    return Figure, FigureCanvasAgg


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    _, canvas_cls = _mpl()
    canvas_cls(fig)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


#: tab20's saturated hues first, then its light ones (a light hue next to its dark twin
#: would read as a partly filled block of the same sequence); its two greys left out
#: (they would read as cached or free)
_PALETTE_ORDER = (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)


def _palette() -> np.ndarray:
    """The sequences' colours (sequence ``i`` gets colour ``i % 18``)."""
    from matplotlib import colormaps

    return np.asarray(colormaps["tab20"].colors)[list(_PALETTE_ORDER), :3]


def _paler(rgb: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """``rgb`` blended towards white by how empty the block is (``frac`` of its slots filled)."""
    w = (_PALE + (1 - _PALE) * frac)[:, None]
    return rgb * w + (1 - w)


def _rgb(bm: BlockMap) -> np.ndarray:
    palette = _palette()
    s = bm.states
    rgb = np.empty((len(s), 3))
    owned = s >= 0
    # paler when partly filled: internal fragmentation shows as pale blocks
    frac = np.clip(bm.fill[owned] / bm.block_size, 0.0, 1.0)
    rgb[owned] = _paler(palette[s[owned] % len(palette)], frac)
    for code, color in _COLORS.items():
        rgb[s == code] = color
    return rgb


class _Swatches:
    """A legend entry drawn as a row of small squares, one per colour (the
    sequences' colours: the map gives each sequence its own)."""

    def __init__(self, colors: np.ndarray) -> None:
        self.colors = colors


def _swatch_handler() -> Any:
    from matplotlib.legend_handler import HandlerBase
    from matplotlib.patches import Rectangle

    class SwatchHandler(HandlerBase):
        def create_artists(self, legend: Any, orig_handle: Any, xdescent: float, ydescent: float, width: float,
                           height: float, fontsize: float, trans: Any) -> list[Any]:
            colors = orig_handle.colors
            w = width / len(colors)
            return [Rectangle((-xdescent + i * w, -ydescent), w, height, facecolor=c, edgecolor="none",
                              transform=trans) for i, c in enumerate(colors)]

    return SwatchHandler()


def _legend(ax: Any) -> None:
    from matplotlib.patches import Patch

    colors = _palette()[:6]
    handles = [
        _Swatches(colors),
        _Swatches(_paler(colors, np.full(len(colors), 0.25))),
        Patch(color=_COLORS[SHARED], label="shared by several sequences"),
        Patch(color=_COLORS[CACHED], label="cached, evictable (no owner; kept for prefix reuse)"),
        Patch(facecolor=_COLORS[FREE], edgecolor="0.6", label="free"),
        Patch(facecolor=_COLORS[UNBACKED], edgecolor=_HATCH_COLOR, hatch=_UNBACKED_HATCH,
              label="not backed by device memory (released)"),
    ]
    labels = ["held by one sequence (colour = sequence)", "the same, partly filled (paler = emptier)"]
    labels += [h.get_label() for h in handles[2:]]
    ax.legend(handles=handles, labels=labels, handler_map={_Swatches: _swatch_handler()}, loc="upper center",
              bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=7, frameon=False, handlelength=3.0)


def _hatch_unbacked(ax: Any, states: np.ndarray, cols: int) -> None:
    """Hatch the runs of blocks not backed by device memory, row by row (white
    alone would read as the padding past the last block)."""
    from matplotlib.patches import Rectangle

    ids = np.flatnonzero(states == UNBACKED)
    if not len(ids):
        return
    # runs of consecutive ids, cut where a row ends
    cuts = np.flatnonzero((np.diff(ids) != 1) | (ids[1:] % cols == 0)) + 1
    for run in np.split(ids, cuts):
        row, col = divmod(int(run[0]), cols)
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), len(run), 1, fill=False, hatch=_UNBACKED_HATCH,
                               edgecolor=_HATCH_COLOR, linewidth=0))


def _draw_map(ax: Any, bm: BlockMap, title: str, cols: int | None = None) -> None:
    n = len(bm.states)
    cols = cols or max(8, min(512, int(np.ceil(np.sqrt(n * 2)))))
    rows = -(-n // cols)
    grid = np.ones((rows * cols, 3))
    grid[:n] = _rgb(bm)
    ax.imshow(grid.reshape(rows, cols, 3), interpolation="nearest", aspect="equal")
    _hatch_unbacked(ax, bm.states, cols)
    ax.set_xticks([])
    ax.set_xlabel(f"block ids in order, {cols} per row", fontsize=7)
    ax.set_yticks([0, rows - 1])
    ax.set_yticklabels(["block 0", f"block {(rows - 1) * cols}"], fontsize=7)
    c = bm.counts()
    ax.set_title(f"{title}\n{n} blocks: {c['owned'] + c['shared']} held by {len(bm.owners)} sequences "
                 f"({c['shared']} shared), {c['cached']} cached, {c['free']} free"
                 + (f", {c['unbacked']} released" if c["unbacked"] else "")
                 + f"\nexternal fragmentation {bm.external_fragmentation:.0%}", fontsize=8)
    _legend(ax)


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
              f"{_format_bytes(int(returned))} returned")
    combined = _save(fig, f"{prefix}.png")
    return CompactionMaps(paths[0], paths[1], combined, int(moved), int(returned), before, after)


def _format_bytes(n: int) -> str:
    from kvforge.config import format_bytes  # the config layer imports torch: only when drawing

    return format_bytes(n)


# the simulation figures live in their own module; their names stay importable from here
from kvforge.tools.plot_simulation import fragmentation_figure, memory_figure, plot_simulation  # noqa: E402
