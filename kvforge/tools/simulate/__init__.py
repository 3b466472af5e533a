"""Replay a workload through kvforge's bookkeeping alone: no model, no device.

The step model (the same for the paged and the static cache, see
``docs/simulate.md``). At every decode step ``t``:

1. requests whose arrival is ``<= t`` join the waiting queue (FCFS);
2. decode: every running request reserves one slot (for the token it feeds
   back) and produces one output token. When the pool cannot give the blocks
   the batch needs, the most recently admitted request is preempted
   (*recompute*: its blocks are freed, it returns to the head of the queue
   keeping its output so far; with a host tier and ``preemption="swap"`` its
   blocks are swapped out instead, and back in when it is readmitted) until it can;
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
   is below 70% (:func:`kvforge.core.compaction.should_compact`, the trigger
   ``KVCache.should_compact()`` uses), the pool is compacted with
   :meth:`~kvforge.core.manager.BlockManager.plan_compaction`.

The static comparison runs the same workload through a contiguous cache of
the same number of token slots in which every request reserves one
contiguous range (first fit) for its whole life: ``max_model_len`` tokens
(``max-model-len``), ``prompt + max_output_len`` (``max-output``: the
request's ``max_tokens``), or exactly what it will use (``oracle``, a lower
bound no real static cache reaches).

With ``num_host_blocks`` the manager has a host tier: evicted prefix blocks
spill there and prefix hits there are onboarded; every copy batch is priced at
``host_bandwidth`` (the hit rates by tier, the copies and their modelled time
are in :class:`PagedSummary` and :class:`Timeline`).

Waste is reserved-but-unused token slots over reserved token slots, summed
over all steps (a time average weighted by reservation).

The package, one concept per module: :mod:`.config` (:class:`SimulationConfig`),
:mod:`.records` (timelines, summaries, :class:`SimulationResult`), :mod:`.paged`
(the replay through the block manager), :mod:`.static` (the contiguous
comparison), :mod:`.driver` (:func:`simulate`), :mod:`.cli` (``kvforge simulate``).
Model shapes for ``--model`` come from :mod:`kvforge.model_shapes`.

The names below are imported on first use (a module ``__getattr__``, as the
package face does), so that importing :mod:`.cli` to build the ``simulate``
parser loads neither torch nor the replay.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "SimulationConfig": "kvforge.tools.simulate.config",
    "SimulationResult": "kvforge.tools.simulate.records",
    "PagedSummary": "kvforge.tools.simulate.records",
    "StaticSummary": "kvforge.tools.simulate.records",
    "Timeline": "kvforge.tools.simulate.records",
    "StaticTimeline": "kvforge.tools.simulate.records",
    "CompactionEvent": "kvforge.tools.simulate.records",
    "MODEL_SHAPES": "kvforge.model_shapes",
    "EVICTION_POLICIES": "kvforge.tools.simulate.config",
    "STATIC_RESERVE_MODES": "kvforge.tools.simulate.config",
    "PREEMPTION_MODES": "kvforge.tools.simulate.config",
    "DEFAULT_HOST_BANDWIDTH": "kvforge.tools.simulate.config",
    "simulate": "kvforge.tools.simulate.driver",
    "simulate_static": "kvforge.tools.simulate.static",
    "register": "kvforge.tools.simulate.cli",
    "run": "kvforge.tools.simulate.cli",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers see the names without importing anything at run time
    from kvforge.model_shapes import MODEL_SHAPES
    from kvforge.tools.simulate.cli import register, run
    from kvforge.tools.simulate.config import (
        DEFAULT_HOST_BANDWIDTH, EVICTION_POLICIES, PREEMPTION_MODES, STATIC_RESERVE_MODES, SimulationConfig,
    )
    from kvforge.tools.simulate.driver import simulate
    from kvforge.tools.simulate.records import (
        CompactionEvent, PagedSummary, SimulationResult, StaticSummary, StaticTimeline, Timeline,
    )
    from kvforge.tools.simulate.static import simulate_static
