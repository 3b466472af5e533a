"""The remote tier on Redis: tier throughput against a plain client, and prompt blocks shared by two engines.

Two sub-benchmarks (``--only throughput,sharing``; default both), each printing
one aligned table with its baseline from the same run and the ratio:

1. throughput: :class:`~kvforge.storage.redis_tier.RedisTier` ``publish`` of N
   blocks then ``flush()`` (framing, BLAKE2b checksum, pipelined ``SET`` on the
   writer thread), and ``fetch`` of the N keys (``MGET``, header and checksum
   checks), against a plain redis-py client writing the same payload bytes with
   pipelined ``SET`` and reading them with ``MGET``, in batches of the tier's
   ``batch_size``, on the same server in the same run. Block sizes: a
   TinyLlama-1.1B block (22 layers x 2 x 16 tokens x 4 KV heads x 64 x bf16 =
   352 KiB) and a Llama-3-8B block (2 MiB). GB/s = 1e9 payload bytes/s, median
   of ``--repeats`` (fresh keys each repeat, the database flushed between).
   The tier is timed with ``--tier-timeout`` as its timeout and fetch budget (its
   defaults, 0.25 s and 2 s, bound a fetch: the last column says how many of the N
   blocks a fetch with the defaults returns).
2. sharing: engine instances in spawned processes, the same config and seed
   (so the same identity and layout), over ``RedisTier`` namespaces unique to
   the run. Instance A serves a shared-prefix workload (a few long system
   prompts, each followed by distinct user messages) and flushes its tier;
   instance B then serves new user messages after the same system prompts plus
   some exact repeats of A's prompts, closed-loop (``--concurrency`` requests
   in flight), once with ``remote_fetch="auto"`` (fetch when the measured tier
   bandwidth beats the measured prefill rate) and once with ``"always"``, each
   over a namespace an A of its own filled. Baseline: B served by an instance
   without a remote tier (same workload). For B: prefix hit rate, remote hit
   tokens, fetches and declined fetches, prompt tokens computed, TTFT
   p50/p99 (all requests, and by kind). Outputs against the baseline: float32
   on the CPU must agree exactly (asserted); bf16 on a GPU is reported as
   greedy agreement (a block's KV rounds differently in A's batches than in
   B's own, and a random-weight model's logits are near ties; the bytes are
   checksummed and tests/gpu/test_remote_gpu.py checks them bit-exact).

Models (random weights, no checkpoint): ``--device cuda``: ``--sharing-model
tinyllama`` a TinyLlama-1.1B shape in bf16 (the model of bench_engine.py), or
``llama-405b-4l``, Llama-3.1-405B's layer shape with 4 layers (the most prefill
compute per byte of KV); the CPU: a moderate float32 Llama
(hidden 512, 6 layers: TTFT is dominated by prefill); ``--quick``: a tiny model
and tiny shapes on the CPU (a smoke run, well under a minute).

A redis-server is started on a free loopback port (``redis-server`` on PATH or
in /usr/bin) unless ``--url`` names one; the run's keys live in a namespace of
their own (deleted at the end when the server is ours).

Usage: ``PYTHONPATH=. python benchmarks/bench_remote.py [--only throughput|sharing] [--quick]
[--device cpu|cuda] [--sharing-model tinyllama|llama-405b-4l] [--url redis://host:port/0] [--json out.json]``
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvforge.tools.output import format_table  # noqa: E402
from common import TINY, TINYLLAMA, git_commit, pct, ratio  # noqa: E402

SECTIONS = ("throughput", "contention", "sharing")

#: the CPU default: big enough that a prompt's prefill dominates its TTFT, small enough for 2 cores
CPU_MODEL = dict(TINYLLAMA, vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4, torch_dtype="float32")

#: Llama-3.1-405B's layer shape with 4 of its 126 layers (17B parameters in bf16): the largest dense
#: models spend the most compute per byte of KV (6.4 GFLOP of prefill per token and layer, 4 KiB of
#: KV), so on a fast GPU their prompts are where fetching beats computing
LLAMA_405B_4L = dict(TINYLLAMA, vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=4,
                     num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=8192)
#: --sharing-model choices (the GPU's; the CPU runs CPU_MODEL, --quick TINY)
SHARING_MODELS = {"tinyllama": ("TinyLlama-1.1B shape", TINYLLAMA),
                  "llama-405b-4l": ("Llama-3.1-405B layer shape, 4 layers", LLAMA_405B_4L)}

#: block shapes of the throughput section: (label, layers, KV heads, head_dim, dtype bytes), block of 16 tokens
BLOCK_SHAPES = {"tinyllama": ("TinyLlama-1.1B", 22, 4, 64, 2), "llama-3-8b": ("Llama-3-8B", 32, 8, 128, 2)}
BLOCK_TOKENS = 16


# ---------------------------------------------------------------- helpers


def block_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int = BLOCK_TOKENS) -> int:
    return layers * 2 * block_size * kv_heads * head_dim * dtype_bytes


def model_block_bytes(hf: dict[str, Any], block_size: int) -> int:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return block_bytes(hf["num_hidden_layers"], hf["num_key_value_heads"], head_dim,
                       2 if hf["torch_dtype"] == "bfloat16" else 4, block_size)


class LocalRedis:
    """A ``redis-server`` on a free loopback port, its files in a temp dir, no persistence
    (the start logic of tests/redis_server.py, without its pytest dependency)."""

    FALLBACKS = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or next((p for p in self.FALLBACKS if os.access(p, os.X_OK)), None)
        if binary is None:
            sys.exit("bench_remote.py: redis-server is not installed (apt-get install -y redis-server), "
                     "or pass --url of a running server")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="kvforge-bench-redis-"))
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                sys.exit(f"bench_remote.py: redis-server exited with {self.process.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        sys.exit(f"bench_remote.py: redis-server on port {self.port} not ready after 10 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def plain_client(url: str) -> Any:
    import redis
    return redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=10)


def delete_namespace(client: Any, namespace: str) -> int:
    """Delete every key of ``kvforge:{namespace}:*`` and ``bench:{namespace}:*`` (SCAN, not KEYS)."""
    n = 0
    for pattern in (f"kvforge:{namespace}:*", f"bench:{namespace}:*"):
        batch = []
        for name in client.scan_iter(match=pattern, count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                n += client.delete(*batch)
                batch = []
        if batch:
            n += client.delete(*batch)
    return n


# ---------------------------------------------------------------- 1. throughput
def bench_throughput(args: argparse.Namespace, url: str, run_id: str) -> dict[str, Any]:
    import numpy as np

    from kvforge import RedisTier, RemoteLayout

    shapes = [BLOCK_SHAPES[s] for s in args.block_shapes]
    ns = sorted(args.num_blocks or ([16, 64] if args.quick else [64, 512]))
    repeats = args.repeats
    plain = plain_client(url)
    batch = RedisTier(url).batch_size  # the tier's default MGET / pipeline batch
    print(f"\n## 1. throughput: RedisTier publish+flush / fetch against plain redis-py pipelined SET / MGET of "
          f"the same payload bytes, batches of {batch} keys, one client connection each, server {url}; "
          f"median of {repeats} (fresh keys each repeat); tier timeout {args.tier_timeout:g} s\n")
    rows, results = [], []
    for label, layers, heads, head_dim, nbytes in shapes:
        bb = block_bytes(layers, heads, head_dim, nbytes)
        data = np.random.default_rng(0).bytes(max(ns) * bb)
        view = memoryview(data)
        for n in ns:
            payloads = [view[i * bb:(i + 1) * bb] for i in range(n)]
            total = n * bb
            layout = RemoteLayout(f"bench-throughput-{label}", "bfloat16", BLOCK_TOKENS, layers, heads, head_dim,
                                  0, 1, bb)
            ns_name = f"{run_id}-tput"
            tier = RedisTier(url, namespace=ns_name, timeout=args.tier_timeout, fetch_budget=args.tier_timeout,
                             batch_size=batch)
            tier.bind(layout)
            times: dict[str, list[float]] = {k: [] for k in ("tier_put", "tier_get", "plain_put", "plain_get")}
            default_got = -1
            for rep in range(repeats + 1):  # the first is a warm-up of 8 blocks (connections), not counted
                m = min(n, 8) if rep == 0 else n
                keys = [os.urandom(16) for _ in range(m)]
                names = [f"bench:{ns_name}:{k.hex()}".encode() for k in keys]
                these = payloads[:m]
                before = tier.stats()
                t = time.perf_counter()
                tier.publish(keys, lambda: these)
                ok = tier.flush(timeout=600)
                put = time.perf_counter() - t
                written = tier.stats().blocks_written - before.blocks_written
                assert ok and written == m, f"tier wrote {written} of {m} blocks ({tier.stats()})"
                t = time.perf_counter()
                got = tier.fetch(keys)
                get = time.perf_counter() - t
                assert len(got) == m and all(bytes(got[i][-64:]) == bytes(these[i][-64:]) for i in (0, m - 1)), \
                    f"tier fetch returned {len(got)} of {m} blocks ({tier.stats()})"
                del got
                if rep == 1:  # what a fetch with the tier's default timeout and budget returns
                    dflt = RedisTier(url, namespace=ns_name, batch_size=batch)
                    dflt.bind(layout)
                    default_got = len(dflt.fetch(keys))
                    dflt.close()
                t = time.perf_counter()
                for lo in range(0, m, batch):
                    pipe = plain.pipeline(transaction=False)
                    for i in range(lo, min(m, lo + batch)):
                        pipe.set(names[i], these[i])
                    pipe.execute()
                pput = time.perf_counter() - t
                t = time.perf_counter()
                pgot = 0
                for lo in range(0, m, batch):
                    values = plain.mget(names[lo:lo + batch])
                    pgot += sum(v is not None and len(v) == bb for v in values)
                    del values
                pget = time.perf_counter() - t
                assert pgot == m, f"plain MGET found {pgot} of {m} values"
                delete_namespace(plain, ns_name)  # keep the server's memory to one repeat's blocks
                if rep:
                    for k, v in zip(times, (put, get, pput, pget)):
                        times[k].append(v)
            tier.close()
            med = {k: statistics.median(v) for k, v in times.items()}
            gbs = {k: total / v / 1e9 for k, v in med.items()}
            r = dict(block=label, block_bytes=bb, num_blocks=n, payload_bytes=total, seconds=times,
                     median_s=med, gb_per_s=gbs, default_timeout_fetch_blocks=default_got)
            results.append(r)
            rows.append([label, f"{bb / 1024:,.0f} KiB", n, f"{total / 2**20:,.1f} MiB",
                         f"{gbs['tier_put']:.2f}", f"{gbs['plain_put']:.2f}", ratio(gbs["tier_put"], gbs["plain_put"]),
                         f"{gbs['tier_get']:.2f}", f"{gbs['plain_get']:.2f}", ratio(gbs["tier_get"], gbs["plain_get"]),
                         f"{default_got}/{n}"])
    plain.close()
    print(format_table(["block", "block bytes", "N", "payload", "tier publish GB/s", "plain SET GB/s", "tier/plain",
                        "tier fetch GB/s", "plain MGET GB/s", "tier/plain", "fetch, defaults"], rows,
                       align="lrrrrrrrrrr"))
    print(f"\nGB/s: 1e9 payload bytes/s (the tier adds a 64-byte header per block); publish: publish() to the end "
          f"of flush(); fetch: one fetch() of the N keys (checks every header and BLAKE2b checksum); plain: "
          f"pipelined SET / MGET of the same bytes in batches of {batch}; 'fetch, defaults': blocks a fetch with the "
          f"tier's default timeout and fetch budget returns (it starts no batch after the budget).")
    return dict(batch_size=batch, runs=results)


# ---------------------------------------------------------------- 2. contention: fetching beside a busy interpreter


def _busy(stop: Any, held: float) -> None:
    """A stand-in for the engine's step loop: Python work holding the GIL ``held`` of the time
    (the rest asleep, as a loop waiting on the GPU is)."""
    while not stop.is_set():
        end = time.perf_counter() + 0.001 * held
        x = 0
        while time.perf_counter() < end:
            x += 1
        time.sleep(0.001 * (1 - held))


def bench_contention(args: argparse.Namespace, url: str, run_id: str) -> dict[str, Any]:
    import threading

    import numpy as np

    from kvforge import RedisTier, RemoteLayout

    label, layers, heads, head_dim, nbytes = BLOCK_SHAPES["tinyllama"]
    bb = block_bytes(layers, heads, head_dim, nbytes)
    n = 16 if args.quick else 256
    repeats = args.repeats
    held = 0.9
    layout = RemoteLayout("bench-contention", "bfloat16", BLOCK_TOKENS, layers, heads, head_dim, 0, 1, bb)
    ns_name = f"{run_id}-contention"
    data = np.random.default_rng(1).bytes(n * bb)
    keys = [os.urandom(16) for _ in range(n)]
    writer = RedisTier(url, namespace=ns_name, timeout=args.tier_timeout, reader="thread")
    writer.bind(layout)
    writer.publish(keys, lambda: [memoryview(data)[i * bb:(i + 1) * bb] for i in range(n)])
    assert writer.flush(600) and writer.stats().blocks_written == n
    writer.close()
    plain = plain_client(url)
    names = [f"kvforge:{ns_name}:{layout.fingerprint().hex()}:{k.hex()}".encode() for k in keys]
    batch = RedisTier(url).batch_size
    print(f"\n## 2. contention: one fetch of {n} {label} blocks ({n * bb / 2**20:,.0f} MiB) while another thread "
          f"of the process runs Python {held:.0%} of the time (a step loop's share), against the interpreter "
          f"idle; the tier with reader='process' (fetches in a child process) and reader='thread', and plain "
          f"redis-py MGET of the same values in the process; median of {repeats}\n")
    rows, results = [], []

    def plain_get() -> int:
        got = 0
        for lo in range(0, n, batch):
            got += sum(v is not None for v in plain.mget(names[lo:lo + batch]))
        return got

    systems: list[tuple[str, Any, Any]] = [("plain redis-py MGET", plain_get, None)]
    for reader, procs in (("thread", None), ("process", 1), ("process", None)):
        tier = RedisTier(url, namespace=ns_name, timeout=args.tier_timeout, fetch_budget=args.tier_timeout,
                         reader=reader, reader_processes=procs)
        tier.bind(layout)
        assert tier.wait_ready()
        label = f"RedisTier reader={reader}" + ("" if reader == "thread" else
                                                 f", {tier.reader_processes} process(es)")
        systems.append((label, lambda tier=tier: len(tier.fetch(keys)), tier))
    for name, fetch, tier in systems:
        rates = {}
        for busy in (False, True):
            stop = threading.Event()
            thread = threading.Thread(target=_busy, args=(stop, held), daemon=True) if busy else None
            if thread is not None:
                thread.start()
            try:
                times = []
                assert fetch() == n  # warm-up: connections
                for _ in range(repeats):
                    t = time.perf_counter()
                    got = fetch()
                    times.append(time.perf_counter() - t)
                    assert got == n, f"{name}: {got} of {n} blocks"
            finally:
                stop.set()
                if thread is not None:
                    thread.join()
            rates["busy" if busy else "idle"] = n * bb / statistics.median(times) / 1e9
        if tier is not None:
            tier.close()
        results.append(dict(system=name, gb_per_s=rates))
        rows.append([name, f"{rates['idle']:.2f}", f"{rates['busy']:.2f}", ratio(rates["busy"], rates["idle"])])
    plain.close()
    base = results[0]["gb_per_s"]["busy"]
    for row, r in zip(rows, results):
        row.append(ratio(r["gb_per_s"]["busy"], base))
    print(format_table(["fetch", "idle GB/s", "busy GB/s", "busy/idle", "busy vs plain busy"], rows,
                       align="lrrrr"))
    print("\nGB/s: 1e9 payload bytes/s. The tier checks every header and BLAKE2b checksum; plain MGET checks "
          "nothing. With reader='process' the socket reads, parsing and checks run in a child process and "
          "the payloads come back through shared memory: the busy thread does not slow them down.")
    delete_namespace(plain_client(url), ns_name)
    return dict(block_bytes=bb, num_blocks=n, held=held, runs=results)


# ---------------------------------------------------------------- 3. sharing: the workload
def make_workload(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """System prompts, A's prompts, B's prompts (with their kinds) and a warm-up set, as token ids."""
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    def user() -> list[int]:
        return tokens(rng.randint(*args.user_len))

    systems = [tokens(args.system_len) for _ in range(args.systems)]
    a = [systems[s] + user() for s in range(args.systems) for _ in range(args.a_per_system)]
    b: list[tuple[str, list[int]]] = []
    for s in range(args.systems):
        b += [("new user message", systems[s] + user()) for _ in range(args.b_per_system)]
    b += [("exact repeat of A", list(p)) for p in rng.sample(a, min(args.b_repeats, len(a)))]
    rng.shuffle(b)
    # the first request of each system prompt in B's order: the one that computes it without sharing
    seen: set[int] = set()
    kinds = []
    for kind, p in b:
        s = next(i for i, sp in enumerate(systems) if p[: len(sp)] == sp)
        kinds.append("first of its system prompt" if s not in seen and kind != "exact repeat of A" else kind)
        seen.add(s)
    # warm-up: other system prompts, served by A (published) and then by every B instance (remote hits)
    warm_systems = [tokens(args.system_len) for _ in range(2)]
    warm = [warm_systems[i % 2] + user() for i in range(max(2, args.concurrency * 2))]
    # and exact repeats: a prompt cached but for its last token takes kernel shapes of its own to compile
    warm += warm[:2]
    return dict(systems=systems, a=a, b=[p for _, p in b], b_kinds=kinds, warm=warm)


class StallWatch:
    """With ``KVFORGE_STALL_MS`` set: a thread that prints the main thread's stack whenever one
    engine step has run longer than that many milliseconds (a diagnosis aid, off by default)."""

    def __init__(self) -> None:
        import os
        import threading
        self.limit = float(os.environ.get("KVFORGE_STALL_MS", "0")) / 1e3
        self.started: float | None = None
        self.main = threading.get_ident()
        if self.limit:
            threading.Thread(target=self._watch, daemon=True).start()
            try:  # and every Triton compile, with its specialisation (what a warm-up missed)
                import triton
                triton.knobs.runtime.jit_post_compile_hook = self._compiled
            except (ImportError, AttributeError):
                pass

    @staticmethod
    def _compiled(*, repr: str, compile: dict[str, Any], **_: Any) -> None:
        import sys
        name = repr.split("[", 1)[0]
        print(f"[compile] {name} constants {compile.get('constants')} attrs {compile.get('configs')}"[:1500],
              file=sys.stderr, flush=True)

    def _watch(self) -> None:
        import sys
        import traceback
        reported = None
        while True:
            time.sleep(self.limit / 4)
            t = self.started
            if t is not None and t != reported and time.perf_counter() - t > self.limit:
                reported = t
                frame = sys._current_frames().get(self.main)
                stack = "".join(traceback.format_stack(frame, limit=14)) if frame is not None else "?"
                print(f"[stall] a step running for {1e3 * (time.perf_counter() - t):.0f} ms:\n{stack}",
                      file=sys.stderr, flush=True)


_WATCH: StallWatch | None = None


def run_loop(engine: Any, prompts: list[list[int]], concurrency: int, new_tokens: int) -> list[Any]:
    """Serve ``prompts`` closed-loop, at most ``concurrency`` in flight, in order; outputs by index."""
    from kvforge.engine import SamplingParams

    global _WATCH
    if _WATCH is None:
        _WATCH = StallWatch()
    watch = _WATCH

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    todo = deque(range(len(prompts)))
    in_flight: dict[str, int] = {}
    outs: list[Any] = [None] * len(prompts)
    while todo or in_flight:
        while todo and len(in_flight) < concurrency:
            i = todo.popleft()
            in_flight[engine.add_request(prompts[i], params)] = i
        watch.started = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outs[in_flight.pop(out.request_id)] = out
        watch.started = None
    return outs


def serve_instance(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine instance (run in its own spawned process): build, warm up, serve, report."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    import torch

    from kvforge import RedisTier
    from kvforge.engine import Engine

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    remote = None
    if spec["url"]:
        opts = {} if spec["remote_timeout"] is None else dict(timeout=spec["remote_timeout"])
        remote = RedisTier(spec["url"], namespace=spec["namespace"], **opts)
    engine = Engine.from_config(spec["hf"], device=spec["device"], dtype=spec["dtype"], seed=spec["seed"],
                                remote=remote, **spec["engine"])
    build_s = time.perf_counter() - t

    def sync() -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    t = time.perf_counter()
    run_loop(engine, spec["warm"], spec["concurrency"], spec["new_tokens"])
    sync()
    warm_s = time.perf_counter() - t
    before = engine.stats()
    rbefore = remote.stats() if remote is not None else None
    t = time.perf_counter()
    outs = run_loop(engine, spec["prompts"], spec["concurrency"], spec["new_tokens"])
    sync()
    wall = time.perf_counter() - t
    flush_s = 0.0
    if remote is not None:
        t = time.perf_counter()
        assert engine.cache.remote.flush(timeout=120), "the remote tier did not flush in 120 s"
        flush_s = time.perf_counter() - t
    after = engine.stats()
    p0, p1 = before.prefix, after.prefix
    res = dict(
        build_s=build_s, warm_s=warm_s, seconds=wall, flush_s=flush_s, identity=engine.model.identity,
        ttft=[o.metrics.ttft for o in outs], cached=[o.metrics.num_cached_tokens for o in outs],
        token_ids=[list(o.token_ids) for o in outs],
        query_tokens=p1.query_tokens - p0.query_tokens, hit_tokens=p1.hit_tokens - p0.hit_tokens,
        remote_hit_tokens=p1.remote_hit_tokens - p0.remote_hit_tokens,
        fetches=after.num_remote_fetches - before.num_remote_fetches,
        read_bandwidth=getattr(remote, "read_bandwidth", None), prefill_rate=engine.preemption.prefill_rate,
        declined=after.num_remote_fetches_declined - before.num_remote_fetches_declined,
        prompt_computed=after.num_prompt_tokens_computed - before.num_prompt_tokens_computed,
        generated=after.num_generated_tokens - before.num_generated_tokens,
        prompt_tokens=sum(len(p) for p in spec["prompts"]))
    if remote is not None:
        r1 = remote.stats()
        res["remote"] = {k: v - getattr(rbefore, k) for k, v in r1.to_dict().items()}
        res["remote_total"] = r1.to_dict()
        remote.close()
    return res


def in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """``serve_instance(spec)`` in a fresh spawned process (its own interpreter, model and cache)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(serve_instance, spec).result()


def bench_sharing(args: argparse.Namespace, url: str, run_id: str) -> dict[str, Any]:
    cuda = args.device == "cuda"
    name, hf = (("tiny Llama", TINY) if args.quick else SHARING_MODELS[args.sharing_model] if cuda else
                ("moderate Llama", CPU_MODEL))
    dtype = "bfloat16" if hf["torch_dtype"] == "bfloat16" else "float32"
    bs = 16
    wl = make_workload(args, hf["vocab_size"])
    everything = wl["a"] + wl["b"] + wl["warm"]
    longest = max(len(p) for p in everything) + args.new_tokens
    # room for every prompt of A, B and the warm-up at once: nothing is evicted, so B's local
    # hits are what it computed itself, and its remote hits what A shared
    num_blocks = sum(-(-(len(p) + args.new_tokens) // bs) for p in everything) + 8 * args.concurrency
    engine_opts = dict(num_blocks=num_blocks, block_size=bs, max_num_seqs=args.concurrency,
                       max_model_len=-(-(longest + 16) // 256) * 256,
                       max_num_batched_tokens=args.max_num_batched_tokens)
    # one torch thread on the CPU: several spin against any other load on a small, shared machine
    # (10x slower prefills seen on 2 cores); torch's default on a GPU
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    base_spec = dict(hf=hf, device=args.device, dtype=dtype, seed=args.seed, engine=engine_opts,
                     concurrency=args.concurrency, new_tokens=args.new_tokens, threads=threads,
                     remote_timeout=args.remote_timeout, warm=wl["warm"])
    bpb = model_block_bytes(hf, bs)
    shape = (f"hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers, {hf['num_attention_heads']} heads, "
             f"{hf['num_key_value_heads']} KV heads, vocab {hf['vocab_size']}, {dtype}")
    print(f"\n## 3. sharing: {name} ({shape}), random weights, seed {args.seed}, on {args.device}; "
          f"block {bs} tokens = {bpb / 1024:,.0f} KiB; {args.systems} system prompts of {args.system_len} tokens, "
          f"user messages {args.user_len[0]}-{args.user_len[1]} tokens, {args.new_tokens} new tokens (greedy); "
          f"A: {len(wl['a'])} requests; B: {len(wl['b'])} requests ({args.b_per_system} new per system prompt, "
          f"{args.b_repeats} exact repeats of A), {args.concurrency} in flight; each instance a spawned process "
          f"with {num_blocks} blocks, warmed up on {len(wl['warm'])} other prompts\n")

    runs: dict[str, dict[str, Any]] = {}

    def run(label: str, what: str, **spec: Any) -> dict[str, Any]:
        t = time.perf_counter()
        r = runs[label] = in_process(dict(base_spec, **spec))
        extra = ""
        if label.startswith("A"):
            extra = (f", published {r['remote_total']['blocks_written']} blocks "
                     f"({r['remote_total']['bytes_written'] / 2**20:,.1f} MiB), flush {r['flush_s']:.2f} s")
        elif "remote" in r:
            bw = r["read_bandwidth"]
            extra = (f", {r['fetches']} fetches, {r['declined']} declined (tier read "
                     f"{'-' if bw is None else f'{bw / 1e9:.2f} GB/s'}, prefill {r['prefill_rate']:,.0f} tokens/s: "
                     f"{'-' if bw is None else f'{bw / (bpb / bs) / 1e3:,.0f}k'} tokens/s of KV)")
        print(f"# {what}: {len(spec['prompts'])} requests in {r['seconds']:.1f} s (build {r['build_s']:.1f} s)"
              f"{extra}; process {time.perf_counter() - t:.1f} s", flush=True)
        return r

    # each B over a namespace of its own, holding only what an A published (B publishes too)
    for mode in ("auto", "always"):
        ns = f"{run_id}-share-{mode}"
        run(f"A-{mode}", f"instance A (namespace {ns!r})", url=url, namespace=ns, prompts=wl["a"])
        run(f"B-{mode}", f"instance B, remote_fetch={mode!r}", url=url, namespace=ns, prompts=wl["b"],
            engine=dict(engine_opts, remote_fetch=mode))
    run("B0", "instance B, no remote tier", url=None, namespace=None, prompts=wl["b"])
    for key in ("B0", "B-auto", "B-always"):  # where the tail of the TTFT comes from
        r = runs[key]
        slow = sorted(range(len(r["ttft"])), key=r["ttft"].__getitem__)[-3:][::-1]
        print(f"# {key}: slowest TTFT " + ", ".join(
            f"#{i} {1e3 * r['ttft'][i]:.0f} ms ({wl['b_kinds'][i]}, {r['cached'][i]} cached)" for i in slow))
    ids = {k: {r["identity"] for r in runs.values()} for k in ("all",)}
    assert len(ids["all"]) == 1, "instances of one config and seed must share an identity"

    def differ(x: str, y: str) -> list[int]:
        return [i for i, (p, q) in enumerate(zip(runs[x]["token_ids"], runs[y]["token_ids"])) if p != q]

    def summary(r: dict[str, Any]) -> dict[str, Any]:
        q = r["query_tokens"] or 1
        kinds: dict[str, list[float]] = {}
        for kind, ttft in zip(wl["b_kinds"], r["ttft"]):
            kinds.setdefault(kind, []).append(ttft)
        return dict(hit_rate=r["hit_tokens"] / q, remote_hit_rate=r["remote_hit_tokens"] / q,
                    remote_hit_tokens=r["remote_hit_tokens"], hit_tokens=r["hit_tokens"],
                    prompt_computed=r["prompt_computed"], seconds=r["seconds"],
                    ttft_p50_ms=1e3 * pct(r["ttft"], 50), ttft_p99_ms=1e3 * pct(r["ttft"], 99),
                    ttft_mean_ms=1e3 * statistics.fmean(r["ttft"]),
                    **{f"ttft_p50_ms[{k}]": 1e3 * pct(v, 50) for k, v in kinds.items()},
                    num_by_kind={k: len(v) for k, v in kinds.items()}, fetches=r["fetches"], declined=r["declined"])

    summ = {k: summary(runs[k]) for k in ("B0", "B-auto", "B-always")}
    s0 = summ["B0"]
    spec = [("prefix hit rate", "hit_rate", "{:.1%}", None), ("of which remote", "remote_hit_rate", "{:.1%}", None),
            ("remote hit tokens", "remote_hit_tokens", "{:,}", None), ("prefix hit tokens", "hit_tokens", "{:,}", None),
            ("remote fetches / declined", None, None, None),
            ("prompt tokens computed", "prompt_computed", "{:,}", True),
            ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}", True), ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}", True),
            ("TTFT mean ms", "ttft_mean_ms", "{:.1f}", True)]
    for kind in ("first of its system prompt", "new user message", "exact repeat of A"):
        if kind in s0["num_by_kind"]:
            spec.append((f"TTFT p50 ms, {kind} ({s0['num_by_kind'][kind]})", f"ttft_p50_ms[{kind}]", "{:.1f}", True))
    spec.append(("wall s", "seconds", "{:.2f}", True))
    rows = []
    for label, key, fmt, lower_better in spec:
        if key is None:
            rows.append([label, "-"] + [f"{summ[k]['fetches']} / {summ[k]['declined']}" for k in ("B-auto", "B-always")]
                        + ["-", "-", ""])
            continue
        vals = [summ[k][key] for k in ("B0", "B-auto", "B-always")]
        ratios = [ratio(v, vals[0]) if lower_better is not None else "-" for v in vals[1:]]
        rows.append([label] + [fmt.format(v) for v in vals] + ratios + ["" if lower_better is None else
                                                                         "lower is better"])
    print(format_table(["instance B", "no sharing", "sharing, auto", "sharing, always", "auto / none",
                        "always / none", ""], rows, align="lrrrrrl"))
    rs = runs["B-always"]["remote"]
    print(f"\nprompt tokens submitted by B: {runs['B0']['prompt_tokens']:,}; hit rates are prompt tokens found in "
          f"the prefix cache (device or remote) over prompt tokens looked up; TTFT from add_request to the first "
          f"token; 'auto' fetches when the tier's measured read bandwidth beats the engine's measured prefill rate, "
          f"'always' whenever the tier holds the blocks. B's remote tier (always): {rs['fetch_calls']} fetches, "
          f"{rs['hits']} blocks found, {rs['misses']} missed, {rs['bytes_read'] / 2**20:,.1f} MiB read, "
          f"{rs['blocks_written']} blocks published; "
          f"refused {sum(rs[k] for k in ('bad_size', 'bad_header', 'bad_fingerprint', 'bad_key', 'bad_checksum'))}, "
          f"faults {rs['connection_errors'] + rs['timeouts'] + rs['server_errors']}, dropped jobs {rs['dropped_jobs']}.")
    n = len(runs["B0"]["token_ids"])
    # float32 on the CPU: outputs must equal no sharing. bf16 on a GPU rounds differently with the batch a
    # block's KV was computed in (A's batches, not B's; and prefetches change when a request is admitted),
    # and a random-weight model's logits are near ties: agreement is reported. The bytes themselves are
    # checksummed, and tests/gpu/test_remote_gpu.py checks them bit-exact.
    agree = {k: 1 - len(differ(k, "B0")) / n for k in ("B-auto", "B-always")}
    print(f"outputs: greedy agreement with no sharing: auto {agree['B-auto']:.1%}, always {agree['B-always']:.1%} "
          f"({n} requests, {args.new_tokens} tokens each)")
    if not cuda:
        assert agree["B-auto"] == agree["B-always"] == 1.0, "float32 on the CPU: outputs must equal no sharing"
    for r in runs.values():
        r.pop("token_ids")
    return dict(num_blocks=num_blocks, block_bytes=bpb, b_kinds=wl["b_kinds"], model=name,
                agreement=agree, summary=summ, runs=runs)


# ---------------------------------------------------------------- main

def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help="comma-separated sections: throughput, contention, sharing")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a tiny model on the CPU: a smoke run")
    ap.add_argument("--url", help="a running Redis server (default: start one on a free loopback port)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="sharing: where the engines run")
    ap.add_argument("--repeats", type=int, default=5, help="throughput: timed repeats (median)")
    ap.add_argument("--num-blocks", type=int, nargs="+", help="throughput: blocks per publish/fetch (default 64 512)")
    ap.add_argument("--block-shapes", nargs="+", choices=sorted(BLOCK_SHAPES), default=["tinyllama", "llama-3-8b"],
                    help="throughput: block shapes (16 tokens, bf16)")
    ap.add_argument("--tier-timeout", type=float, default=60.0, help="throughput: the RedisTier's timeout (s)")
    ap.add_argument("--sharing-model", choices=sorted(SHARING_MODELS), default="tinyllama",
                    help="sharing with --device cuda: the model shape (random weights)")
    ap.add_argument("--systems", type=int, help="sharing: system prompts")
    ap.add_argument("--system-len", type=int, help="sharing: tokens per system prompt")
    ap.add_argument("--user-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="sharing: user message tokens")
    ap.add_argument("--a-per-system", type=int, help="sharing: A's requests per system prompt")
    ap.add_argument("--b-per-system", type=int, help="sharing: B's new requests per system prompt")
    ap.add_argument("--b-repeats", type=int, help="sharing: B's exact repeats of A's prompts")
    ap.add_argument("--new-tokens", type=int, help="sharing: tokens generated per request")
    ap.add_argument("--concurrency", type=int, help="sharing: requests in flight (closed loop)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--remote-timeout", type=float, help="sharing: the engines' RedisTier timeout (default its own)")
    ap.add_argument("--threads", type=int, help="sharing: torch threads per instance (default: 1 on the CPU, "
                    "torch's default with --device cuda; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="sharing: the weights' and workload's seed")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    if args.quick:
        args.device = "cpu"
        args.repeats = min(args.repeats, 3)
        args.block_shapes = ["tinyllama"] if args.num_blocks is None else args.block_shapes
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("bench_remote.py: --device cuda needs a CUDA GPU")
    # workload defaults by configuration: quick (seconds), the CPU (prefill-bound, under ~2 minutes), a GPU
    defaults = (dict(systems=2, system_len=64, user_len=(8, 24), a_per_system=2, b_per_system=3, b_repeats=2,
                     new_tokens=4, concurrency=1) if args.quick else
                dict(systems=4, system_len=512, user_len=(32, 96), a_per_system=3, b_per_system=3, b_repeats=4,
                     new_tokens=8, concurrency=1) if args.device == "cpu" else
                dict(systems=8, system_len=2048, user_len=(64, 256), a_per_system=4, b_per_system=8, b_repeats=16,
                     new_tokens=16, concurrency=4))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.user_len[0] > args.user_len[1] or args.user_len[0] < 1:
        ap.error("--user-len MIN MAX: 1 <= MIN <= MAX")

    commit = git_commit()
    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    print(f"# bench_remote{' --quick' if args.quick else ''}: {device_name(args.device)}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, run {run_id}")
    server = None if args.url else LocalRedis()
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        import redis
        info = plain_client(url).info("server")
        from redis.utils import HIREDIS_AVAILABLE
        parser = "hiredis parser" if HIREDIS_AVAILABLE else "pure-Python parser (no hiredis)"
        print(f"# redis-server {info.get('redis_version')} ({'started here' if server else 'given'}), "
              f"redis-py {redis.__version__}, {parser}")
        results: dict[str, Any] = dict(device=device_name(args.device), commit=commit, date=time.strftime("%Y-%m-%d"),
                                       quick=args.quick, run_id=run_id, redis_version=info.get("redis_version"),
                                       redis_py=redis.__version__, hiredis=HIREDIS_AVAILABLE)
        start = time.perf_counter()
        benches = dict(throughput=lambda: bench_throughput(args, url, run_id),
                       contention=lambda: bench_contention(args, url, run_id),
                       sharing=lambda: bench_sharing(args, url, run_id))
        for name in SECTIONS:
            if name in only:
                t = time.perf_counter()
                results[name] = benches[name]()
                print(f"\n# {name}: {time.perf_counter() - t:.1f} s")
        print(f"# total {time.perf_counter() - start:.1f} s")
    finally:
        if server is not None:
            server.stop()
        else:
            try:
                for mode in ("auto", "always"):
                    delete_namespace(plain_client(url), f"{run_id}-share-{mode}")
                delete_namespace(plain_client(url), f"{run_id}-tput")
            except Exception as exc:  # a given server that went away: nothing left to clean
                print(f"# could not delete the run's keys: {exc}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"# results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
