"""``kvforge simulate``: the command line of the simulator (see ``docs/simulate.md``).

The parser imports no torch (``kvforge simulate --help`` is instant); the
replay, the model shapes and the plots are imported when the command runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from kvforge.errors import ConfigError, KVForgeError
from kvforge.tools.args import MODEL_NAMES
from kvforge.tools.checks import check_bytes, check_float, check_int, check_out_dir
from kvforge.tools.extras import require
from kvforge.tools.output import Progress, error_line
from kvforge.tools.simulate.config import (
    DEFAULT_HOST_BANDWIDTH,
    EVICTION_POLICIES,
    MAX_NUM_SEQS,
    MAX_SIMULATED_BLOCKS,
    PREEMPTION_MODES,
    STATIC_RESERVE_MODES,
)
from kvforge.tools.workload import BUILTIN_WORKLOADS
from kvforge.tools.workload.builtin import MAX_RATE, MAX_REQUESTS, MIN_RATE
from kvforge.tools.workload.trace import MAX_TRACE_TOKENS

if TYPE_CHECKING:
    from kvforge.tools.simulate.config import SimulationConfig

__all__ = ["register", "run"]


def _workload_defaults(field: str) -> str:
    """``sharegpt 1000, shared-prefix 1000, ...``: each built-in workload's own value of ``field``."""
    return ", ".join(f"{name} {getattr(w, field):g}" for name, w in BUILTIN_WORKLOADS.items())


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an ``argparse`` subparsers object; its
    handler is :func:`run` (set as the ``func`` default)."""
    p = subparsers.add_parser(
        "simulate", help="replay a workload through the allocator (no model, no device)",
        description="Replay a request workload through kvforge's bookkeeping and compare it with a "
                    "contiguous max-length reservation. See docs/simulate.md.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=sorted(BUILTIN_WORKLOADS), default="sharegpt", help="built-in workload")
    src.add_argument("--trace", metavar="FILE.jsonl",
                     help="replay a JSONL trace instead of a built-in workload (format in docs/simulate.md)")
    p.add_argument("--requests", type=int, metavar="N",
                   help=f"requests of a built-in workload (default: the workload's own: "
                        f"{_workload_defaults('num_requests')})")
    p.add_argument("--rate", type=float, metavar="R",
                   help=f"mean arrivals per decode step of a built-in workload (default: the workload's own: "
                        f"{_workload_defaults('rate')})")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, metavar="N", help="blocks in the pool (default: 4096)")
    size.add_argument("--vram", metavar="BYTES",
                      help="KV memory budget, e.g. 16GiB, sized for --model (default: --num-blocks 4096)")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"model shape: {', '.join(MODEL_NAMES)} or a Hugging Face config path")
    p.add_argument("--kv-dtype", default=None, metavar="DTYPE",
                   help="KV storage dtype the sizes are counted in: fp8_e4m3 or fp8_e5m2 (one byte an element: "
                        "--vram and --host-memory hold twice the blocks of bf16), bfloat16, float16, float32 "
                        "(default: the model's dtype)")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prefix blocks")
    p.add_argument("--compaction", action=argparse.BooleanOptionalAction, default=True,
                   help="compact when fragmentation exceeds the threshold")
    p.add_argument("--compaction-threshold", type=float, default=0.3, metavar="F",
                   help="external fragmentation that triggers compaction")
    p.add_argument("--eviction-policy", choices=EVICTION_POLICIES, default="lru",
                   help="lru: keep unreferenced cached blocks until space is needed; eager: drop them at once")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most running requests")
    p.add_argument("--host-memory", default="0", metavar="BYTES",
                   help="host tier for evicted prefix blocks (and swapped requests), e.g. 64GiB, sized for "
                        "--model; 0 = no host tier")
    p.add_argument("--host-bandwidth", type=float, default=DEFAULT_HOST_BANDWIDTH / 1e9, metavar="GB/s",
                   help="host <-> device copy rate of the copy-time model (pinned memory on an H200 over "
                        "PCIe Gen5 x16 gives about 55)")
    p.add_argument("--preemption", choices=PREEMPTION_MODES, default="recompute",
                   help="recompute: free a preempted request's blocks; swap: copy them to the host tier "
                        "(needs --host-memory)")
    p.add_argument("--static-reserve", choices=STATIC_RESERVE_MODES, default="max-model-len",
                   help="what each request reserves in the static comparison")
    p.add_argument("--max-model-len", type=int, help="context limit of a trace (default: its longest request)")
    p.add_argument("--step-ms", type=float, default=20.0, help="ms per decode step for a trace's 'arrival_s'")
    p.add_argument("--out", default="kvforge-simulate", metavar="DIR",
                   help="folder for the PNG plots (they need matplotlib: pip install \"kvforge[plot]\")")
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of a table (with a time series of <= 1000 points)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (on a terminal a bar, otherwise a line every 10 s)")
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every flag in range, before the model shape is read or a workload is made."""
    from kvforge.config import MAX_BLOCK_SIZE

    check_int("--requests", args.requests, 1, MAX_REQUESTS)
    check_float("--rate", args.rate, MIN_RATE, MAX_RATE)
    check_int("--seed", args.seed, 0)
    check_int("--block-size", args.block_size, 1, MAX_BLOCK_SIZE)
    check_int("--num-blocks", args.num_blocks, 1, MAX_SIMULATED_BLOCKS)
    check_float("--compaction-threshold", args.compaction_threshold, 0.0, 1.0)
    check_int("--max-num-seqs", args.max_num_seqs, 1, MAX_NUM_SEQS)
    check_int("--max-model-len", args.max_model_len, 1, MAX_TRACE_TOKENS)
    check_float("--step-ms", args.step_ms, 0.0, lo_open=True)
    check_float("--host-bandwidth", args.host_bandwidth, 0.0, 1e6, lo_open=True)
    if check_bytes("--host-memory", args.host_memory, positive=False) == 0 and args.preemption == "swap":
        raise ConfigError("--preemption swap needs a host tier: give --host-memory")
    if args.trace and (args.requests is not None or args.rate is not None):
        raise ConfigError("--requests and --rate apply to built-in workloads, not to --trace")
    if not args.trace and args.max_model_len is not None:
        raise ConfigError("--max-model-len applies to --trace (built-in workloads set their own)")


def _config_from_args(args: argparse.Namespace) -> SimulationConfig:
    from kvforge.config import CacheConfig, format_bytes, resolve_kv_dtype
    from kvforge.model_shapes import model_shape, resolve_model
    from kvforge.tools.simulate.config import SimulationConfig

    try:
        label, _ = resolve_model(args.model)
        shape = model_shape(args.model)  # from the name or path: a bad field's message names the file
    except ConfigError as exc:
        raise ConfigError(f"--model {exc}") from None
    kv_dtype = getattr(args, "kv_dtype", None)
    dtype = shape["dtype"] if kv_dtype is None else resolve_kv_dtype(kv_dtype, "--kv-dtype")
    probe = CacheConfig(block_size=args.block_size, num_blocks=1, num_layers=shape["num_layers"],
                        num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], dtype=dtype)
    if args.vram is not None:
        num_blocks = check_bytes("--vram", args.vram) // probe.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(f"--vram {args.vram} holds no block of {format_bytes(probe.bytes_per_block)}")
        if num_blocks > MAX_SIMULATED_BLOCKS:
            raise ConfigError(f"--vram {args.vram} holds {num_blocks:,} blocks of {format_bytes(probe.bytes_per_block)}, "
                              f"more than the simulator takes ({MAX_SIMULATED_BLOCKS:,}: its pool lives in host memory)")
    else:
        num_blocks = args.num_blocks if args.num_blocks is not None else 4096
    host_bytes = check_bytes("--host-memory", args.host_memory, positive=False)
    num_host_blocks = host_bytes // probe.bytes_per_block
    if host_bytes and num_host_blocks < 1:
        raise ConfigError(f"--host-memory {args.host_memory} holds no block of {format_bytes(probe.bytes_per_block)}")
    if num_host_blocks > MAX_SIMULATED_BLOCKS:
        raise ConfigError(f"--host-memory {args.host_memory} holds {num_host_blocks:,} blocks of "
                          f"{format_bytes(probe.bytes_per_block)}, more than the simulator takes "
                          f"({MAX_SIMULATED_BLOCKS:,}: its host tier lives in host memory)")
    return SimulationConfig(
        block_size=args.block_size, num_blocks=num_blocks, enable_prefix_caching=args.prefix_caching,
        enable_compaction=args.compaction, compaction_threshold=args.compaction_threshold,
        eviction_policy=args.eviction_policy, max_num_seqs=args.max_num_seqs,
        static_reserve=args.static_reserve, bytes_per_token=probe.bytes_per_token, model=label,
        num_host_blocks=num_host_blocks, host_bandwidth=args.host_bandwidth * 1e9, preemption=args.preemption)


def run(args: argparse.Namespace) -> int:
    """Run ``kvforge simulate``: print the table (or JSON) and the PNG paths; exit status."""
    try:
        _check_args(args)
        if not args.no_plots:  # before any work: a missing extra is one line, not a table without plots
            require("matplotlib", "plot", "the plots need matplotlib", alternative="pass --no-plots")
        config = _config_from_args(args)
        if not args.no_plots:
            check_out_dir("--out", args.out)
        from kvforge.tools.simulate.driver import simulate
        from kvforge.tools.workload import load_trace, make_workload

        if args.trace:
            workload = load_trace(args.trace, step_ms=args.step_ms, max_model_len=args.max_model_len)
        else:
            workload = make_workload(args.workload, args.requests, seed=args.seed, rate=args.rate)
        progress = Progress(f"simulate {workload.name}", len(workload),
                            enabled=not args.no_progress and not args.json)
        try:
            result = simulate(workload, config, progress=progress)
        finally:
            progress.close()  # a bar cut short by an error ends its line
    except KVForgeError as exc:
        print(error_line("simulate", exc), file=sys.stderr)
        return 2
    paths: list[str] = []
    if not args.no_plots:
        from kvforge.tools.plot import plot_simulation

        try:
            paths = [str(p) for p in plot_simulation(result, args.out)]
        except OSError as exc:
            print(error_line("simulate", ConfigError(f"cannot write plots to {args.out!r}: {exc.strerror or exc}")),
                  file=sys.stderr)
            return 2
    if args.json:
        out = result.to_dict(timeline_points=1000)
        out["plots"] = paths
        print(json.dumps(out, indent=2))
    else:
        print(result.report())
        for path in paths:
            print(f"wrote {path}")
    return 0
