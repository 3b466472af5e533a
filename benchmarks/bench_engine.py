"""kvforge's engine on a GPU, on the workload of ``baselines/hf_engine_baseline.py``.

A TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000) with random bf16 weights made by kvforge's
own model (no checkpoint); the baseline's seeded prompts (same generator,
same lognormal lengths, so the same token ids); exactly ``NEW`` tokens per
request with end-of-sequence disabled. Reports output tokens/s, time to
first token and inter-token latency (p50, p99), peak KV memory (blocks in
use x bytes per block, and the pool's allocation), and the most sequences
running at once; for 128 and 512 requests. Then the static comparison: the
KV bytes transformers' static padded batch of 128 needs (128 x (longest
prompt + NEW) tokens) given to kvforge as its whole cache, and the 512
requests run through it: how many sequences it holds at once.

Usage: ``python benchmarks/bench_engine.py [--requests 128 512] [--new-tokens 256] [--profile] [--json out.json]``.
``--kv-dtype auto fp8_e4m3`` runs the workload once per KV dtype in the same ``--kv-memory`` and reports fp8
against the model dtype: the blocks the budget gives, the most sequences running at once, tokens/s.
``--quick`` is a CPU smoke run (a tiny model, 8 short prompts).
``--model-impl transformers`` runs the same workload through the model's transformers implementation
(``LlamaForCausalLM``, transformers' own random initialisation) under kvforge's scheduler and cache.
``--profile`` adds decode-step times, graph replay times, and the host time of a decode step at full
batch: the step's wall time less the time it waits for the GPU (its one sync, the sampled tokens).
Run ``python benchmarks/baselines/hf_engine_baseline.py`` in the same call for the transformers numbers.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from common import TINY, TINYLLAMA, pct  # noqa: E402
try:  # the module whose `sample` the step loop calls (kvforge.engine.engine before the redesign)
    import kvforge.engine.step_loop as engine_module  # noqa: E402
except ImportError:  # pragma: no cover - the code before the redesign
    import kvforge.engine.engine as engine_module  # noqa: E402



def baseline_prompts(n: int) -> list[list[int]]:
    """The prompts of hf_engine_baseline.py, token for token."""
    rng = random.Random(0)
    return [[rng.randrange(1, 32000) for _ in range(max(16, min(1024, int(rng.lognormvariate(4.6, 0.9)))))]
            for _ in range(n)]



def run(engine: Engine, prompts: list[list[int]], new_tokens: int, profile: bool = False) -> dict[str, Any]:
    """Generate; return throughput, latencies and memory of this run alone.

    The prefix cache is emptied first, so that no run reuses another's prompts."""
    cache = engine.cache
    cache.reclaim_unused_blocks()
    before = engine.stats()
    peak = {"blocks": 0, "running": 0}
    steps: list[tuple[float, int, bool, float]] = []
    last = [time.perf_counter(), engine.stats().num_decode_steps]
    waits: list[float] = []  # --profile: each step's wait for the GPU, added by timed_sample below

    def on_step(e: Engine) -> None:
        peak["blocks"] = max(peak["blocks"], cache.pool.num_allocated_blocks)
        peak["running"] = max(peak["running"], len(e.scheduler.running))
        if profile:
            now = time.perf_counter()
            dec = e._counters["decode_steps"]
            steps.append((now - last[0], len(e.scheduler.running), dec != last[1], sum(waits)))
            waits.clear()
            last[0], last[1] = now, dec

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    # --profile: the time each step waits for the GPU (the sampled tokens' read-back, the
    # step's one sync); the rest of the step's wall time is host work
    sample = engine_module.sample
    if profile:
        def timed_sample(*a: Any, **k: Any) -> Any:
            out = sample(*a, **k)
            t = time.perf_counter()
            torch.cuda.synchronize()
            waits.append(time.perf_counter() - t)
            return out
        engine_module.sample = timed_sample
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        outs = engine.generate(prompts, params, on_step=on_step)
    finally:
        engine_module.sample = sample
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    assert all(len(o.token_ids) == new_tokens for o in outs), "every request must get exactly NEW tokens"
    ttft = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    itl = [g for o in outs for g in o.metrics.inter_token_latencies]
    res = dict(requests=len(prompts), tokens=tokens, seconds=wall, tok_per_s=tokens / wall,
               ttft_p50_ms=1e3 * pct(ttft, 50), ttft_p99_ms=1e3 * pct(ttft, 99),
               itl_p50_ms=1e3 * pct(itl, 50), itl_p99_ms=1e3 * pct(itl, 99),
               peak_kv_bytes=peak["blocks"] * cache.config.bytes_per_block, pool_bytes=cache.storage_bytes,
               max_concurrent=peak["running"], num_blocks=cache.config.num_blocks,
               preemptions=engine.stats().num_preemptions - before.num_preemptions,
               prefix_hit_tokens=engine.stats().prefix_hit_tokens - before.prefix_hit_tokens)
    if profile and steps:
        dec = [s for s in steps if s[2]]
        pre = [s for s in steps if not s[2]]
        res["decode_steps"] = len(dec)
        res["decode_step_ms_mean"] = 1e3 * statistics.fmean(s[0] for s in dec) if dec else None
        # host time of decode steps at full batch (every request running)
        full = [s[0] - s[3] for s in steps if s[2] and s[1] == len(prompts)]
        res["decode_host_ms_p50_full_batch"] = 1e3 * pct(full, 50) if full else None
        res["decode_host_ms_mean_full_batch"] = 1e3 * statistics.fmean(full) if full else None
        res["decode_steps_full_batch"] = len(full)
        res["prefill_steps"] = len(pre)
        res["prefill_time_s"] = sum(s[0] for s in pre)
    return res


def replay_ms(engine: Engine, batch: int, iters: int = 50) -> float | None:
    """GPU time of one captured decode step of ``batch`` (replays back to back)."""
    graphs = engine.runner.graphs
    if graphs is None or batch not in graphs._graphs:
        return None
    g = graphs._graphs[batch][0]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        g.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=None, help="default 128 512 (--quick: 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (--quick: 8)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-memory", default=None, help="KV cache of the main runs (default 24GiB; --quick: 256KiB)")
    ap.add_argument("--kv-dtype", nargs="+", default=["auto"], metavar="DTYPE",
                    help="KV cache dtypes to run in turn, each in the same --kv-memory (auto = the model dtype; "
                         "e.g. --kv-dtype auto fp8_e4m3 reports fp8 against bf16)")
    ap.add_argument("--quick", action="store_true",
                    help="a CPU smoke run: a tiny random model (common.TINY), 8 prompts of at most 256 tokens, "
                         "8 new tokens, 256 KiB of KV")
    ap.add_argument("--no-static-compare", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-step timings and graph replay times")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="also run each workload with EngineConfig(async_scheduling=True) beside the synchronous "
                         "engine (same model, same memory) and print the ratios")
    ap.add_argument("--model-impl", choices=("native", "transformers"), default="native",
                    help="kvforge's own decoder, or the transformers model under kvforge's engine")
    args = ap.parse_args()
    quick = args.quick
    requests = args.requests or ([8] if quick else [128, 512])
    new_tokens = args.new_tokens or (8 if quick else 256)
    kv_memory = args.kv_memory or ("256KiB" if quick else "24GiB")
    cuda = torch.cuda.is_available()
    if not cuda and not quick:
        sys.exit("bench_engine.py needs a CUDA GPU (or --quick for a CPU smoke run)")
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    shape = TINY if quick else TINYLLAMA
    dtype = "bfloat16" if cuda else "float32"
    vocab = shape["vocab_size"]
    most = max(requests)
    prompts = baseline_prompts(most)
    if quick:
        prompts = [[t % vocab for t in p[:256]] for p in prompts]
    warm = [[(t + 7) % vocab for t in p] for p in prompts]  # same lengths (same kernel variants), other ids
    options = dict(block_size=args.block_size, max_num_seqs=most, max_model_len=2048,
                   max_num_batched_tokens=args.max_num_batched_tokens)
    results: dict[str, Any] = dict(device=dev_name, torch=torch.__version__, new_tokens=new_tokens,
                                   kv_memory=kv_memory, runs=[])
    model = None
    header = (f"{'kv dtype':>13} {'requests':>8} {'tokens':>8} {'tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} "
              f"{'p99':>7} {'peak KV':>8} {'blocks':>7} {'max conc':>8}")
    by_dtype: dict[str, list[dict[str, Any]]] = {}
    for i, kv_dtype in enumerate(args.kv_dtype):
        t = time.perf_counter()
        if model is None:
            engine = Engine.from_config(shape, dtype=dtype, device="cuda" if cuda else "cpu", kv_memory=kv_memory,
                                        model_impl=args.model_impl, kv_dtype=kv_dtype, **options)
            model = engine.model
        else:
            engine = Engine.from_model(model, kv_memory=kv_memory, kv_dtype=kv_dtype, **options)
        setup_s = time.perf_counter() - t
        ccfg = engine.cache.config
        name = str(ccfg.dtype).removeprefix("torch.")
        num_graphs = len(engine.config.graph_sizes()) if engine.runner.graphs is not None else 0
        print(f"# {dev_name} torch {torch.__version__} | kvforge engine ({engine.model_impl} model), "
              f"{'tiny' if quick else 'TinyLlama-1.1B'} shape, random {dtype} weights | KV {name} | new={new_tokens} | "
              f"setup (weights + KV pool + {num_graphs} decode graphs) {setup_s:.1f} s | KV pool "
              f"{engine.cache.storage_bytes / 2**30:.3f} GiB: {ccfg.num_blocks} blocks of {args.block_size} tokens "
              f"({ccfg.bytes_per_token} bytes a token)")
        t = time.perf_counter()
        for n in sorted(set(requests)):
            engine.generate(warm[:n], SamplingParams(max_tokens=4, ignore_eos=True))
        print(f"# warm-up (Triton JIT) {time.perf_counter() - t:.1f} s")
        if args.profile and cuda:
            results.setdefault("replay_ms", {})[name] = {b: replay_ms(engine, b) for b in (1, 32, 64, 128, 256, 512)}
            print("graph replay ms:", {b: round(v, 3) for b, v in results["replay_ms"][name].items() if v is not None})
        print(header)
        for n in requests:
            r = run(engine, prompts[:n], new_tokens, profile=args.profile and cuda)
            r.update(kv_dtype=name, bytes_per_token=ccfg.bytes_per_token)
            results["runs"].append(r)
            by_dtype.setdefault(name, []).append(r)
            print(f"{name:>13} {n:>8} {r['tokens']:>8} {r['tok_per_s']:>9.0f} {r['ttft_p50_ms']:>7.0f}ms "
                  f"{r['ttft_p99_ms']:>6.0f}ms {r['itl_p50_ms']:>6.2f}ms {r['itl_p99_ms']:>5.1f}ms "
                  f"{r['peak_kv_bytes'] / 2**30:>6.2f}G {r['num_blocks']:>7} {r['max_concurrent']:>8}"
                  + (f"  | {r.get('decode_steps')} decode steps, {r.get('decode_step_ms_mean', 0):.2f} ms each; "
                     f"{r.get('prefill_steps')} prefill steps, {r.get('prefill_time_s', 0):.2f} s; host per decode "
                     f"step at batch {n}: p50 {r.get('decode_host_ms_p50_full_batch') or 0:.3f} ms over "
                     f"{r.get('decode_steps_full_batch')} steps" if args.profile and cuda else ""))
        if args.async_scheduling:
            overlap = Engine.from_model(engine.model, kv_memory=kv_memory, kv_dtype=kv_dtype, async_scheduling=True,
                                        **options)
            for n in sorted(set(requests)):
                overlap.generate(warm[:n], SamplingParams(max_tokens=4, ignore_eos=True))
            sync_runs = {r["requests"]: r for r in by_dtype[name]}
            for n in requests:
                r = run(overlap, prompts[:n], new_tokens)
                r.update(kv_dtype=name + "+async", bytes_per_token=ccfg.bytes_per_token,
                         overlapped_steps=overlap.stats().num_overlapped_steps)
                results["runs"].append(r)
                base = sync_runs[n]
                print(f"{name + '+async':>13} {n:>8} {r['tokens']:>8} {r['tok_per_s']:>9.0f} {r['ttft_p50_ms']:>7.0f}ms "
                      f"{r['ttft_p99_ms']:>6.0f}ms {r['itl_p50_ms']:>6.2f}ms {r['itl_p99_ms']:>5.1f}ms "
                      f"{r['peak_kv_bytes'] / 2**30:>6.2f}G {r['num_blocks']:>7} {r['max_concurrent']:>8}"
                      f"  | against the synchronous engine: {r['tok_per_s'] / base['tok_per_s']:.2f}x tok/s, "
                      f"ITL p50 {r['itl_p50_ms'] / base['itl_p50_ms']:.2f}x")
            del overlap
        if i == 0 and not args.no_static_compare:
            results["static_compare"] = static_compare(engine, prompts, warm, most, new_tokens, args.block_size,
                                                       options)
        del engine
        if cuda:
            torch.cuda.empty_cache()
    if len(by_dtype) > 1:
        names = list(by_dtype)
        base = by_dtype[names[0]]
        print(f"# in the same {kv_memory} of KV memory, against {names[0]}:")
        for other in names[1:]:
            for a, b in zip(base, by_dtype[other]):
                line = (f"#   {other}, {a['requests']} requests: {b['num_blocks']} blocks vs {a['num_blocks']} "
                        f"({b['num_blocks'] / a['num_blocks']:.2f}x), most sequences at once {b['max_concurrent']} vs "
                        f"{a['max_concurrent']}, {b['tok_per_s']:.0f} vs {a['tok_per_s']:.0f} tok/s "
                        f"({b['tok_per_s'] / a['tok_per_s']:.2f}x), preemptions {b['preemptions']} vs "
                        f"{a['preemptions']}")
                print(line)
                results.setdefault("compare", []).append(dict(
                    kv_dtype=other, base=names[0], requests=a["requests"], blocks_ratio=b["num_blocks"] / a["num_blocks"],
                    max_concurrent=(b["max_concurrent"], a["max_concurrent"]), tok_per_s_ratio=b["tok_per_s"] / a["tok_per_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def static_compare(engine: Engine, prompts: list[list[int]], warm: list[list[int]], most: int, new_tokens: int,
                   block_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """The KV bytes transformers' static padded batch of 128 needs, given to kvforge as its whole
    cache (same KV dtype as ``engine``); every request run through it."""
    static_batch = min(128, most)
    ccfg = engine.cache.config
    longest = max(len(p) for p in prompts[:static_batch])
    static_bytes = static_batch * (longest + new_tokens) * ccfg.bytes_per_token
    blocks = static_bytes // ccfg.bytes_per_block
    tight = Engine.from_model(engine.model, num_blocks=blocks, kv_dtype=engine.config.kv_dtype, **options)
    tight.generate(warm[:most], SamplingParams(max_tokens=4, ignore_eos=True))
    r = run(tight, prompts[:most], new_tokens)
    r.update(static_batch=static_batch, static_kv_bytes=static_bytes, longest_prompt=longest)
    print(f"static padded batch of {static_batch} (longest prompt {longest} + {new_tokens}) needs "
          f"{static_bytes / 2**30:.3f} GiB of KV; kvforge with that as its whole cache ({blocks} blocks) ran "
          f"{most} requests holding up to {r['max_concurrent']} sequences at once, {r['tok_per_s']:.0f} tok/s, "
          f"{r['preemptions']} preemptions")
    return r


if __name__ == "__main__":
    main()
