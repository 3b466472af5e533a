"""Request workloads for the simulator: built-in generators and JSONL traces.

One concept per module: :mod:`.request` (:class:`Request`, :class:`Workload`
and the synthetic token ids), :mod:`.builtin` (the seeded built-in
workloads), :mod:`.trace` (the JSONL trace format, read and written).
"""
from __future__ import annotations

from kvforge.tools.workload.builtin import BUILTIN_WORKLOADS, make_workload
from kvforge.tools.workload.request import Request, Workload, WorkloadStats, synthetic_token_ids
from kvforge.tools.workload.trace import load_trace, parse_trace_lines, write_trace

__all__ = [
    "Request",
    "Workload",
    "WorkloadStats",
    "BUILTIN_WORKLOADS",
    "make_workload",
    "load_trace",
    "parse_trace_lines",
    "write_trace",
    "synthetic_token_ids",
]
