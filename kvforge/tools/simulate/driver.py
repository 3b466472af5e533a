"""``simulate``: the paged replay and, for comparison, the static one."""
from __future__ import annotations

from typing import Callable

from kvforge.errors import ConfigError
from kvforge.tools.simulate.config import SimulationConfig
from kvforge.tools.simulate.paged import simulate_paged
from kvforge.tools.simulate.records import SimulationResult, StaticSummary, StaticTimeline
from kvforge.tools.simulate.static import simulate_static
from kvforge.tools.workload import Workload

__all__ = ["simulate"]


def simulate(workload: Workload, config: SimulationConfig | None = None, *,
             progress: Callable[[int, int], None] | None = None,
             static: bool = True, check: bool = False) -> SimulationResult:
    """Replay ``workload`` through a :class:`~kvforge.core.manager.BlockManager` and,
    with ``static``, through a contiguous max-length reservation for comparison.

    ``progress(finished, total)`` is called as requests finish (a
    :class:`~kvforge.tools.output.Progress` fits). ``check`` cross-checks the
    simulator's accounting against the block manager and runs its
    ``check_invariants()`` at every step (slow; for tests). Raises
    :class:`~kvforge.errors.ConfigError` when a request can never fit the
    pool; a static cache too small for one reservation is reported in the
    result's ``static_note`` instead.
    """
    config = config or SimulationConfig()
    paged = simulate_paged(workload, config, progress=progress, check=check)
    st_summary: StaticSummary | None = None
    st_tl: StaticTimeline | None = None
    note = ""
    if static:
        try:
            st_summary, st_tl = simulate_static(workload, config)
        except ConfigError as exc:
            note = str(exc)
    ws = workload.stats()
    return SimulationResult(workload.name, len(workload), ws.mean_prompt_len, ws.mean_output_len,
                            workload.max_model_len, config, paged.summary, st_summary, note, paged.timeline,
                            st_tl, paged.compactions, paged.peak_map)
