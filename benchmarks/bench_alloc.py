"""CPU benchmarks of the bookkeeping layer: the pool per call, the block manager per
decode step, and prefix caching on a shared-prefix trace.

1. Per call: the shared continuous-batching trace (``../shared/bench/alloc_trace.py``)
   replayed through ``BlockPool.allocate`` / ``free``, beside a plain list-based
   ref-counted allocator and the replay loop alone, all in one harness loop.
   Block-ops/s = blocks allocated + blocks freed per second (best and median of
   several runs); per-call latency percentiles from a separate timed pass.
2. Per decode step: 256 running sequences with the trace's prompt/output length
   distributions; every step frees the finished sequences, admits new ones with
   their prompts, appends one token (with its id) to every running sequence and
   builds the slot mapping and the padded block-table array. Batched calls
   (``append_tokens_batch`` + ``block_table_array``), the same append followed by
   ``step_view`` (every input of the step: positions, slots, context lengths,
   tables, query offsets, input ids), and the per-call path (``append_token`` +
   ``block_table`` per sequence; ``append_token`` is a batch of one through the
   same append), prefix caching off and on.
3. Shared prefix: 10 system prompts of 512 tokens under 1,000 requests with
   unique 50-200-token suffixes: hit rate, admission cost, and the cost of
   ``PrefixIndex.block_keys`` per token.

Usage: python benchmarks/bench_alloc.py [--quick] [--only per-call,decode,prefix] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kvforge.core.manager import BlockManager  # noqa: E402
from kvforge.core.pool import BlockPool  # noqa: E402

#: vLLM 0.33 V1 BlockPool on this machine class (issue 2): the per-call floor.
VLLM_BLOCK_POOL_OPS = 3.76e6
#: vLLM 0.33 V1 KVCacheManager per decode step on this machine class (issues 2 and 5), microseconds.
VLLM_STEP_US = {False: (1750.0, 1870.0), True: (2060.0, 2320.0)}
TARGET_STEP_US = {False: 180.0, True: 210.0}


# ---------------------------------------------------------------- helpers
def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned text table; cells that read as numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def numeric(text: str) -> bool:
        t = text.rstrip("x%").replace(",", "").replace(" M", "").lstrip("<~")
        try:
            float(t)
            return True
        except ValueError:
            return False

    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for row in cells[1:]:
        lines.append("  ".join(c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_alloc_trace():
    """Import ``make_trace`` from ``<repo>/../shared/bench/alloc_trace.py``."""
    bench_dir = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
    path = os.path.join(bench_dir, "alloc_trace.py")
    if not os.path.isfile(path):
        sys.exit(f"bench_alloc: the shared allocation trace is missing: {path} not found "
                 f"(it lives next to the repository, in ../shared/bench/)")
    sys.path.insert(0, bench_dir)
    import alloc_trace  # type: ignore[import-not-found]
    return alloc_trace


# ------------------------------------------------------ 1. per-call replay
class ListAllocator:
    """The baseline: a plain free list (stack) and a ref-count list, no lock, no checks."""

    def __init__(self, num_blocks: int) -> None:
        self.free_ids = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks

    def allocate(self, n: int) -> list[int]:
        free = self.free_ids
        if n > len(free):
            raise MemoryError(f"{n} blocks asked, {len(free)} free")
        ids = free[len(free) - n:]
        del free[len(free) - n:]
        ref = self.ref
        for b in ids:
            ref[b] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        ref, free = self.ref, self.free_ids
        for b in ids:
            ref[b] -= 1
            if ref[b] == 0:
                free.append(b)


def replay(ops: list[tuple[int, int, int]], allocate: Callable, free: Callable, num_seqs: int) -> float:
    """The one harness loop, identical for every allocator. Returns seconds."""
    held: list = [None] * num_seqs
    t0 = time.perf_counter()
    for op, s, n in ops:
        if op:
            ids = allocate(n)
            h = held[s]
            if h is None:
                held[s] = ids
            else:
                h += ids
        else:
            free(held[s])
            held[s] = None
    return time.perf_counter() - t0


def replay_timed(ops: list[tuple[int, int, int]], allocate: Callable, free: Callable, num_seqs: int,
                 lat_alloc: list[int], lat_free: list[int]) -> None:
    """The same loop with a clock read around each call (latency, not throughput)."""
    held: list = [None] * num_seqs
    clock = time.perf_counter_ns
    la, lf = lat_alloc.append, lat_free.append
    for op, s, n in ops:
        if op:
            t = clock()
            ids = allocate(n)
            la(clock() - t)
            h = held[s]
            if h is None:
                held[s] = ids
            else:
                h += ids
        else:
            ids = held[s]
            t = clock()
            free(ids)
            lf(clock() - t)
            held[s] = None


def bench_per_call(runs: int) -> dict:
    alloc_trace = load_alloc_trace()
    raw = alloc_trace.make_trace()
    num_blocks = 20000  # make_trace's default pool size
    ops = [(1, op[1], op[2]) if op[0] == "a" else (0, op[1], 0) for op in raw]
    num_seqs = max(op[1] for op in ops) + 1
    # blocks allocated + blocks freed by the trace
    sizes = [0] * num_seqs
    block_ops = 0
    for op, s, n in ops:
        if op:
            sizes[s] += n
            block_ops += n
        else:
            block_ops += sizes[s]
            sizes[s] = 0
    null_alloc = [0].__mul__  # the loop alone: a builtin call returning a list of n

    def noop_allocate(n: int) -> list[int]:
        return [0] * n

    def noop_free(ids: list[int]) -> None:
        return None

    def make(name: str):
        if name == "BlockPool":
            p = BlockPool(num_blocks)
            return p.allocate, p.free, p
        if name == "list allocator":
            p = ListAllocator(num_blocks)
            return p.allocate, p.free, p
        if name == "loop + no-op Python functions":
            return noop_allocate, noop_free, None
        return null_alloc, len, None

    names = ["BlockPool", "list allocator", "loop + no-op Python functions", "loop alone"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(runs):
        for name in names:  # interleaved, so machine noise hits every row alike
            allocate, free, obj = make(name)
            gc.collect()
            times[name].append(replay(ops, allocate, free, num_seqs))
            if isinstance(obj, BlockPool):
                obj.check_invariants()
    lat: dict[str, tuple[list[int], list[int]]] = {}
    for name in names:
        allocate, free, _ = make(name)
        la: list[int] = []
        lf: list[int] = []
        gc.collect()
        replay_timed(ops, allocate, free, num_seqs, la, lf)
        lat[name] = (la, lf)
    clock = time.perf_counter_ns
    overhead = min(-(clock() - clock()) for _ in range(1000))  # b - a of two reads
    rows, result = [], {"trace_ops": len(ops), "block_ops": block_ops, "runs": runs, "rows": {}}
    loop_best = block_ops / min(times["loop alone"])
    for name in names:
        best = block_ops / min(times[name])
        med = block_ops / statistics.median(times[name])
        la, lf = lat[name]
        both = la + lf
        r = dict(best=best, median=med, p50_ns=percentile(both, 50), p99_ns=percentile(both, 99),
                 p99_alloc_ns=percentile(la, 99), p99_free_ns=percentile(lf, 99))
        result["rows"][name] = r
        rows.append([name, f"{best / 1e6:.2f}", f"{med / 1e6:.2f}", f"{best / VLLM_BLOCK_POOL_OPS:.2f}x",
                     f"{best / loop_best:.2f}", f"{r['p50_ns']:.0f}", f"{r['p99_ns']:.0f}",
                     f"{r['p99_alloc_ns']:.0f}", f"{r['p99_free_ns']:.0f}"])
    result["clock_overhead_ns"] = overhead
    print(f"\n## 1. Per call: shared trace replay ({len(ops):,} calls, {block_ops:,} block-ops, "
          f"best/median of {runs} runs)\n")
    print(fmt_table(["allocator", "best M ops/s", "median M ops/s", "vs vLLM floor 3.76M", "vs loop alone",
                     "p50 ns/call", "p99 ns/call", "p99 alloc", "p99 free"], rows))
    print(f"\nlatencies include one clock read (~{overhead:.0f} ns). 'loop alone' calls builtins ([0]*n, len) "
          f"in place of an allocator; 'no-op Python functions' is the floor for any allocator written in Python.")
    return result


# ---------------------------------------------------- 2. per decode step
class DecodeWorkload:
    """Requests with the trace's lognormal prompt/output lengths and random prompt ids."""

    def __init__(self, seed: int, vocab: int = 32000) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab

    def request(self) -> tuple[list[int], int]:
        rng = self.rng
        p = max(4, min(2048, int(rng.lognormvariate(4.6, 0.9))))
        o = max(4, min(2048, int(rng.lognormvariate(5.4, 0.8))))
        return [rng.randrange(self.vocab) for _ in range(p)], o


def run_decode(batched: bool, prefix: bool, warmup: int, steps: int, running: int = 256,
               block_size: int = 16, num_blocks: int = 20000, seed: int = 0, profiler=None,
               step_view: bool = False) -> dict:
    """Simulate ``warmup + steps`` decode steps; time (and profile) the last ``steps``.

    ``batched``: append_tokens_batch, then block_table_array (or, with
    ``step_view``, BlockManager.step_view); else the per-call path."""
    wl = DecodeWorkload(seed)
    total = warmup + steps
    # every request and sampled token is made before the clock starts
    requests = [wl.request() for _ in range(running + 3 * total // 2 + 64)]
    tok_rng = np.random.default_rng(seed)
    sampled = tok_rng.integers(0, wl.vocab, size=(total, running), dtype=np.int64)
    sampled_lists = sampled.tolist()
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    seq_ids: list[int] = []
    remaining = np.zeros(running, dtype=np.int64)
    next_req = 0
    for i in range(running):
        prompt, out = requests[next_req]
        bm.add_sequence(next_req, prompt)
        seq_ids.append(next_req)
        remaining[i] = out
        next_req += 1
    clock = time.perf_counter_ns
    samples: list[int] = []
    admitted = 0
    alloc_before = 0
    for step in range(total):
        if step == warmup:
            gc.collect()
            admitted = 0
            alloc_before = bm.pool.stats.total_allocations
            if profiler is not None:
                profiler.enable()
        t0 = clock()
        done = np.flatnonzero(remaining == 0)
        for i in done.tolist():
            bm.free_sequence(seq_ids[i])
            prompt, out = requests[next_req]
            bm.add_sequence(next_req, prompt)
            seq_ids[i] = next_req
            remaining[i] = out
            next_req += 1
        if batched and step_view:
            slot_mapping = bm.append_tokens_batch(seq_ids, 1, token_ids=sampled[step])
            block_tables = bm.step_view(seq_ids, 1).block_tables
        elif batched:
            slot_mapping = bm.append_tokens_batch(seq_ids, 1, token_ids=sampled[step])
            block_tables = bm.block_table_array(seq_ids)
        else:
            toks = sampled_lists[step]
            append_token, block_table = bm.append_token, bm.block_table
            slot_mapping = [append_token(s, t) for s, t in zip(seq_ids, toks)]
            block_tables = [block_table(s) for s in seq_ids]
        remaining -= 1
        t1 = clock()
        if step >= warmup:
            samples.append(t1 - t0)
            admitted += len(done)
        assert len(slot_mapping) == running and len(block_tables) == running
    if profiler is not None:
        profiler.disable()
    bm.check_invariants()
    us = np.asarray(samples, dtype=np.float64) / 1e3
    return dict(mean_us=float(us.mean()), p50_us=float(np.percentile(us, 50)), p99_us=float(np.percentile(us, 99)),
                steps=steps, admitted_per_step=admitted / steps,
                blocks_per_step=(bm.pool.stats.total_allocations - alloc_before) / steps,
                max_table_width=int(bm.block_table_array(seq_ids).shape[1]),
                prefix_hit_rate=bm.prefix.stats().hit_rate, evictions=bm.pool.stats.num_evictions)


def bench_decode(warmup: int, steps: int, per_call_steps: int, repeats: int) -> dict:
    results = {}
    rows = []
    paths = {"batched": (True, False), "batched + step_view": (True, True), "per-call": (False, False)}
    for prefix in (False, True):
        for path, (batched, view) in paths.items():
            name = f"{path}, prefix caching {'on' if prefix else 'off'}"
            # the run with the lowest mean of ``repeats`` (other load on the machine only adds time)
            r = min((run_decode(batched, prefix, warmup, steps if batched else per_call_steps, step_view=view)
                     for _ in range(repeats if batched else 1)), key=lambda x: x["mean_us"])
            r["repeats"] = repeats if batched else 1
            results[name] = r
            lo, hi = VLLM_STEP_US[prefix]
            target = TARGET_STEP_US[prefix]
            rows.append([name, f"{r['mean_us']:.1f}", f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
                         f"{r['mean_us'] / 256:.2f}", f"{lo / r['mean_us']:.1f}-{hi / r['mean_us']:.1f}x",
                         ("yes" if r["mean_us"] < target else "NO") if batched else "-",
                         f"{r['admitted_per_step']:.2f}", f"{r['blocks_per_step']:.1f}"])
    print(f"\n## 2. Per decode step: 256 running sequences, block size 16 ({warmup} warm-up steps, "
          f"{steps} timed batched (best of {repeats} runs) / {per_call_steps} per-call)\n")
    print(fmt_table(["path", "mean us", "p50 us", "p99 us", "us/seq", "vLLM V1 / this", "under target",
                     "admits/step", "blocks/step"], rows))
    print(f"\ntargets: < {TARGET_STEP_US[False]:.0f} us (prefix off), < {TARGET_STEP_US[True]:.0f} us (on); "
          f"vLLM V1 KVCacheManager: {VLLM_STEP_US[False][0] / 1e3:.2f}-{VLLM_STEP_US[False][1] / 1e3:.2f} ms off, "
          f"{VLLM_STEP_US[True][0] / 1e3:.2f}-{VLLM_STEP_US[True][1] / 1e3:.2f} ms on")
    return results


def profile_decode(prefix: bool, warmup: int, steps: int) -> None:
    """cProfile of the batched decode step (``--profile``)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    run_decode(True, prefix, warmup, steps, profiler=prof)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


# --------------------------------------------------- 3. shared prefix
def bench_prefix(num_requests: int, hash_tokens: int, runs: int) -> dict:
    rng = random.Random(2)
    vocab, bs, sys_len, num_sys = 32000, 16, 512, 10
    systems = [[rng.randrange(vocab) for _ in range(sys_len)] for _ in range(num_sys)]
    reqs = []
    for _ in range(num_requests):
        k = rng.randrange(num_sys)
        suffix = [rng.randrange(vocab) for _ in range(rng.randint(50, 200))]
        reqs.append((k, systems[k] + suffix))
    bm = BlockManager(4096, bs, enable_prefix_caching=True)
    live: list[int] = []
    max_live = 32
    seen: set[int] = set()
    ideal_hit = 0
    add_ns: list[int] = []
    clock = time.perf_counter_ns
    gc.collect()
    for i, (k, prompt) in enumerate(reqs):
        if k in seen:
            ideal_hit += (sys_len // bs) * bs
        seen.add(k)
        if len(live) == max_live:
            bm.free_sequence(live.pop(0))
        t = clock()
        bm.add_sequence(i, prompt)
        add_ns.append(clock() - t)
        bm.append_tokens(i, 8, token_ids=list(range(8)))  # a few decode tokens
        live.append(i)
    bm.check_invariants()
    st = bm.prefix.stats()
    total_tokens = sum(len(p) for _, p in reqs)
    # hashing cost: block_keys over many tokens (a list, as prompts arrive, and an int64 array)
    idx = bm.prefix
    flat = [rng.randrange(vocab) for _ in range(hash_tokens)]
    arr = np.asarray(flat, dtype=np.int64)
    best_list = min(_time(lambda: idx.block_keys(flat)) for _ in range(runs))
    best_arr = min(_time(lambda: idx.block_keys(arr)) for _ in range(runs))
    prompts = [p for _, p in reqs]
    best_req = min(_time(lambda: [idx.block_keys(p) for p in prompts]) for _ in range(runs))
    res = dict(requests=num_requests, prompt_tokens=total_tokens, hit_tokens=st.hit_tokens, hit_rate=st.hit_rate,
               ideal_hit_rate=ideal_hit / total_tokens, evictions=st.evictions,
               add_us_mean=statistics.fmean(add_ns) / 1e3, add_us_p99=percentile(add_ns, 99) / 1e3,
               add_ns_per_token=sum(add_ns) / total_tokens,
               hash_ns_per_token_list=best_list * 1e9 / hash_tokens,
               hash_ns_per_token_array=best_arr * 1e9 / hash_tokens,
               hash_ns_per_token_requests=best_req * 1e9 / total_tokens)
    print(f"\n## 3. Shared prefix: {num_sys} system prompts of {sys_len} tokens, {num_requests} requests "
          f"with unique 50-200-token suffixes (block size {bs}, {max_live} live, pool 4096 blocks)\n")
    print(fmt_table(["metric", "value"], [
        ["prompt tokens", f"{total_tokens:,}"],
        ["hit tokens", f"{st.hit_tokens:,}"],
        ["hit rate", f"{st.hit_rate:.4f}"],
        ["ideal hit rate (every repeated system prompt, whole)", f"{res['ideal_hit_rate']:.4f}"],
        ["evictions", f"{st.evictions:,}"],
        ["add_sequence mean us (hash + lookup + allocate + register)", f"{res['add_us_mean']:.1f}"],
        ["add_sequence p99 us", f"{res['add_us_p99']:.1f}"],
        ["add_sequence ns per prompt token", f"{res['add_ns_per_token']:.1f}"],
    ]))
    print()
    print(fmt_table(["block_keys input", "tokens", "ns/token", "vs vLLM SHA-256 100-200 ns"], [
        ["python list (one call)", f"{hash_tokens:,}", f"{res['hash_ns_per_token_list']:.1f}",
         f"{100 / res['hash_ns_per_token_list']:.1f}-{200 / res['hash_ns_per_token_list']:.1f}x"],
        ["int64 array (one call)", f"{hash_tokens:,}", f"{res['hash_ns_per_token_array']:.1f}",
         f"{100 / res['hash_ns_per_token_array']:.1f}-{200 / res['hash_ns_per_token_array']:.1f}x"],
        [f"the {num_requests} prompts (one call each)", f"{total_tokens:,}",
         f"{res['hash_ns_per_token_requests']:.1f}",
         f"{100 / res['hash_ns_per_token_requests']:.1f}-{200 / res['hash_ns_per_token_requests']:.1f}x"],
    ]))
    return res


def _time(fn: Callable[[], object]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs and steps (a smoke run, ~10 s)")
    ap.add_argument("--only", default="per-call,decode,prefix",
                    help="comma-separated sections: per-call, decode, prefix")
    ap.add_argument("--profile", action="store_true", help="also cProfile the batched decode step")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {"per-call", "decode", "prefix"}
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    q = args.quick
    print(f"# bench_alloc{' --quick' if q else ''}: {cpu_model()}, {num_cores()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    results: dict = {"cpu": cpu_model(), "cores": num_cores(), "python": platform.python_version(),
                     "numpy": np.__version__, "date": time.strftime("%Y-%m-%d"), "quick": q}
    if "per-call" in only:
        results["per_call"] = bench_per_call(runs=3 if q else 11)
    if "decode" in only:
        results["decode"] = bench_decode(warmup=200 if q else 600, steps=300 if q else 3000,
                                         per_call_steps=100 if q else 600, repeats=1 if q else 3)
        if args.profile:
            for prefix in (False, True):
                print(f"\n### cProfile, batched, prefix caching {'on' if prefix else 'off'}\n")
                profile_decode(prefix, 200, 1000)
    if "prefix" in only:
        results["prefix"] = bench_prefix(num_requests=1000, hash_tokens=1 << 18 if q else 1 << 20,
                                         runs=3 if q else 7)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
