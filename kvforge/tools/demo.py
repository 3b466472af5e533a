"""``kvforge demo``: the main job, end to end, in about 15-20 s on two CPU cores.

Runs the reference engine on a tiny Llama-shaped model with random weights
(fixed seed) over a synthetic workload in which groups of requests share a
long system prompt; on the GPU when present, else on the CPU. Between steps
the cache compacts whenever ``should_compact()`` holds. At the end it prints
throughput, prefix-cache hits, the memory profile and a compaction summary,
compacts the (now idle, fragmented) cache once more with before/after block
maps, and writes the PNGs. ``--model DIR`` runs a real checkpoint instead.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from kvforge.errors import ConfigError
from kvforge.tools.checks import check_bytes, check_int, check_out_dir
from kvforge.tools.extras import require

__all__ = ["DEMO_MODEL", "register", "run", "demo_prompts"]

#: The built-in model: Llama-shaped, small enough for a CPU.
DEMO_MODEL: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=2048, hidden_size=256,
    intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.02, torch_dtype="float32",
)


def demo_prompts(num_requests: int, vocab: int, seed: int, *, num_groups: int = 4, system_len: int = 96,
                 user_len: tuple[int, int] = (8, 64)) -> list[list[int]]:
    """Token-id prompts: each request is one of ``num_groups`` system prompts plus a user part."""
    import numpy as np

    rng = np.random.default_rng(seed)
    systems = [rng.integers(1, vocab, system_len).tolist() for _ in range(num_groups)]
    prompts = []
    for _ in range(num_requests):
        user = rng.integers(1, vocab, int(rng.integers(user_len[0], user_len[1] + 1))).tolist()
        prompts.append(systems[int(rng.integers(num_groups))] + user)
    return prompts


def _num_long_requests(args: argparse.Namespace) -> int:
    """``--long-requests``, or by default 4 but at most a quarter of ``--requests``."""
    return args.long_requests if args.long_requests is not None else min(4, args.requests // 4)


def _check_args(args: argparse.Namespace) -> None:
    """Every flag in range, the extras importable and ``--out`` writable, before the
    engine is built: a mistake fails in a second, not after the workload ran."""
    from kvforge.config import MAX_BLOCK_SIZE

    check_int("--requests", args.requests, 1)
    num_long = _num_long_requests(args)
    if not 0 <= num_long < args.requests:
        raise ConfigError(f"--long-requests must lie in [0, --requests) = [0, {args.requests}), got {num_long}")
    check_int("--max-tokens", args.max_tokens, 1)
    check_int("--max-num-seqs", args.max_num_seqs, 1)
    check_int("--block-size", args.block_size, 1, MAX_BLOCK_SIZE)
    check_int("--seed", args.seed, 0)
    check_bytes("--kv-memory", args.kv_memory)
    require("matplotlib", "plot", "the demo's block maps need matplotlib")
    if args.model:  # the built-in model has random weights and token-id prompts: no extra
        require("safetensors", "engine", "--model needs safetensors to load the checkpoint")
    check_out_dir("--out", args.out)


class _PeakWatch:
    """The cache at its peak use: the block map and memory profile taken when the
    pool's peak (``peak_allocations``) last rose.

    The peak is reached inside a step, after the scheduler reserved the step's
    blocks and before finished sequences are freed; a look between steps sees
    it only when nothing finished. So the watch looks right after each
    ``schedule()`` (it wraps the engine's scheduler) and between steps."""

    def __init__(self, engine: Any, plot: Any) -> None:
        self.cache, self.plot = engine.cache, plot
        self.peak = -1
        self.snapshot: Any = None
        self.profile: Any = None
        schedule = engine.scheduler.schedule

        def schedule_and_look() -> Any:
            out = schedule()
            self.look()
            return out

        engine.scheduler.schedule = schedule_and_look

    def look(self) -> None:
        peak = self.cache.pool.stats.peak_allocations
        if peak > self.peak:
            self.peak, self.snapshot, self.profile = peak, self.plot.block_map_of(self.cache), self.cache.memory_profile()


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    _check_args(args)
    num_long = _num_long_requests(args)
    import torch

    from kvforge.config import format_bytes
    from kvforge.tools import plot
    from kvforge.tools.output import Progress, format_table
    from kvforge.engine import Engine, SamplingParams

    out_dir = Path(args.out)
    opts = dict(block_size=args.block_size, enable_compaction=True, seed=args.seed,
                max_num_seqs=args.max_num_seqs)
    if args.model:
        engine = Engine(args.model, kv_memory=args.kv_memory, device=args.device, **opts)
    else:
        dtype = None if args.device == "cpu" or not torch.cuda.is_available() else torch.bfloat16
        # the built-in model's matrices are tiny: one CPU thread beats several that contend
        torch.set_num_threads(1)
        engine = Engine.from_config(DEMO_MODEL, kv_memory=args.kv_memory, device=args.device, dtype=dtype, **opts)
    cache = engine.cache
    mc = engine.model_config
    print(f"kvforge demo: {mc.architecture} ({mc.num_layers} layers, hidden {mc.hidden_size}) on {engine.device}, "
          f"{str(engine.dtype).removeprefix('torch.')}")
    print(f"KV cache: {cache.config.num_blocks} blocks of {cache.config.block_size} tokens, "
          f"{format_bytes(cache.storage_bytes)} in {cache.num_chunks} chunks")
    prompts = demo_prompts(args.requests, mc.vocab_size, args.seed)
    short = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    long = SamplingParams(max_tokens=4 * args.max_tokens, ignore_eos=True)
    # a few long conversations join mid-queue: they outlive the rest, scattered over the pool
    middle = (args.requests - num_long) // 2
    for i, p in enumerate(prompts):
        engine.add_request(p, long if middle <= i < middle + num_long else short)
    progress = Progress("demo", len(prompts), enabled=not args.quiet)
    start = time.perf_counter()
    done = tokens = compactions = moved = 0
    released = 0
    peak = _PeakWatch(engine, plot)
    maps = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens += len(o.outputs[0].new_token_ids)
            done += int(o.finished)
        peak.look()
        if cache.should_compact():
            before = cache.stats.total_blocks_moved
            released += cache.compact_cache()
            compactions += 1
            moved += cache.stats.total_blocks_moved - before
        if maps is None and done >= args.requests - num_long and engine.has_unfinished_requests():
            # only the long conversations remain: drop the idle cached prefixes and pack the pool
            cache.reclaim_unused_blocks()
            maps = plot.compaction_maps(cache, out_dir / "compaction")
            compactions += 1
            moved += maps.blocks_moved
            released += maps.bytes_returned
        if progress.due() or not engine.has_unfinished_requests():
            rate = tokens / max(1e-9, time.perf_counter() - start)
            progress.update(done, note=f"{rate:.0f} tok/s")
    elapsed = time.perf_counter() - start
    progress.close()
    st = engine.stats()
    rows = [
        ["requests", len(prompts)], ["generated tokens", st.num_generated_tokens],
        ["prompt tokens computed", st.num_prompt_tokens_computed], ["wall time (s)", round(elapsed, 2)],
        ["output tokens/s", round(st.num_generated_tokens / elapsed, 1)],
        ["max concurrent sequences", st.max_concurrent_seqs], ["preemptions", st.num_preemptions],
        ["prefix hit rate", f"{st.prefix_hit_rate:.1%}"], ["prefix hit tokens", st.prefix_hit_tokens],
        ["peak blocks in use", st.peak_used_blocks],
        ["compactions during the run", compactions], ["blocks moved / bytes returned", f"{moved} / {format_bytes(released)}"],
    ]
    print(format_table(["metric", "value"], rows))
    print()
    if peak.profile is not None:
        print("at peak use:")
        peak.profile.report()
        print()
    print("now (all requests finished; their prompts stay cached):")
    cache.memory_profile().report()
    paths = []
    if peak.snapshot is not None:
        paths.append(plot.block_map(None, out_dir / "block_map_peak.png", title="block map at peak use",
                                    snapshot=peak.snapshot))
    if maps is not None:
        print()
        print(f"compaction with {num_long} long conversations left: {maps.blocks_moved} blocks moved, "
              f"{format_bytes(maps.bytes_returned)} returned to the device")
        paths += [maps.before, maps.after, maps.combined]
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvforge demo`` to the command line."""
    p = subparsers.add_parser(
        "demo", help="run the engine on a tiny model over a shared-prefix workload",
        description="The main job in about 15-20 s on two CPU cores: the engine runs a tiny built-in "
                    "Llama-shaped model (random weights) over requests that share four system prompts, "
                    "compacts the cache, prints throughput, prefix hits and the memory profile, and draws "
                    'block maps into --out (they need matplotlib: pip install "kvforge[plot]").')
    p.add_argument("--model", default=None,
                   help="a local Hugging Face checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--requests", type=int, default=96, help="requests in the workload")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    p.add_argument("--long-requests", type=int, default=None,
                   help="how many of the requests generate 4x --max-tokens (default: 4, at most a quarter of "
                        "--requests)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences running at once")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--kv-memory", default="8MiB", help="KV cache budget, e.g. 8MiB (small, so that memory matters)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the workload")
    p.add_argument("--out", default=os.path.join("out", "demo"), help="folder for the PNGs")
    p.add_argument("--quiet", action="store_true",
                   help="no progress display (on a terminal a bar, otherwise a line every 10 s)")
    p.set_defaults(func=run)
    return p
