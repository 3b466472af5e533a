"""The host tier on a GPU: block copies, a multi-turn chat workload, and swap against recompute.

Three sub-benchmarks (``--only copies,multiturn,preempt``; default all), each
printing one aligned table with its baseline from the same run and the ratio:

1. copies: ``HostStorage.to_host`` / ``to_device`` of n SCATTERED device blocks
   (random ids in a pool of ``--device-blocks``) to/from scattered host blocks,
   Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128, bf16, block 16: 2 MiB
   per block), timed from issue to ``synchronize_tiers()`` (median of
   ``--repeats``); baseline: one ``copy_(non_blocking=True)`` of the same bytes
   between a contiguous device tensor and a pinned host tensor. GB/s = 1e9
   bytes/s. Target: the tier at >= 80% of the plain copy.
2. multiturn: chats over a few shared system prompts; every conversation comes
   back turn after turn (its previous prompt + the answer + a new user message),
   turns queued round-robin behind every other conversation, at most
   ``--concurrency`` requests in flight (a closed loop). The device pool is sized
   so that the prefix working set is several times it; the same workload runs
   with the host tier (``host_memory``) and without. TTFT (submission to first
   token, per request), output tokens/s, prompt tokens computed, prefix hit rate
   on the device and on the host.
3. preempt: many long-ish sequences at once in a pool too small for them, so
   that running decodes are preempted: ``preemption_mode="swap"`` and ``"auto"``
   against ``"recompute"`` (all with the same host tier), and recompute without
   a host tier; tokens/s, preemptions, swaps, prompt tokens recomputed.

The engine runs the model of ``bench_engine.py``: a TinyLlama-1.1B-shaped Llama
with random bf16 weights. ``--quick``: tiny shapes and a tiny random model on the
CPU (a smoke run, well under 2 minutes).

Usage: ``PYTHONPATH=. python benchmarks/bench_tiers.py [--only copies|multiturn|preempt] [--quick] [--json out.json]``
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvforge import CacheConfig, KVCache  # noqa: E402
from kvforge.engine import Engine, EngineStats, SamplingParams  # noqa: E402
from kvforge.engine.model_config import ModelConfig  # noqa: E402
from kvforge.tools.output import Progress, format_table  # noqa: E402
from common import TINY, TINYLLAMA, git_commit, pct, ratio  # noqa: E402

SECTIONS = ("copies", "multiturn", "preempt")

#: --model llama-3-8b: the shape of Meta-Llama-3-8B (random bf16 weights): a prefill costs what it costs there
LLAMA3_8B = dict(TINYLLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
MODELS = {"tinyllama": TINYLLAMA, "llama-3-8b": LLAMA3_8B}

#: EngineStats fields of the host tier this script reads; a missing one is read elsewhere and named
_MISSING: dict[str, str] = {}


# ---------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stat(engine: Engine, s: EngineStats, name: str, fallback: Callable[[], Any]) -> Any:
    """``s.<name>``; while EngineStats lacks it, ``fallback()`` (and the name is reported)."""
    if hasattr(s, name):
        return getattr(s, name)
    _MISSING[name] = "read from the scheduler / cache instead"
    return fallback()


def tier_counters(engine: Engine) -> dict[str, int]:
    """The engine's host-tier and preemption counters now (for deltas)."""
    s = engine.stats()
    sch, cache = engine.scheduler, engine.cache
    host = stat(engine, s, "host", cache.host_stats) or cache.host_stats()  # None without a host tier: zeros
    return dict(
        preemptions=s.num_preemptions,
        swaps_out=stat(engine, s, "num_swaps_out", lambda: getattr(sch, "num_swaps_out", 0)),
        swaps_in=stat(engine, s, "num_swaps_in", lambda: getattr(sch, "num_swaps_in", 0)),
        recomputes=stat(engine, s, "num_recompute_preemptions", lambda: getattr(sch, "num_recomputes", 0)),
        host_hit_tokens=stat(engine, s, "prefix_host_hit_tokens", lambda: s.prefix.host_hit_tokens),
        hit_tokens=s.prefix.hit_tokens, query_tokens=s.prefix.query_tokens,
        prompt_computed=s.num_prompt_tokens_computed, generated=s.num_generated_tokens,
        spilled=host.spilled_blocks, onboarded=host.onboarded_blocks, dropped=host.dropped_blocks,
    )


class Profiled:
    """``with Profiled(label, on):`` cProfile of the block, its top 20 functions by own time
    printed after (``--profile``); nothing when off."""

    def __init__(self, label: str, on: bool) -> None:
        self.label, self.prof = label, None
        if on:
            import cProfile
            self.prof = cProfile.Profile()

    def __enter__(self) -> None:
        if self.prof is not None:
            self.prof.enable()

    def __exit__(self, *exc: object) -> None:
        if self.prof is not None:
            import pstats
            self.prof.disable()
            print(f"\n### cProfile: {self.label}")
            pstats.Stats(self.prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def model_shape(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf(hf)


def bytes_per_block(hf: dict[str, Any], block_size: int, dtype_bytes: int) -> int:
    m = model_shape(hf)
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype_bytes * block_size


def shifted(tokens: Sequence[int], k: int, vocab: int) -> list[int]:
    """``tokens`` moved to other ids in [1, vocab) (``k`` = 0: unchanged): the same lengths,
    no prefix in common with another ``k``."""
    return [(t - 1 + k * 7919) % (vocab - 1) + 1 for t in tokens] if k else list(tokens)


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of least wall time (other load on the machine only adds time), with every wall time."""
    return dict(min(runs, key=lambda r: r["seconds"]), all_seconds=[r["seconds"] for r in runs])


def walls(r: dict[str, Any]) -> str:
    return "/".join(f"{w:.2f}" for w in r["all_seconds"])


def release_memory() -> None:
    """Let a dropped engine's cache, graphs and pinned memory go before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def preallocate_host(engine: Engine) -> float:
    """Allocate every pinned chunk of the host tier now (as a server does once, at startup),
    so that a timed run does not pay for pinning; return the seconds it took.

    Writes device block 0 into the last host block of each chunk: those blocks are free in
    the tier's bookkeeping, so what they hold is never read."""
    hs = engine.cache.host_storage
    if hs is None:
        return 0.0
    t = time.perf_counter()
    last = list(range(hs.chunk_blocks - 1, hs.num_blocks, hs.chunk_blocks)) + [hs.num_blocks - 1]
    hs.to_host([(0, h) for h in sorted(set(last))])
    engine.cache.synchronize_tiers()
    return time.perf_counter() - t


# ---------------------------------------------------------------- 1. copies
def bench_copies(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    q = args.quick
    shape = dict(num_layers=2, num_kv_heads=2, head_dim=16) if q else dict(num_layers=32, num_kv_heads=8, head_dim=128)
    dtype = torch.float32 if q else torch.bfloat16
    probe = CacheConfig(block_size=16, num_blocks=1, dtype=dtype, **shape)
    bpb = probe.bytes_per_block
    sizes = sorted(args.copy_blocks or ([16, 64] if q else [64, 256, 1024]))
    dev_blocks = 256 if q else args.device_blocks
    host_blocks = 512 if q else parse_size(args.copy_host_memory) // bpb
    if max(sizes) > min(dev_blocks, host_blocks):
        sys.exit(f"copies: n={max(sizes)} exceeds the device pool ({dev_blocks}) or the host tier ({host_blocks})")
    cfg = CacheConfig(block_size=16, num_blocks=dev_blocks, dtype=dtype, device=str(device),
                      enable_prefix_caching=False, chunk_blocks=dev_blocks,  # one allocation, as the engine's
                      host_memory=host_blocks * bpb, **shape)
    t = time.perf_counter()
    cache = KVCache(cfg)
    hs = cache.host_storage
    assert hs is not None
    # warm: every pinned chunk and the staging buffer allocated before any timing
    preallocate = [(0, h) for h in range(hs.chunk_blocks - 1, host_blocks, hs.chunk_blocks)] + [(0, host_blocks - 1)]
    hs.to_host(sorted(set(preallocate)))
    cache.synchronize_tiers()
    pinned = device.type == "cuda"
    nmax = max(sizes) * bpb // dtype.itemsize
    plain_dev = torch.empty(nmax, dtype=dtype, device=device)
    plain_host = torch.empty(nmax, dtype=dtype, pin_memory=pinned)
    setup_s = time.perf_counter() - t
    print(f"\n## 1. copies: scattered blocks, {shape['num_layers']} layers, {shape['num_kv_heads']} KV heads, "
          f"head_dim {shape['head_dim']}, {str(dtype).removeprefix('torch.')}, block 16 "
          f"({bpb / 2**20:.3g} MiB per block); device pool {dev_blocks} blocks, host tier {host_blocks} blocks "
          f"({host_blocks * bpb / 2**30:.2f} GiB{', pinned' if pinned else ''}), staging {hs.staging_blocks} blocks; "
          f"median of {args.repeats} (setup {setup_s:.1f} s)\n")
    rng = random.Random(1)

    def timed(fn: Callable[[], None], finish: Callable[[], None]) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        finish()
        return time.perf_counter() - t0

    rows, out = [], []
    for n in sizes:
        nbytes = n * bpb
        pd, ph = plain_dev[: nbytes // dtype.itemsize], plain_host[: nbytes // dtype.itemsize]
        base = {
            "to_host": statistics.median(
                [timed(lambda: ph.copy_(pd, non_blocking=True), lambda: sync(device))
                 for _ in range(args.repeats + 1)][1:]),
            "to_device": statistics.median(
                [timed(lambda: pd.copy_(ph, non_blocking=True), lambda: sync(device))
                 for _ in range(args.repeats + 1)][1:]),
        }
        for layout in ("scattered", "consecutive"):
            samples: dict[str, list[float]] = {"to_host": [], "to_device": []}
            for r in range(args.repeats + 1):  # the first of each is a warm-up
                dev = rng.sample(range(dev_blocks), n)
                host = rng.sample(range(host_blocks), n) if layout == "scattered" else \
                    list(range(s := rng.randrange(host_blocks - n + 1), s + n))
                pairs_out = list(zip(dev, host))
                pairs_in = list(zip(host, rng.sample(range(dev_blocks), n)))
                th = timed(lambda: hs.to_host(pairs_out), cache.synchronize_tiers)
                td = timed(lambda: hs.to_device(pairs_in), cache.synchronize_tiers)
                if r:
                    samples["to_host"].append(th)
                    samples["to_device"].append(td)
            for direction, what in (("to_host", "device -> host"), ("to_device", "host -> device")):
                tier_s, plain_s = statistics.median(samples[direction]), base[direction]
                tier_bw, plain_bw = nbytes / tier_s / 1e9, nbytes / plain_s / 1e9
                rec = dict(direction=direction, blocks=n, host_ids=layout, bytes=nbytes, tier_ms=1e3 * tier_s,
                           plain_ms=1e3 * plain_s, tier_gb_s=tier_bw, plain_gb_s=plain_bw, ratio=tier_bw / plain_bw)
                out.append(rec)
                rows.append([what, n, layout, f"{nbytes / 2**20:.4g}", f"{1e3 * tier_s:.2f}", f"{tier_bw:.1f}",
                             f"{1e3 * plain_s:.2f}", f"{plain_bw:.1f}", f"{rec['ratio']:.0%}",
                             "yes" if rec["ratio"] >= 0.8 else "NO"])
    print(format_table(["direction", "blocks", "host ids", "MiB", "tier ms", "tier GB/s", "plain ms",
                        "plain GB/s", "tier/plain", ">= 80%"], rows, align="lrlrrrrrrl"))
    print("\ntier: HostStorage.to_host/to_device of random device blocks (the device pool is layer-major: a "
          "block is 2 x layers strided pieces, gathered through the staging buffer) + synchronize_tiers(); "
          "plain: one contiguous copy_(non_blocking=True) of the same bytes + torch.cuda.synchronize(). "
          "'consecutive': the same scattered device blocks into one run of host ids.")
    del cache, plain_dev, plain_host
    release_memory()
    return dict(block_bytes=bpb, device_blocks=dev_blocks, host_blocks=host_blocks, rows=out)


def parse_size(text: str) -> int:
    from kvforge.units import parse_bytes
    return parse_bytes(text)


# ---------------------------------------------------------------- 2. multiturn
@dataclass
class Conversation:
    """One chat: its system prompt, then per turn a user message and an answer length."""

    system: int
    users: list[list[int]]
    answer_lens: list[int]
    history: list[int] = field(default_factory=list)  # the last prompt + its answer
    turn: int = 0


@dataclass(frozen=True)
class ChatWorkload:
    systems: list[list[int]]
    conversations: list[tuple[int, list[list[int]], list[int]]]
    turns: int

    def shifted(self, k: int, vocab: int) -> ChatWorkload:
        """The same conversations and lengths over other token ids (see :func:`shifted`)."""
        return ChatWorkload([shifted(t, k, vocab) for t in self.systems],
                            [(s, [shifted(u, k, vocab) for u in users], a) for s, users, a in self.conversations],
                            self.turns)

    def fresh(self) -> list[Conversation]:
        return [Conversation(s, u, a) for s, u, a in self.conversations]

    def prompt_len(self, c: int, turn: int) -> int:
        s, users, answers = self.conversations[c]
        return len(self.systems[s]) + sum(len(u) for u in users[: turn + 1]) + sum(answers[:turn])

    def working_set_tokens(self, turn: int) -> int:
        """Distinct prompt tokens the conversations' prompts of ``turn`` span together
        (each conversation's own history once, the system prompts once)."""
        sys_tokens = sum(len(s) for s in self.systems)
        return sys_tokens + sum(self.prompt_len(c, turn) - len(self.systems[self.conversations[c][0]])
                                for c in range(len(self.conversations)))


def chat_workload(seed: int, vocab: int, num_systems: int, system_len: int, num_convs: int, turns: int,
                  user_lens: tuple[int, int], answer_lens: tuple[int, int]) -> ChatWorkload:
    rng = random.Random(seed)
    systems = [[rng.randrange(1, vocab) for _ in range(system_len)] for _ in range(num_systems)]
    convs = []
    for c in range(num_convs):
        users = [[rng.randrange(1, vocab) for _ in range(rng.randint(*user_lens))] for _ in range(turns)]
        convs.append((c % num_systems, users, [rng.randint(*answer_lens) for _ in range(turns)]))
    return ChatWorkload(systems, convs, turns)


def run_chat(engine: Engine, wl: ChatWorkload, concurrency: int, label: str, show: bool,
             profile: bool = False) -> dict[str, Any]:
    """Drive the workload closed-loop: at most ``concurrency`` requests in flight; a finished
    turn queues the conversation's next turn at the back (round-robin)."""
    convs = wl.fresh()
    queue = deque(range(len(convs)))
    in_flight: dict[str, int] = {}
    ttft: list[float] = []
    ttft_return: list[float] = []
    total = len(convs) * wl.turns
    progress = Progress(f"multiturn {label}", total, enabled=show)
    before = tier_counters(engine)
    sync(engine.device)
    t0 = time.perf_counter()
    with Profiled(f"multiturn, {label}", profile):
        _chat_loop(engine, wl, convs, queue, in_flight, concurrency, ttft, ttft_return, progress)
    sync(engine.device)
    wall = time.perf_counter() - t0
    progress.close()
    done = sum(c.turn for c in convs)
    d = delta(tier_counters(engine), before)
    q = d["query_tokens"] or 1
    return dict(requests=done, seconds=wall, tokens=d["generated"], tok_per_s=d["generated"] / wall,
                ttft_p50_ms=1e3 * pct(ttft, 50), ttft_p99_ms=1e3 * pct(ttft, 99),
                ttft_return_p50_ms=1e3 * pct(ttft_return, 50), ttft_return_p99_ms=1e3 * pct(ttft_return, 99),
                prompt_tokens=sum(wl.prompt_len(c, t) for c in range(len(convs)) for t in range(wl.turns)),
                prompt_computed=d["prompt_computed"],
                device_hit_rate=(d["hit_tokens"] - d["host_hit_tokens"]) / q, host_hit_rate=d["host_hit_tokens"] / q,
                **{k: d[k] for k in ("preemptions", "swaps_out", "spilled", "onboarded", "dropped")})


def _chat_loop(engine: Engine, wl: ChatWorkload, convs: list[Conversation], queue: deque[int],
               in_flight: dict[str, int], concurrency: int, ttft: list[float], ttft_return: list[float],
               progress: Progress) -> None:
    done = 0
    while queue or in_flight:
        while queue and len(in_flight) < concurrency:
            c = queue.popleft()
            conv = convs[c]
            prompt = (list(wl.systems[conv.system]) if conv.turn == 0 else conv.history) + conv.users[conv.turn]
            conv.history = prompt
            params = SamplingParams(max_tokens=conv.answer_lens[conv.turn], ignore_eos=True)
            in_flight[engine.add_request(prompt, params)] = c
        for out in engine.step():
            if not out.finished:
                continue
            c = in_flight.pop(out.request_id)
            conv = convs[c]
            assert len(out.token_ids) == conv.answer_lens[conv.turn], "every turn must get its exact answer length"
            if out.metrics.ttft is not None:
                ttft.append(out.metrics.ttft)
                if conv.turn:
                    ttft_return.append(out.metrics.ttft)
            conv.history = conv.history + out.token_ids
            conv.turn += 1
            done += 1
            if conv.turn < wl.turns:
                queue.append(c)
        progress.update(done)


def bench_multiturn(args: argparse.Namespace, device: torch.device, model_box: dict[str, Any]) -> dict[str, Any]:
    q = args.quick
    hf = TINY if q else MODELS[args.model]
    dtype_bytes = 4 if q else 2
    bs = 16
    if q:
        wl = chat_workload(0, hf["vocab_size"], 2, 32, 16, 3, (8, 16), (4, 8))
        warm = chat_workload(1, hf["vocab_size"], 2, 32, 2, 2, (8, 16), (4, 8))
        concurrency = 2
    else:
        wl = chat_workload(0, hf["vocab_size"], args.systems, args.system_len, args.conversations, args.turns,
                           (100, 200), (32, 64))
        warm = chat_workload(1, hf["vocab_size"], args.systems, args.system_len, args.concurrency, 2,
                             (100, 200), (32, 64))
        concurrency = args.concurrency
    bpb = bytes_per_block(hf, bs, dtype_bytes)
    n = len(wl.conversations)
    final = wl.working_set_tokens(wl.turns - 1)
    longest = max(wl.prompt_len(c, wl.turns - 1) + wl.conversations[c][2][-1] for c in range(n))
    # the device pool: the working set of the returning turns (their mean) over --pool-ratio, but
    # room for the running sequences (concurrency of the longest, a quarter to spare) at least
    first_return = wl.working_set_tokens(1) if wl.turns > 1 else final
    mean_ws = statistics.fmean(wl.working_set_tokens(t) for t in range(1, wl.turns)) if wl.turns > 1 else final
    running_need = concurrency * -(-longest // bs) * 5 // 4
    pool = max(int(mean_ws / bs / args.pool_ratio), running_need)
    pool_tokens = pool * bs
    host_blocks = max(3 * pool, -(-final // bs) * 5 // 4)
    max_len = min(hf["max_position_embeddings"], -(-(longest + 16) // 256) * 256)
    print(f"\n## 2. multiturn: {len(wl.systems)} system prompts of {len(wl.systems[0])} tokens, {n} conversations x "
          f"{wl.turns} turns (user {min(len(u) for _, us, _ in wl.conversations for u in us)}-"
          f"{max(len(u) for _, us, _ in wl.conversations for u in us)} tokens, answers "
          f"{min(a for _, _, a_ in wl.conversations for a in a_)}-{max(a for _, _, a_ in wl.conversations for a in a_)}"
          f"), round-robin, {concurrency} in flight; {model_label(q, args.model)}")
    print(f"prefix working set {final:,} tokens at the last turn ({final * bpb / bs / 2**30:.2f} GiB), "
          f"{mean_ws:,.0f} mean over the returning turns, {first_return:,} at the first return; "
          f"device pool {pool} blocks = {pool_tokens:,} tokens ({pool * bpb / 2**30:.2f} GiB): "
          f"working set / device pool = {final / pool_tokens:.1f}x (last turn), {mean_ws / pool_tokens:.1f}x (mean), "
          f"{first_return / pool_tokens:.1f}x (first return); host tier {host_blocks} blocks "
          f"({host_blocks * bpb / 2**30:.2f} GiB, {host_blocks / pool:.1f}x the device pool)\n")
    opts = dict(num_blocks=pool, block_size=bs, max_num_seqs=concurrency, max_model_len=max_len,
                max_num_batched_tokens=args.max_num_batched_tokens)
    results: dict[str, Any] = dict(working_set_tokens=final, working_set_mean_tokens=mean_ws, pool_blocks=pool,
                                   host_blocks=host_blocks, block_bytes=bpb, runs={})
    engines: dict[str, Engine] = {}
    for name, host in (("without host tier", 0), ("with host tier", host_blocks * bpb)):
        engine = engines[name] = build_engine(model_box, hf, device, q, host_memory=host, **opts)
        pin_s = preallocate_host(engine)
        t = time.perf_counter()
        run_chat(engine, warm, concurrency, f"{name} (warm-up)", show=False)  # Triton JIT, graphs, allocator
        print(f"# {name}: warm-up {time.perf_counter() - t:.1f} s" +
              (f", host tier pinned in {pin_s:.1f} s" if host else ""))
    # runs interleaved (A B A B), each over other token ids, so that drift hits both alike
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for rep in range(args.runs):
        wl_rep = wl.shifted(rep, hf["vocab_size"])
        for name, engine in engines.items():
            engine.cache.reclaim_unused_blocks()  # no prefix of an earlier run on the device
            runs[name].append(run_chat(engine, wl_rep, concurrency, f"{name}, run {rep + 1}",
                                       show=not args.no_progress, profile=args.profile))
    results["runs"] = {name: best_run(r) for name, r in runs.items()}
    del engine
    engines.clear()
    release_memory()
    base, tier = results["runs"]["without host tier"], results["runs"]["with host tier"]
    rows = []
    spec = [("TTFT p50 ms", "ttft_p50_ms", "{:.1f}", True), ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}", True),
            ("TTFT p50 ms, returning turns", "ttft_return_p50_ms", "{:.1f}", True),
            ("TTFT p99 ms, returning turns", "ttft_return_p99_ms", "{:.1f}", True),
            ("output tokens/s", "tok_per_s", "{:,.0f}", False), ("wall s (best run)", "seconds", "{:.2f}", True),
            ("prompt tokens computed", "prompt_computed", "{:,}", True),
            ("prefix hit rate, device", "device_hit_rate", "{:.1%}", None),
            ("prefix hit rate, host", "host_hit_rate", "{:.1%}", None),
            ("blocks spilled to host", "spilled", "{:,}", None), ("blocks onboarded from host", "onboarded", "{:,}", None),
            ("preemptions", "preemptions", "{:,}", None)]
    for label, key, fmt, lower_better in spec:
        a, b = tier[key], base[key]
        rows.append([label, fmt.format(b), fmt.format(a), ratio(a, b) if lower_better is not None else "-",
                     "" if lower_better is None else ("lower is better" if lower_better else "higher is better")])
    rows.append(["wall s, every run", walls(base), walls(tier), "-", ""])
    print(format_table(["metric", "without host tier", "with host tier", "with / without", ""], rows,
                       align="lrrrl"))
    print(f"\nthe best of {args.runs} interleaved runs (least wall time) per column; "
          f"prompt tokens submitted: {base['prompt_tokens']:,}; hit rates are prompt tokens found in the prefix "
          f"cache over prompt tokens looked up; TTFT from add_request to the first token.")
    return results


def model_label(quick: bool, model: str = "tinyllama") -> str:
    if quick:
        return "tiny random float32 Llama on the CPU"
    return ("TinyLlama-1.1B shape, random bf16 weights (the model of bench_engine.py)" if model == "tinyllama"
            else "Llama-3-8B shape, random bf16 weights")


def build_engine(model_box: dict[str, Any], hf: dict[str, Any], device: torch.device, quick: bool,
                 **opts: Any) -> Engine:
    """An engine on the shared model (built once, on the first call)."""
    if "model" not in model_box:
        t = time.perf_counter()
        e = Engine.from_config(hf, dtype="float32" if quick else "bfloat16", device=str(device), **opts)
        model_box["model"] = e.model
        print(f"# model built in {time.perf_counter() - t:.1f} s")
        return e
    return Engine.from_model(model_box["model"], **opts)


# ---------------------------------------------------------------- 3. preempt
def bench_preempt(args: argparse.Namespace, device: torch.device, model_box: dict[str, Any]) -> dict[str, Any]:
    q = args.quick
    hf = TINY if q else MODELS[args.model]
    dtype_bytes = 4 if q else 2
    bs = 16
    rng = random.Random(3)
    num, (lo, hi), new = (12, (24, 48), 32) if q else (args.preempt_requests, (384, 768), args.preempt_new_tokens)
    prompts = [[rng.randrange(1, hf["vocab_size"]) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    need_blocks = sum(-(-(len(p) + new) // bs) for p in prompts)
    longest = max(len(p) for p in prompts) + new
    pool = max(int(need_blocks * args.preempt_pool_share), 4 * -(-longest // bs))
    bpb = bytes_per_block(hf, bs, dtype_bytes)
    host_blocks = 2 * need_blocks
    max_len = -(-(longest + 16) // 256) * 256
    print(f"\n## 3. preempt: {num} requests at once, prompts {lo}-{hi} tokens, {new} new tokens each; "
          f"{model_label(q, args.model)}; all of them need {need_blocks} blocks at their longest, the device pool holds "
          f"{pool} ({pool / need_blocks:.0%}, {pool * bpb / 2**30:.2f} GiB); host tier {host_blocks} blocks "
          f"({host_blocks * bpb / 2**30:.2f} GiB)\n")
    opts = dict(num_blocks=pool, block_size=bs, max_num_seqs=num, max_model_len=max_len,
                max_num_batched_tokens=args.max_num_batched_tokens)
    configs = [("recompute", "recompute", host_blocks), ("swap", "swap", host_blocks), ("auto", "auto", host_blocks),
               ("recompute, no host tier", "recompute", 0)]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    results: dict[str, Any] = dict(pool_blocks=pool, need_blocks=need_blocks, host_blocks=host_blocks, runs={})
    engines: dict[str, Engine] = {}
    for name, mode, host in configs:
        engine = engines[name] = build_engine(model_box, hf, device, q, host_memory=host * bpb,
                                              preemption_mode=mode, **opts)
        preallocate_host(engine)
        # warm-up: the same lengths, other token ids, to the end (every kernel variant compiled and
        # every graph replayed before a timed run, whichever config runs first; auto's prefill rate)
        engine.generate([shifted(p, 1000, hf["vocab_size"]) for p in prompts], params)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for rep in range(args.runs):  # interleaved, each over other token ids
        rep_prompts = [shifted(p, rep, hf["vocab_size"]) for p in prompts]
        for (name, mode, host), engine in zip(configs, engines.values()):
            engine.cache.reclaim_unused_blocks()
            before = tier_counters(engine)
            sync(engine.device)
            t0 = time.perf_counter()
            with Profiled(f"preempt, {name}, run {rep + 1}", args.profile):
                outs = engine.generate(rep_prompts, params)
            sync(engine.device)
            wall = time.perf_counter() - t0
            d = delta(tier_counters(engine), before)
            assert all(len(o.token_ids) == new for o in outs), "every request must get exactly NEW tokens"
            itl = [g for o in outs for g in o.metrics.inter_token_latencies]
            runs[name].append(dict(
                mode=mode, host_blocks=host, seconds=wall, tokens=d["generated"], tok_per_s=d["generated"] / wall,
                recomputed_tokens=d["prompt_computed"] - sum(len(p) for p in prompts), itl_p99_ms=1e3 * pct(itl, 99),
                **{k: d[k] for k in ("preemptions", "swaps_out", "swaps_in", "recomputes")}))
    results["runs"] = {name: best_run(r) for name, r in runs.items()}
    del engine
    engines.clear()
    release_memory()
    base = results["runs"]["recompute"]
    rows = [[name, f"{r['tok_per_s']:,.0f}", ratio(r["tok_per_s"], base["tok_per_s"]), walls(r),
             f"{r['itl_p99_ms']:.1f}", r["preemptions"], r["swaps_out"], r["swaps_in"], r["recomputes"],
             f"{r['recomputed_tokens']:,}"] for name, r in results["runs"].items()]
    print(format_table(["preemption_mode", "tok/s", "vs recompute", "wall s, every run", "ITL p99 ms", "preemptions",
                        "swaps out", "swaps in", "recompute preempt.", "prompt tokens recomputed"], rows,
                       align="lrrrrrrrrr"))
    print(f"\nthe best of {args.runs} interleaved runs (least wall time) per row; "
          "baseline: 'recompute' with the same host tier (its evicted prefixes may still come back from the "
          "host); 'recompute, no host tier' is the engine without one. Prompt tokens recomputed: prompt tokens "
          "computed beyond the prompts themselves (prefix hits excluded).")
    return results


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: copies, multiturn, preempt")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run")
    ap.add_argument("--model", choices=sorted(MODELS), default="tinyllama",
                    help="multiturn, preempt: the model shape (random bf16 weights)")
    ap.add_argument("--repeats", type=int, default=7, help="copies: timed repeats (median)")
    ap.add_argument("--runs", type=int, default=2, help="multiturn, preempt: interleaved runs of each config (best)")
    ap.add_argument("--copy-blocks", type=int, nargs="+", help="copies: blocks per copy (default 64 256 1024)")
    ap.add_argument("--device-blocks", type=int, default=4096, help="copies: device pool (blocks of 2 MiB)")
    ap.add_argument("--copy-host-memory", default="4GiB", help="copies: host tier budget")
    ap.add_argument("--systems", type=int, default=4, help="multiturn: shared system prompts")
    ap.add_argument("--system-len", type=int, default=1024, help="multiturn: tokens per system prompt")
    ap.add_argument("--conversations", type=int, default=192, help="multiturn: conversations")
    ap.add_argument("--turns", type=int, default=8, help="multiturn: turns per conversation")
    ap.add_argument("--concurrency", type=int, default=16, help="multiturn: requests in flight")
    ap.add_argument("--pool-ratio", type=float, default=3.0,
                    help="multiturn: prefix working set (mean over the returning turns) over the device pool")
    ap.add_argument("--preempt-requests", type=int, default=128, help="preempt: requests, all submitted at once")
    ap.add_argument("--preempt-new-tokens", type=int, default=512, help="preempt: tokens generated per request")
    ap.add_argument("--preempt-pool-share", type=float, default=0.35,
                    help="preempt: device pool over the blocks all requests need at their longest")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile of every timed engine run (top 20, own time)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    if args.quick:
        device = torch.device("cpu")
        args.repeats = min(args.repeats, 3)
        # tiny matrices: one thread (several spin against each other on a small, shared machine: 15x slower)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_tiers.py needs a CUDA GPU (or --quick for a CPU smoke run)")
        device = torch.device("cuda")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    commit = git_commit()
    print(f"# bench_tiers{' --quick' if args.quick else ''}: {dev_name}, torch {torch.__version__}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results: dict[str, Any] = dict(device=dev_name, torch=torch.__version__, commit=commit,
                                   date=time.strftime("%Y-%m-%d"), quick=args.quick)
    model_box: dict[str, Any] = {}
    start = time.perf_counter()
    benches = dict(copies=lambda: bench_copies(args, device), multiturn=lambda: bench_multiturn(args, device, model_box),
                   preempt=lambda: bench_preempt(args, device, model_box))
    for name in SECTIONS:
        if name in only:
            t = time.perf_counter()
            results[name] = benches[name]()
            print(f"\n# {name}: {time.perf_counter() - t:.1f} s")
    print(f"# total {time.perf_counter() - start:.1f} s")
    if _MISSING:
        print(f"# note: EngineStats has no {', '.join(sorted(_MISSING))} yet; read from the scheduler / cache instead")
    results["missing_engine_stats"] = sorted(_MISSING)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"# results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
