"""Compaction on a GPU: a Llama-3-8B-shaped cache fragmented to 50% live blocks.

Prints one table: blocks moved, bytes moved, time, bandwidth as % of the
device's measured copy bandwidth, device memory returned (as seen by
``torch.cuda.mem_get_info``) against the bytes released, and peak memory
during the operation against the pre-compaction footprint.

Usage: PYTHONPATH=. python benchmarks/bench_compaction.py [--blocks 4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from kvforge import CacheConfig, KVCache, format_bytes, kernels
from kvforge.tools.cli import format_table


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.randn(1 << 28, dtype=torch.bfloat16, device=device)  # 512 MiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    bw = 2 * a.numel() * a.element_size() / times[len(times) // 2]
    del a, b
    torch.cuda.empty_cache()
    return bw


def fragmented_cache(num_blocks: int, seed: int) -> tuple[KVCache, list[int]]:
    cfg = CacheConfig(block_size=16, num_blocks=num_blocks, num_layers=32, num_kv_heads=8, head_dim=128,
                      dtype=torch.bfloat16, device="cuda", enable_compaction=True, enable_prefix_caching=False)
    cache = KVCache(cfg)
    rng = random.Random(seed)
    sid = 0
    while cache.pool.num_free_blocks >= 4:
        n = rng.randint(1, 4) * 16
        cache.add_sequence(sid, num_tokens=n)
        sid += 1
    ids = list(range(sid))
    rng.shuffle(ids)
    live_target = num_blocks // 2
    for s in ids:  # free random sequences until half the blocks are live, scattered over the pool
        if cache.pool.num_allocated_blocks <= live_target:
            break
        cache.free_sequence(s)
    live = [s for s in range(sid) if s in cache]
    for chunk in cache.chunks:  # random contents, so that nothing is moved as zeros
        chunk.normal_()
    return cache, live


def checksum(cache: KVCache, live: list[int]) -> list[float]:
    sums = []
    for s in live[:: max(1, len(live) // 16)]:
        k, v = cache.gather(s, 31)
        sums.append(float(k.float().sum() + 2 * v.float().sum()))
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4096, help="pool blocks (2 MiB each)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {copy_bw / 1e12:.2f} TB/s  torch {torch.__version__}")
    rows = []
    for rep in range(args.repeats):
        cache, live = fragmented_cache(args.blocks, seed=rep)
        before_sum = checksum(cache, live)
        held = cache.pool.num_allocated_blocks
        footprint = torch.cuda.memory_allocated(dev)
        torch.cuda.synchronize()
        free_before, _ = torch.cuda.mem_get_info(dev)
        frag, eff = cache.fragmentation_ratio(), cache.memory_efficiency()
        # the data movement alone: the plan's copies into free blocks are harmless, so time them first
        plan = cache.manager.plan_compaction()
        moved = plan.num_moves
        moved_bytes = 2 * moved * cache.config.bytes_per_block  # read + write
        # device time of the one batched copy: index tensors built once, 10 launches queued
        # back to back between two events, so host work never leaves the GPU idle in the window
        pairs = torch.tensor(plan.moves, dtype=torch.int64, device=dev)
        src, dst = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
        kernels.copy_blocks(cache.chunks, src, dst, chunk_offsets=cache.chunk_offsets)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                kernels.copy_blocks(cache.chunks, src, dst, chunk_offsets=cache.chunk_offsets)
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3 / 10)
        copy_s = sorted(ts)[2]
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        released = cache.compact_cache()
        total_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev)
        free_after, _ = torch.cuda.mem_get_info(dev)
        assert checksum(cache, live) == before_sum, "compaction changed a live sequence"
        cache.check_invariants()
        returned = free_after - free_before
        rows.append([rep, f"{held}/{args.blocks}", f"{frag:.0%}", f"{eff:.0%}", moved, format_bytes(moved_bytes),
                     f"{total_s * 1e3:.1f}", f"{copy_s * 1e3:.2f}",
                     f"{moved_bytes / copy_s / copy_bw:.0%}",
                     format_bytes(released), format_bytes(returned), f"{returned / released:.0%}" if released else "-",
                     format_bytes(peak - footprint)])
        del cache
        torch.cuda.empty_cache()
    print(format_table(["run", "live/blocks", "ext.frag", "eff.", "moves", "bytes moved", "compact ms",
                        "copy ms", "copy % bw", "released", "device got back", "got/released",
                        "peak over footprint"], rows))


if __name__ == "__main__":
    main()
