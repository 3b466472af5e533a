"""Pictures of the pool: block maps, compaction before/after, simulation time series.

matplotlib is imported lazily, and only its object-oriented API with the Agg
canvas is used (no ``pyplot``), so importing or calling this module never
changes the global backend of an interactive session. Every function writes
a PNG and returns its path; the ``*_figure`` ones return the figure instead.

:func:`block_map_of` (no matplotlib) snapshots which sequence owns each
block; :func:`block_map` draws it. Block states: held by one sequence
(each sequence its own colour, paler when the block is only partly filled;
the legend's swatch shows several colours, as the map does), shared by
several sequences (near black), cached-evictable (mid grey: no reference,
kept for prefix reuse), free (light grey) and not backed by device memory
(white, hatched: an elastic pool that has shrunk). Cells past the last
block id, which fill the last row, are plain white.

A cache with a host tier (``CacheConfig(host_memory=...)``) gets a second
panel below, the host tier's blocks (:func:`host_map_of`): held by a swapped
sequence (each its own colour, after the device's sequences' colours; near
black when several swapped sequences share it), cached with a host-only
prefix key (mid grey, as on the device), a copy of a cached device block
(dark grey: on both tiers), free (light grey) and without host memory yet
(white, hatched: the tier allocates its chunks on first use). Without a host
tier the picture is the one panel it always was.

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
    "HostBlockMap",
    "block_map_of",
    "host_map_of",
    "block_map",
    "block_map_figure",
    "compaction_maps",
    "plot_simulation",
    "memory_figure",
    "fragmentation_figure",
    "require_matplotlib",
    "FREE",
    "CACHED",
    "SHARED",
    "UNBACKED",
    "COPY",
]

#: Codes in :attr:`BlockMap.states` (values >= 0 are owner indices).
FREE, CACHED, SHARED, UNBACKED = -1, -2, -3, -4
#: Code in :attr:`HostBlockMap.states` of a host block that copies a cached device block.
COPY = -5

_COLORS = {FREE: (0.86, 0.86, 0.86), CACHED: (0.55, 0.55, 0.55), SHARED: (0.10, 0.10, 0.10),
           UNBACKED: (1.0, 1.0, 1.0)}
#: the host tier's states: the device's, and the copies of device blocks (darker than cached)
_HOST_COLORS = {**_COLORS, COPY: (0.33, 0.33, 0.33)}
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


class HostBlockMap(NamedTuple):
    """What each block of a host tier holds at one moment (:func:`host_map_of`).

    ``states[h]`` (int32, one per host block of the budget) is the index into
    ``owners`` (the swapped-out sequences) of the one swapped sequence holding
    host block ``h``, or :data:`SHARED` (several swapped sequences),
    :data:`CACHED` (a host-only prefix key: its device block was evicted),
    :data:`COPY` (a copy of a cached device block), :data:`FREE` or
    :data:`UNBACKED` (no host memory allocated for it yet). A block held by a
    swapped sequence counts as held even when it is a copy or keyed too.
    ``fill[h]`` is the number of token slots of ``h`` holding a token;
    ``allocated_blocks`` the host blocks with memory behind them (all of
    them for a bare BlockManager, which has no memory).
    """

    states: np.ndarray
    fill: np.ndarray
    owners: tuple[Hashable, ...]
    block_size: int
    allocated_blocks: int

    def counts(self) -> dict[str, int]:
        """Blocks per state: ``swapped``, ``shared``, ``cached``, ``copies``, ``free``, ``unallocated``."""
        s = self.states
        return {"swapped": int((s >= 0).sum()), "shared": int((s == SHARED).sum()),
                "cached": int((s == CACHED).sum()), "copies": int((s == COPY).sum()),
                "free": int((s == FREE).sum()), "unallocated": int((s == UNBACKED).sum())}


def host_map_of(target: Any) -> HostBlockMap | None:
    """Snapshot what each host-tier block of a :class:`~kvforge.storage.cache.KVCache` or a
    :class:`~kvforge.core.manager.BlockManager` holds; None without a host tier."""
    manager = _manager_of(target)
    host = manager.host
    if not host.enabled:
        return None
    n, bs, pool = host.num_blocks, manager.block_size, manager.pool
    storage = getattr(target, "host_storage", None)
    allocated = n if storage is None else min(n, storage.num_chunks * storage.chunk_blocks)
    states = np.full(n, UNBACKED, dtype=np.int32)
    states[:allocated] = FREE
    fill = np.zeros(n, dtype=np.int32)
    cached = np.asarray(host.pool.evictable_blocks(), dtype=np.int64)  # keyed or copies, unreferenced
    states[cached] = CACHED
    fill[cached] = bs
    copies = [h for h in map(host.copy_of, range(pool.capacity)) if h is not None]
    copied = np.zeros(n, dtype=bool)
    copied[copies] = True
    states[copied & (states == CACHED)] = COPY
    owners = tuple(manager.swapped_seq_ids)
    holders = np.zeros(n, dtype=np.int32)
    for i, seq_id in enumerate(owners):
        rec = host.swapped[seq_id]
        for pos, (b, on_host) in enumerate(zip(rec.blocks, rec.on_host)):
            if on_host:
                states[b] = i
                holders[b] += 1
                fill[b] = max(int(fill[b]), min(bs, rec.num_tokens - pos * bs))
    states[holders > 1] = SHARED
    return HostBlockMap(states, fill, owners, bs, allocated)


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


def _rgb(bm: BlockMap | HostBlockMap, colors: dict[int, tuple[float, float, float]] = _COLORS,
         offset: int = 0) -> np.ndarray:
    """Each block's colour; owner ``i`` gets sequence colour ``i + offset``."""
    palette = _palette()
    s = bm.states
    rgb = np.empty((len(s), 3))
    owned = s >= 0
    # paler when partly filled: internal fragmentation shows as pale blocks
    frac = np.clip(bm.fill[owned] / bm.block_size, 0.0, 1.0)
    rgb[owned] = _paler(palette[(s[owned] + offset) % len(palette)], frac)
    for code, color in colors.items():
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

    _owned_legend(ax, _palette()[:6], "held by one sequence (colour = sequence)", [
        Patch(color=_COLORS[SHARED], label="shared by several sequences"),
        Patch(color=_COLORS[CACHED], label="cached, evictable (no owner; kept for prefix reuse)"),
        Patch(facecolor=_COLORS[FREE], edgecolor="0.6", label="free"),
        Patch(facecolor=_COLORS[UNBACKED], edgecolor=_HATCH_COLOR, hatch=_UNBACKED_HATCH,
              label="not backed by device memory (released)"),
    ])


def _owned_legend(ax: Any, colors: np.ndarray, owned: str, patches: list[Any]) -> None:
    """A block map's legend: swatches of the owners' ``colors`` (full, then paler for partly
    filled blocks), then one patch per other state, below the panel."""
    handles = [_Swatches(colors), _Swatches(_paler(colors, np.full(len(colors), 0.25))), *patches]
    labels = [owned, "the same, partly filled (paler = emptier)"] + [h.get_label() for h in patches]
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


def _grid_shape(n: int, cols: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the grid that draws ``n`` blocks (about twice as wide as tall)."""
    cols = cols or max(8, min(512, int(np.ceil(np.sqrt(n * 2)))))
    return -(-n // cols), cols


def _draw_grid(ax: Any, rgb: np.ndarray, states: np.ndarray, cols: int | None, what: str = "block") -> None:
    n = len(states)
    rows, cols = _grid_shape(n, cols)
    grid = np.ones((rows * cols, 3))
    grid[:n] = rgb
    ax.imshow(grid.reshape(rows, cols, 3), interpolation="nearest", aspect="equal")
    _hatch_unbacked(ax, states, cols)
    ax.set_xticks([])
    ax.set_xlabel(f"{what} ids in order, {cols} per row", fontsize=7)
    ax.set_yticks([0, rows - 1])
    ax.set_yticklabels([f"{what} 0", f"{what} {(rows - 1) * cols}"], fontsize=7)


def _draw_map(ax: Any, bm: BlockMap, title: str, cols: int | None = None) -> None:
    n = len(bm.states)
    _draw_grid(ax, _rgb(bm), bm.states, cols)
    c = bm.counts()
    ax.set_title(f"{title}\n{n} blocks: {c['owned'] + c['shared']} held by {len(bm.owners)} sequences "
                 f"({c['shared']} shared), {c['cached']} cached, {c['free']} free"
                 + (f", {c['unbacked']} released" if c["unbacked"] else "")
                 + f"\nexternal fragmentation {bm.external_fragmentation:.0%}", fontsize=8)
    _legend(ax)


def _host_legend(ax: Any, offset: int) -> None:
    from matplotlib.patches import Patch

    palette = _palette()
    _owned_legend(ax, palette[(np.arange(6) + offset) % len(palette)],
                  "held by a swapped sequence (colour = sequence)", [
        Patch(color=_HOST_COLORS[SHARED], label="shared by several swapped sequences"),
        Patch(color=_HOST_COLORS[CACHED], label="cached, host only (its device block was evicted)"),
        Patch(color=_HOST_COLORS[COPY], label="copy of a cached device block (on both tiers)"),
        Patch(facecolor=_HOST_COLORS[FREE], edgecolor="0.6", label="free"),
        Patch(facecolor=_HOST_COLORS[UNBACKED], edgecolor=_HATCH_COLOR, hatch=_UNBACKED_HATCH,
              label="no host memory yet (allocated on first use)"),
    ])


def _draw_host_map(ax: Any, hm: HostBlockMap, title: str, offset: int = 0, cols: int | None = None) -> None:
    """Draw a host tier's blocks; swapped sequence ``i`` gets sequence colour ``i + offset``
    (after the device panel's sequences)."""
    n = len(hm.states)
    _draw_grid(ax, _rgb(hm, _HOST_COLORS, offset), hm.states, cols, "host block")
    c = hm.counts()
    k = len(hm.owners)
    ax.set_title(f"{title}\n{n} host blocks: {c['swapped'] + c['shared']} held by {k} swapped "
                 f"sequence{'' if k == 1 else 's'} ({c['shared']} shared), {c['cached']} cached (host only), "
                 f"{c['copies']} copies of device blocks, {c['free']} free"
                 + (f", {c['unallocated']} without memory yet" if c["unallocated"] else ""), fontsize=8)
    _host_legend(ax, offset)


def block_map_figure(target: Any, *, title: str = "KV cache block map", snapshot: BlockMap | None = None,
                     host_snapshot: HostBlockMap | None = None) -> Any:
    """The figure :func:`block_map` saves (a matplotlib ``Figure``): one panel, the
    device pool; with a host tier (``target``'s, or ``host_snapshot``) a second
    panel below, the host tier's blocks."""
    bm = snapshot if snapshot is not None else block_map_of(target)
    hm = host_snapshot
    if hm is None and target is not None and snapshot is None:
        hm = host_map_of(target)
    figure_cls, _ = _mpl()
    if hm is None:
        fig = figure_cls(figsize=(7.5, 6.5))
        _draw_map(fig.add_subplot(1, 1, 1), bm, title)
        return fig
    # each panel as tall as its grid (drawn 6 inches wide) plus its title and legend
    heights = [6.0 * _grid_shape(len(m.states))[0] / _grid_shape(len(m.states))[1] + 2.2 for m in (bm, hm)]
    fig = figure_cls(figsize=(7.5, sum(heights)))
    device_fig, host_fig = fig.subfigures(2, 1, height_ratios=heights)
    for sub, h in zip((device_fig, host_fig), heights):
        sub.subplots_adjust(left=0.1, right=0.9, top=1 - 0.8 / h, bottom=1.3 / h)
    _draw_map(device_fig.add_subplot(1, 1, 1), bm, f"{title}: device")
    _draw_host_map(host_fig.add_subplot(1, 1, 1), hm, f"{title}: host tier", offset=len(bm.owners))
    return fig


def block_map(target: Any, path: str | os.PathLike[str], *, title: str = "KV cache block map",
              snapshot: BlockMap | None = None, host_snapshot: HostBlockMap | None = None) -> Path:
    """Write a PNG of the pool of ``target`` (a KVCache or a BlockManager), each block
    coloured by its owner sequence, shared, cached-evictable, free or released;
    or of a ``snapshot`` taken earlier (then ``target`` may be None).

    With a host tier (``target``'s, or a ``host_snapshot`` taken earlier) a
    second panel below shows the host tier's blocks (:class:`HostBlockMap`);
    without one the figure is the device map alone, as it always was."""
    return _save(block_map_figure(target, title=title, snapshot=snapshot, host_snapshot=host_snapshot), path)


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
