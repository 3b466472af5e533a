"""Benchmarks of kvforge's Triton kernels against torch baselines (GPU only).

Prints one aligned table: kernel, shape, median time (triton.testing.do_bench),
TB/s of bytes the op must move, % of the device's measured copy bandwidth
(a 1 GiB device copy, bytes read + written), and a note (relative error
against the torch reference, TFLOP/s, speed against the baseline of the same
shape). Baselines run in the same process on the same device: torch SDPA on
a contiguous cache, gather-then-SDPA on the paged cache, FlexAttention over a
paged cache (torch's experimental PagedAttention), SDPA flash for prefill.

Launch cost. For every decode shape (and for store_kv) each of the two ways
to pass the cache is timed three ways: ``lists`` passes the (k_cache,
v_cache) chunk lists, described and checked on every call; ``view`` passes
the layer's CacheView from ``describe_cache`` (what the storage layer does).
The ``eager`` row is do_bench's time per call (launch cost included), the
``graph`` row the kernel time inside a CUDA graph (no launch cost), the
``host`` row the host time per call: N back-to-back calls without a sync,
timed on the host clock, divided by N (the Python wrapper plus the launch
enqueue; N stays far below the launch-queue depth so the host never waits).

fp8. The ``fp8`` rows time an fp8_e4m3 cache (and the uint8 ``bits`` read
path that hardware without native fp8 runs) against the bf16 cache of the
same shape: decode (eager and graph, TB/s of the bytes each cache must read)
and prefill (TFLOP/s), each with its speed ratio to bf16 and its error
against the bf16 output, and the quantizing store. ``--fp8-only`` prints
just those rows.

``--launch`` prints only the launch-cost rows, at host-bound shapes too (a
decode of one sequence, of 16 x 512 tokens, a store of 16 tokens) and a
markdown summary of eager / in-graph time and host time per call.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--no-flex] [--sweep {decode,prefill,all}] [--fp8-only] [--head-dims] [--launch]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kvforge.kernels import copy_blocks, paged_decode_attention, paged_prefill_attention, reference, store_kv
from kvforge.kernels.fp8 import quantize
from kvforge.kernels.layout import chunk_offsets, describe_cache

# triton (do_bench, the kernel modules) is imported on first use, so that --help runs anywhere
DEV = "cuda"
DT = torch.bfloat16
HQ, HKV, D = 32, 8, 128
ROWS: list[tuple[str, str, float, float | None, str]] = []
COPY_TBS = 0.0


KERNEL_W = 44


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` per call, eager (launch cost included)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def bench_graph(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` per call replayed in a CUDA graph (kernel time, no launch cost).

    ``fn`` runs once eagerly first (on a side stream), so every kernel is
    compiled before the capture."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def host_time(fn: Callable[[], object], calls: int = 64, reps: int = 11) -> float:
    """Median host seconds per call of ``calls`` back-to-back calls, no sync
    inside: what the Python wrapper and the launch enqueue cost the host.
    ``calls`` (at most two launches each) stays far below the device's
    pending-launch queue, so the host never blocks on the GPU."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def bench_back_to_back(fn: Callable[[], object], calls: int = 64, reps: int = 11) -> float:
    """Median seconds per call of ``calls`` eager calls queued back to back, timed by CUDA
    events around the lot: the GPU's time per call when the host keeps up, the host's when
    it does not. No cache flush between calls, as in :func:`bench_graph`, so the two differ
    only by what eager launching costs."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e-3 / calls)
    return statistics.median(per_call)


def row(kernel: str, shape: str, seconds: float, nbytes: float | None, note: str = "") -> None:
    ROWS.append((kernel, shape, seconds, nbytes, note))
    tbs = f"{nbytes / seconds / 1e12:6.2f}" if nbytes else "     -"
    pct = f"{nbytes / seconds / 1e12 / COPY_TBS * 100:5.1f}%" if nbytes else "     -"
    print(f"{kernel:<{KERNEL_W}} {shape:<26} {seconds * 1e6:10.1f} {tbs} {pct}  {note}", flush=True)


def launch_costs(kernel: str, shape: str, paths: dict[str, Callable[[], object]], nbytes: float | None,
                 note: str = "") -> dict[str, float]:
    """Per cache-passing path: eager, CUDA-graph and host time rows; returns the eager times."""
    eager = {}
    for name, fn in paths.items():
        eager[name] = t = bench(fn)
        row(f"{kernel} {name} eager", shape, t, nbytes, note)
        row(f"{kernel} {name} graph", shape, bench_graph(fn), nbytes, "kernel time without launch cost")
        row(f"{kernel} {name} host", shape, host_time(fn), None, "host time per call (wrapper + enqueue)")
    return eager


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure_copy() -> float:
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n, dtype=DT, device=DEV)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    del a, b
    return 2 * n * 2 / t / 1e12


def paged_from_contiguous(k: torch.Tensor, v: torch.Tensor, block_size: int, gen: torch.Generator):
    """[B, L, H, D] -> caches [B*L/bs, bs, H, D] with shuffled blocks, int32 tables."""
    batch, length, heads, dim = k.shape
    n = batch * length // block_size
    perm = torch.randperm(n, generator=gen).to(DEV)
    k_cache = torch.empty(n, block_size, heads, dim, dtype=k.dtype, device=DEV)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k.reshape(n, block_size, heads, dim)
    v_cache[perm] = v.reshape(n, block_size, heads, dim)
    return k_cache, v_cache, perm.view(batch, length // block_size).to(torch.int32)


def random_paged(batch: int, length: int, heads_kv: int, dim: int, block_size: int, gen: torch.Generator):
    """N(0, 1) keys and values of ``batch`` sequences of ``length`` tokens in a paged bf16 cache
    (shuffled block table), with their context lengths: (k_cache, v_cache, tables, ctx)."""
    k = torch.randn(batch, length, heads_kv, dim, dtype=DT, device=DEV)
    k_cache, v_cache, tables = paged_from_contiguous(k, torch.randn_like(k), block_size, gen)
    return k_cache, v_cache, tables, torch.full((batch,), length, dtype=torch.int32, device=DEV)


def split_chunks(k_cache: torch.Tensor, v_cache: torch.Tensor, num_chunks: int):
    """The same blocks as ``num_chunks`` separate chunk allocations ``[1, 2, n, bs, H, D]``."""
    n = k_cache.shape[0] // num_chunks
    chunks = [torch.stack([k_cache[j * n : (j + 1) * n], v_cache[j * n : (j + 1) * n]])[None]
              for j in range(num_chunks)]
    k_chunks, v_chunks = [c[0, 0] for c in chunks], [c[0, 1] for c in chunks]
    return k_chunks, v_chunks, chunks, chunk_offsets(chunks)


def flex_paged(q, k_sdpa, v_sdpa, page: int):
    """FlexAttention over torch's experimental paged cache (as in shared/bench/flex_paged_baseline.py)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, _, length, _ = k_sdpa.shape
    n_pages = batch * length // page + 4
    pa = PagedAttention(n_pages, page, batch, device=DEV)
    for i in torch.randperm(batch).tolist():
        pa.reserve(torch.tensor(i, device=DEV), torch.tensor(length, device=DEV))
    k_cache = torch.zeros(1, HKV, n_pages * page, D, dtype=DT, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    pa.assign(torch.arange(batch, device=DEV), torch.arange(length, device=DEV).expand(batch, length),
              k_sdpa, v_sdpa, k_cache, v_cache)

    def all_visible(b, h, qi, kv):
        return kv >= 0

    mask = pa.convert_logical_block_mask(create_block_mask(all_visible, batch, 1, 1, length, device=DEV,
                                                           BLOCK_SIZE=page))
    mask.mask_mod = pa.get_mask_mod(all_visible)
    flex = torch.compile(flex_attention, dynamic=False)
    q4 = q.unsqueeze(2)
    return lambda: flex(q4, k_cache, v_cache, block_mask=mask, enable_gqa=True)


def decode_splits(batch: int, max_tokens: int, view) -> int:
    """The split count the decode wrapper picks for this shape (for the notes)."""
    from kvforge.kernels import triton_decode

    sms = torch.cuda.get_device_properties(view.device).multi_processor_count
    return triton_decode.choose_num_splits(batch, view.num_kv_heads, max_tokens, sms, triton_decode._config(view)[0])


def bench_decode(batch: int, length: int, block_sizes: tuple[int, ...], flex_pages: tuple[int, ...], gen) -> None:
    shape = f"B={batch} L={length}"
    kv_bytes = 2 * batch * length * HKV * D * 2
    q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
    k = torch.randn(batch, length, HKV, D, dtype=DT, device=DEV)
    v = torch.randn_like(k)
    k_sdpa, v_sdpa = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, H, L, D]
    q4 = q.unsqueeze(2)
    sdpa = lambda: F.scaled_dot_product_attention(q4, k_sdpa, v_sdpa, enable_gqa=True)  # noqa: E731
    want = sdpa().squeeze(2)
    t_sdpa = bench(sdpa)
    row("decode sdpa contiguous", shape, t_sdpa, kv_bytes)
    ctx = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    for bs in block_sizes:
        k_cache, v_cache, tables = paged_from_contiguous(k, v, bs, gen)
        view = describe_cache(k_cache, v_cache)
        out = paged_decode_attention(q, k_cache, v_cache, tables, ctx)
        out_view = paged_decode_attention(q, view, None, tables, ctx)
        ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, ctx) if batch * length <= 2**18 else want
        err = rel_err(out, ref)
        splits = decode_splits(batch, tables.shape[1] * bs, view)
        eager = launch_costs(
            f"decode kvforge bs={bs}", shape,
            {"lists": lambda: paged_decode_attention(q, k_cache, v_cache, tables, ctx, out=out),
             "view": lambda: paged_decode_attention(q, view, None, tables, ctx, out=out_view)},
            kv_bytes, f"rel_err={err:.1e} splits={splits} view==lists:{torch.equal(out, out_view)}")
        t = eager["view"]
        row(f"decode kvforge bs={bs} view vs sdpa", shape, t, kv_bytes, f"{t_sdpa / t:.2f}x sdpa")

        def gather_sdpa():
            kg = k_cache[tables.long()].view(batch, length, HKV, D).transpose(1, 2)
            vg = v_cache[tables.long()].view(batch, length, HKV, D).transpose(1, 2)
            return F.scaled_dot_product_attention(q4, kg, vg, enable_gqa=True)

        t_g = bench(gather_sdpa)
        row(f"decode gather+sdpa bs={bs}", shape, t_g, kv_bytes, f"kvforge {t_g / t:.2f}x faster")
        if bs == 16 and batch == 64:  # the same blocks spread over 4 separate chunk allocations
            k_chunks, v_chunks, chunks, offsets = split_chunks(k_cache, v_cache, 4)
            del k_cache, v_cache, view
            view4 = describe_cache(k_chunks, v_chunks, chunk_offsets=offsets)
            out4 = paged_decode_attention(q, k_chunks, v_chunks, tables, ctx, chunk_offsets=offsets)
            out4_view = paged_decode_attention(q, view4, None, tables, ctx)
            launch_costs(
                f"decode kvforge bs={bs} 4 chunks", shape,
                {"lists": lambda: paged_decode_attention(q, k_chunks, v_chunks, tables, ctx, out=out4,
                                                         chunk_offsets=offsets),
                 "view": lambda: paged_decode_attention(q, view4, None, tables, ctx, out=out4_view)},
                kv_bytes, f"rel_err={rel_err(out4, ref):.1e} view==lists:{torch.equal(out4, out4_view)}")
            k_cache = v_cache = view = None
            del k_chunks, v_chunks, chunks, view4
        del k_cache, v_cache, view
    del k, v
    for page in flex_pages:
        try:
            t0 = time.time()
            f = flex_paged(q, k_sdpa, v_sdpa, page)
            err = rel_err(f().squeeze(2), want)
            t = bench(f)
            row(f"decode flex paged P={page}", shape, t, kv_bytes, f"rel_err={err:.1e} compile+run {time.time() - t0:.0f}s")
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop the table
            print(f"flex paged P={page} {shape} failed: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.empty_cache()


def bench_prefill(batch: int, length: int, block_sizes: tuple[int, ...], gen) -> None:
    shape = f"B={batch} new={length} causal"
    flops = 4 * batch * HQ * D * length * (length + 1) / 2
    q = torch.randn(batch * length, HQ, D, dtype=DT, device=DEV)
    k = torch.randn(batch, length, HKV, D, dtype=DT, device=DEV)
    v = torch.randn_like(k)
    qs = q.view(batch, length, HQ, D).transpose(1, 2)
    ks = k.transpose(1, 2).repeat_interleave(HQ // HKV, dim=1)  # flash wants equal heads
    vs = v.transpose(1, 2).repeat_interleave(HQ // HKV, dim=1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    want = flash().transpose(1, 2).reshape(batch * length, HQ, D)
    t_flash = bench(flash)
    row("prefill sdpa flash", shape, t_flash, None, f"{flops / t_flash / 1e12:.0f} TFLOP/s")
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * length
    ctx = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    for bs in block_sizes:
        k_cache, v_cache, tables = paged_from_contiguous(k, v, bs, gen)
        view = describe_cache(k_cache, v_cache)
        out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx)
        err = rel_err(out, want)
        t = bench(lambda: paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, out=out))
        row(f"prefill kvforge bs={bs}", shape, t, None,
            f"{flops / t / 1e12:.0f} TFLOP/s rel_err={err:.1e} {t_flash / t:.2f}x flash")
        row(f"prefill kvforge bs={bs} lists host", shape,
            host_time(lambda: paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, out=out), calls=16, reps=5),
            None,
            "host time per call (wrapper + enqueue)")
        row(f"prefill kvforge bs={bs} view host", shape,
            host_time(lambda: paged_prefill_attention(q, view, None, tables, cu, ctx, out=out), calls=16, reps=5),
            None,
            "host time per call (wrapper + enqueue)")
        del view
        if bs == 16:  # the same blocks spread over 4 separate chunk allocations
            k_chunks, v_chunks, chunks, offsets = split_chunks(k_cache, v_cache, 4)
            del k_cache, v_cache
            out = paged_prefill_attention(q, k_chunks, v_chunks, tables, cu, ctx, chunk_offsets=offsets)
            err = rel_err(out, want)
            t = bench(lambda: paged_prefill_attention(q, k_chunks, v_chunks, tables, cu, ctx, out=out,
                                                      chunk_offsets=offsets))
            row(f"prefill kvforge bs={bs} 4 chunks", shape, t, None,
                f"{flops / t / 1e12:.0f} TFLOP/s rel_err={err:.1e} {t_flash / t:.2f}x flash")
            k_cache = v_cache = None
            del k_chunks, v_chunks, chunks
        del k_cache, v_cache
    torch.cuda.empty_cache()


def bench_store(num_tokens: int, gen) -> None:
    bs, num_blocks = 16, 4 * num_tokens // 16
    k_cache = torch.zeros(num_blocks, bs, HKV, D, dtype=DT, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(num_blocks, generator=gen)[: num_tokens // bs].to(DEV)
    slots = (blocks[:, None] * bs + torch.arange(bs, device=DEV)).reshape(-1)
    key = torch.randn(num_tokens, HKV, D, dtype=DT, device=DEV)
    value = torch.randn_like(key)
    store_kv(key, value, k_cache, v_cache, slots)
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    reference.store_kv(key, value, k2, v2, slots)
    ok = torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    nbytes = 2 * 2 * key.numel() * 2  # K and V, read + write
    view = describe_cache(k_cache, v_cache)
    # one call alone is shorter than its launch overhead: time it in a CUDA graph too (GPU time only),
    # and as 32 back-to-back calls, one per layer of a 32-layer prefill
    launch_costs("store_kv", f"{num_tokens} tok bs={bs}",
                 {"lists": lambda: store_kv(key, value, k_cache, v_cache, slots),
                  "view": lambda: store_kv(key, value, view, None, slots)},
                 nbytes, f"exact={ok}")
    t32 = bench(lambda: [store_kv(key, value, view, None, slots) for _ in range(32)]) / 32
    row("store_kv view x32 calls, per call", f"{num_tokens} tok bs={bs}", t32, nbytes, "eager launches back to back")
    t_ref = bench(lambda: reference.store_kv(key, value, k_cache, v_cache, slots))
    row("store_kv torch index_put", f"{num_tokens} tok bs={bs}", t_ref, nbytes)


def bench_copy(num_pairs: int, num_layers: int, gen) -> None:
    bs, num_blocks = 16, 2 * num_pairs + 96
    storage = torch.randn(num_layers, 2, num_blocks, bs, HKV, D, dtype=DT, device=DEV)
    perm = torch.randperm(num_blocks, generator=gen)
    src, dst = perm[:num_pairs].to(DEV), perm[num_pairs : 2 * num_pairs].to(DEV)
    want = storage.clone()
    want[:, :, dst] = want[:, :, src]
    copy_blocks(storage, src, dst)
    ok = torch.equal(storage, want)
    del want
    nbytes = 2 * num_pairs * num_layers * 2 * bs * HKV * D * 2
    t = bench(lambda: copy_blocks(storage, src, dst, validate=False))
    row("copy_blocks", f"{num_pairs} pairs x {num_layers} layers", t, nbytes, f"exact={ok}")
    t_ref = bench(lambda: storage.__setitem__((slice(None), slice(None), dst), storage[:, :, src]))
    row("copy_blocks torch indexing", f"{num_pairs} pairs x {num_layers} layers", t_ref, nbytes)
    del storage
    torch.cuda.empty_cache()


def fp8_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn):
    """The same blocks quantized to ``dtype`` (scale 1.0: randn values lie far inside the range),
    and their CacheView."""
    ones = torch.ones(k_cache.shape[2], device=DEV)
    kq, vq = quantize(k_cache, ones, dtype), quantize(v_cache, ones, dtype)
    return kq, vq, describe_cache(kq, vq, k_scale=ones, v_scale=ones, model_dtype=k_cache.dtype)


def _fp8_paths() -> tuple[str, ...]:
    native = torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 9)
    return ("native", "bits") if native else ("bits",)


def bench_fp8_decode(batch: int, length: int, heads_q: int, heads_kv: int, dim: int, block_size: int, gen) -> None:
    """fp8_e4m3 decode against bf16 decode of the same shape (the same blocks, quantized)."""
    from kvforge.kernels import triton_fp8

    shape = f"B={batch} L={length} {heads_q}/{heads_kv}h d{dim}"
    bf16_bytes = 2 * batch * length * heads_kv * dim * 2
    q = torch.randn(batch, heads_q, dim, dtype=DT, device=DEV)
    k_cache, v_cache, tables, ctx = random_paged(batch, length, heads_kv, dim, block_size, gen)
    view = describe_cache(k_cache, v_cache)
    out = torch.empty_like(q)
    want = paged_decode_attention(q, view, None, tables, ctx).clone()
    decode = lambda v, o: lambda: paged_decode_attention(q, v, None, tables, ctx, out=o)  # noqa: E731
    t_eager, t_graph = bench(decode(view, out)), bench_graph(decode(view, out))
    row(f"decode bf16 bs={block_size} view eager", shape, t_eager, bf16_bytes)
    row(f"decode bf16 bs={block_size} view graph", shape, t_graph, bf16_bytes, "kernel time without launch cost")
    kq, vq, view8 = fp8_cache(k_cache, v_cache)
    del k_cache, v_cache, view
    out8 = torch.empty_like(q)
    for path in _fp8_paths():
        triton_fp8.FORCE_DECODE = path
        try:
            err = rel_err(paged_decode_attention(q, view8, None, tables, ctx), want)
            e8, g8 = bench(decode(view8, out8)), bench_graph(decode(view8, out8))
        finally:
            triton_fp8.FORCE_DECODE = None
        row(f"decode fp8_e4m3 {path} bs={block_size} view eager", shape, e8, bf16_bytes / 2,
            f"{t_eager / e8:.2f}x bf16 eager rel_err_vs_bf16={err:.1e}")
        row(f"decode fp8_e4m3 {path} bs={block_size} view graph", shape, g8, bf16_bytes / 2,
            f"{t_graph / g8:.2f}x bf16 graph (target >= 1.7x)")
    del kq, vq, view8
    torch.cuda.empty_cache()


def bench_fp8_prefill(batch: int, length: int, block_size: int, gen) -> None:
    """fp8_e4m3 prefill against bf16 prefill of the same shape (the same blocks, quantized)."""
    from kvforge.kernels import triton_fp8

    shape = f"B={batch} new={length} causal"
    flops = 4 * batch * HQ * D * length * (length + 1) / 2
    q = torch.randn(batch * length, HQ, D, dtype=DT, device=DEV)
    k_cache, v_cache, tables, ctx = random_paged(batch, length, HKV, D, block_size, gen)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * length
    view = describe_cache(k_cache, v_cache)
    out = torch.empty_like(q)
    want = paged_prefill_attention(q, view, None, tables, cu, ctx).clone()
    t = bench(lambda: paged_prefill_attention(q, view, None, tables, cu, ctx, out=out))
    row(f"prefill bf16 bs={block_size} view", shape, t, None, f"{flops / t / 1e12:.0f} TFLOP/s")
    kq, vq, view8 = fp8_cache(k_cache, v_cache)
    del k_cache, v_cache, view
    for path in _fp8_paths():
        triton_fp8.FORCE_DECODE = path
        try:
            err = rel_err(paged_prefill_attention(q, view8, None, tables, cu, ctx), want)
            t8 = bench(lambda: paged_prefill_attention(q, view8, None, tables, cu, ctx, out=out))
        finally:
            triton_fp8.FORCE_DECODE = None
        row(f"prefill fp8_e4m3 {path} bs={block_size} view", shape, t8, None,
            f"{flops / t8 / 1e12:.0f} TFLOP/s {t / t8:.2f}x bf16 (target >= 0.9x) rel_err_vs_bf16={err:.1e}")
    del kq, vq, view8
    torch.cuda.empty_cache()


def bench_fp8_store(num_tokens: int, gen) -> None:
    """The quantizing store (fp8_e4m3) against the bf16 store, kernel time in a CUDA graph."""
    bs, num_blocks = 16, 4 * num_tokens // 16
    blocks = torch.randperm(num_blocks, generator=gen)[: num_tokens // bs].to(DEV)
    slots = (blocks[:, None] * bs + torch.arange(bs, device=DEV)).reshape(-1)
    key = torch.randn(num_tokens, HKV, D, dtype=DT, device=DEV)
    value = torch.randn_like(key)
    k_cache = torch.zeros(num_blocks, bs, HKV, D, dtype=DT, device=DEV)
    view = describe_cache(k_cache, torch.zeros_like(k_cache))
    t = bench_graph(lambda: store_kv(key, value, view, None, slots))
    row("store_kv bf16 view graph", f"{num_tokens} tok bs={bs}", t, 2 * key.numel() * (2 + 2))
    _, _, view8 = fp8_cache(k_cache, k_cache.clone())
    store_kv(key, value, view8, None, slots)
    want = quantize(key, view8.k_scale, torch.float8_e4m3fn).view(torch.uint8)
    exact = torch.equal(view8.k_chunks[0].view(-1, HKV, D)[slots].view(torch.uint8), want)
    t8 = bench_graph(lambda: store_kv(key, value, view8, None, slots))
    row("store_kv fp8_e4m3 view graph", f"{num_tokens} tok bs={bs}", t8, 2 * key.numel() * (2 + 1),
        f"{t / t8:.2f}x bf16 store; bytes==torch quantize:{exact}")
    del k_cache, view, view8
    torch.cuda.empty_cache()


def bench_head_dims(gen, dims: tuple[int, ...] = (64, 80, 96, 128, 256), batch: int = 64, length: int = 2048) -> None:
    """Decode at every head dim the models use (32/8 heads), kernel time in a CUDA graph: SDPA
    on a contiguous bf16 cache, the bf16 paged cache (% of copy bandwidth), the fp8_e4m3 one
    (its bytes are half: the ratio to bf16 is the speed-up)."""
    for dim in dims:
        shape = f"B={batch} L={length} 32/8h d{dim}"
        bf16_bytes = 2 * batch * length * HKV * dim * 2
        q = torch.randn(batch, HQ, dim, dtype=DT, device=DEV)
        k = torch.randn(batch, length, HKV, dim, dtype=DT, device=DEV)
        v = torch.randn_like(k)
        q4 = q.unsqueeze(2)
        k_sdpa, v_sdpa = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        t_sdpa = bench_graph(lambda: F.scaled_dot_product_attention(q4, k_sdpa, v_sdpa, enable_gqa=True))
        want = F.scaled_dot_product_attention(q4, k_sdpa, v_sdpa, enable_gqa=True).squeeze(2)
        del k_sdpa, v_sdpa
        row("decode sdpa contiguous graph", shape, t_sdpa, bf16_bytes)
        k_cache, v_cache, tables = paged_from_contiguous(k, v, 16, gen)
        del k, v
        ctx = torch.full((batch,), length, dtype=torch.int32, device=DEV)
        view = describe_cache(k_cache, v_cache)
        out = torch.empty_like(q)
        err = rel_err(paged_decode_attention(q, view, None, tables, ctx), want)
        t = bench_graph(lambda: paged_decode_attention(q, view, None, tables, ctx, out=out))
        row("decode bf16 bs=16 view graph", shape, t, bf16_bytes, f"{t_sdpa / t:.2f}x sdpa rel_err={err:.1e}")
        _, _, view8 = fp8_cache(k_cache, v_cache)
        del k_cache, v_cache, view
        err8 = rel_err(paged_decode_attention(q, view8, None, tables, ctx), want)
        t8 = bench_graph(lambda: paged_decode_attention(q, view8, None, tables, ctx, out=out))
        row("decode fp8_e4m3 bs=16 view graph", shape, t8, bf16_bytes / 2,
            f"{t / t8:.2f}x bf16 (target >= 1.7x) rel_err_vs_bf16={err8:.1e}")
        del view8
        torch.cuda.empty_cache()


def run_fp8(gen) -> None:
    bench_fp8_decode(64, 4096, HQ, HKV, D, 16, gen)
    bench_fp8_decode(128, 1024, 32, 4, 64, 16, gen)  # the TinyLlama shape of the engine benchmark
    bench_fp8_decode(16, 16384, HQ, HKV, D, 16, gen)
    bench_fp8_prefill(8, 4096, 16, gen)
    bench_fp8_store(8192, gen)


def sweep(gen, which: str) -> None:
    """Decode/prefill launch configs (for choosing the defaults)."""
    from kvforge.kernels import triton_decode, triton_prefill

    for batch, length in ((64, 4096), (16, 16384)) if which in ("decode", "all") else ():
        q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
        k_cache, v_cache, tables, ctx = random_paged(batch, length, HKV, D, 16, gen)
        view = describe_cache(k_cache, v_cache)
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * length * HKV * D * 2
        for block_n, warps, stages in ((64, 4, 3), (64, 4, 4), (64, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 3)):
            for splits in ((None,) if batch == 64 else (None, 2, 4, 8)):
                f = lambda: triton_decode.launch_decode(  # noqa: E731
                    q, view, view.offsets, tables, ctx, out, scale=D**-0.5, sliding_window=None, soft_cap=None,
                    num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    row("sweep decode", f"B={batch} L={length} n{block_n} w{warps} s{stages} sp{splits}",
                        bench(f), kv_bytes)
                except Exception as exc:  # noqa: BLE001
                    print(f"sweep decode n{block_n} w{warps} s{stages}: {type(exc).__name__} {str(exc)[:120]}")
        del k_cache, v_cache
        torch.cuda.empty_cache()
    if which not in ("prefill", "all"):
        return
    batch, length = 8, 4096
    flops = 4 * batch * HQ * D * length * (length + 1) / 2
    q = torch.randn(batch * length, HQ, D, dtype=DT, device=DEV)
    k_cache, v_cache, tables, ctx = random_paged(batch, length, HKV, D, 16, gen)
    view = describe_cache(k_cache, v_cache)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * length
    out = torch.empty_like(q)
    for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 32, 4, 3), (256, 64, 8, 3), (256, 32, 8, 3),
                                  (256, 32, 8, 4), (256, 64, 8, 2), (256, 64, 16, 3), (256, 128, 16, 3)):
        f = lambda: triton_prefill.launch_prefill(  # noqa: E731
            q, view, view.offsets, tables, cu, ctx, out, scale=D**-0.5, sliding_window=None, soft_cap=None,
            block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            t = bench(f)
            row("sweep prefill", f"m{bm} n{bn} w{warps} s{stages}", t, None, f"{flops / t / 1e12:.0f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            print(f"sweep prefill m{bm} n{bn} w{warps} s{stages}: {type(exc).__name__} {str(exc)[:120]}")
    torch.cuda.empty_cache()


#: ``--launch`` shapes: (batch, context, query heads, KV heads, head dim); the small ones are
#: host-bound when each call pays tens of microseconds in Python
LAUNCH_DECODE_SHAPES = ((1, 128, 32, 8, 128), (16, 512, 32, 8, 128), (128, 1024, 32, 4, 64),
                        (64, 4096, 32, 8, 128), (256, 1024, 32, 8, 128))


def bench_launch(gen) -> None:
    """Eager against in-graph time and the host time of one call, at host-bound and
    GPU-bound shapes, over a CacheView (the storage layer's path): the thin-wrapper rows.
    ``eager`` here is :func:`bench_back_to_back` (no cache flush, like the graph timing;
    do_bench flushes the L2 cache before each call, which alone makes a context that fits
    in L2 read slower than in a graph)."""
    summary = []
    for batch, length, hq, hkv, dim in LAUNCH_DECODE_SHAPES:
        shape = f"B={batch} L={length} {hq}/{hkv}h d{dim}"
        q = torch.randn(batch, hq, dim, dtype=DT, device=DEV)
        k_cache, v_cache, tables, ctx = random_paged(batch, length, hkv, dim, 16, gen)
        view = describe_cache(k_cache, v_cache)
        out = torch.full_like(q, float("nan"))
        fn = lambda: paged_decode_attention(q, view, None, tables, ctx, out=out)  # noqa: E731
        fn()
        err = rel_err(out, reference.paged_decode_attention(q, k_cache, v_cache, tables, ctx))
        t_e, t_g, t_h = bench_back_to_back(fn), bench_graph(fn), host_time(fn)
        nbytes = 2 * batch * length * hkv * dim * 2
        splits = decode_splits(batch, tables.shape[1] * 16, view)
        row("launch decode eager", shape, t_e, nbytes, f"rel_err={err:.1e} splits={splits}")
        row("launch decode graph", shape, t_g, nbytes, "kernel time without launch cost")
        row("launch decode host", shape, t_h, None, f"host per call; eager/graph {t_e / t_g:.2f}x")
        summary.append(("decode", shape, t_e, t_g, t_h))
        del k_cache, v_cache, view
    for batch, length in ((1, 128), (4, 512), (8, 4096)):
        shape = f"{batch} x {length} causal d{D}"
        q = torch.randn(batch * length, HQ, D, dtype=DT, device=DEV)
        k_cache, v_cache, tables, ctx = random_paged(batch, length, HKV, D, 16, gen)
        view = describe_cache(k_cache, v_cache)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * length
        out = torch.empty_like(q)
        fn = lambda: paged_prefill_attention(q, view, None, tables, cu, ctx, out=out)  # noqa: E731
        t_e, t_g, t_h = bench_back_to_back(fn, calls=16), bench_graph(fn), host_time(fn, calls=16)
        row("launch prefill eager", shape, t_e, None)
        row("launch prefill graph", shape, t_g, None, "kernel time without launch cost")
        row("launch prefill host", shape, t_h, None, f"host per call; eager/graph {t_e / t_g:.2f}x")
        summary.append(("prefill", shape, t_e, t_g, t_h))
        del k_cache, v_cache, view
    for num_tokens in (16, 8192):
        shape = f"{num_tokens} tok {HKV}h d{D}"
        k_cache = torch.zeros(4 * num_tokens // 16 + 16, 16, HKV, D, dtype=DT, device=DEV)
        view = describe_cache(k_cache, torch.zeros_like(k_cache))
        slots = torch.randperm(k_cache.shape[0] * 16, generator=gen)[:num_tokens].to(DEV)
        key = torch.randn(num_tokens, HKV, D, dtype=DT, device=DEV)
        fn = lambda: store_kv(key, key, view, None, slots)  # noqa: E731
        t_e, t_g, t_h = bench_back_to_back(fn), bench_graph(fn), host_time(fn)
        row("launch store_kv eager", shape, t_e, None)
        row("launch store_kv graph", shape, t_g, None, "kernel time without launch cost")
        row("launch store_kv host", shape, t_h, None, f"host per call; eager/graph {t_e / t_g:.2f}x")
        summary.append(("store_kv", shape, t_e, t_g, t_h))
        del k_cache, view
    print("\n| kernel | shape | eager us (back to back) | graph us | eager / graph | host us per call |")
    print("|---|---|---:|---:|---:|---:|")
    for kernel, shape, t_e, t_g, t_h in summary:
        print(f"| {kernel} | {shape} | {t_e * 1e6:.1f} | {t_g * 1e6:.1f} | {t_e / t_g:.2f}x | {t_h * 1e6:.1f} |")
    torch.cuda.empty_cache()


def main() -> None:
    global COPY_TBS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline (slow to compile)")
    parser.add_argument("--sweep", choices=("none", "decode", "prefill", "all"), default="none",
                        help="also time several launch configs")
    parser.add_argument("--fp8-only", action="store_true",
                        help="only the fp8 rows: fp8_e4m3 decode / prefill / store against bf16 at the same shapes")
    parser.add_argument("--head-dims", action="store_true",
                        help="only the head-dim rows: bf16 and fp8_e4m3 decode at head dims 64-256 beside SDPA")
    parser.add_argument("--launch", action="store_true",
                        help="only the launch-cost rows: eager, in-graph and host time per call at host-bound shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA/ROCm device")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    COPY_TBS = measure_copy()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {COPY_TBS:.2f} TB/s "
          f"(1 GiB copy, read+write)  {time.strftime('%Y-%m-%d')}")
    print(f"# decode/prefill: {HQ} query heads, {HKV} KV heads, head_dim {D}, bf16; shuffled block tables")
    print("# eager: per call, launch included; graph: kernel time in a CUDA graph; host: host time per call of "
          "back-to-back calls without sync. lists: (k_cache, v_cache) chunk lists; view: a CacheView")
    print(f"{'kernel':<{KERNEL_W}} {'shape':<26} {'time_us':>10} {'TB/s':>6} {'%copy':>6}  note")
    if args.fp8_only:
        run_fp8(gen)
        return
    if args.head_dims:
        bench_head_dims(gen)
        return
    if args.launch:
        bench_launch(gen)
        return
    if args.sweep != "none":
        sweep(gen, args.sweep)
    flex = not args.no_flex
    bench_prefill(8, 4096, (16, 64), gen)
    bench_store(8192, gen)
    bench_copy(2000, 32, gen)
    bench_decode(64, 4096, (16, 64), (16, 64) if flex else (), gen)
    bench_decode(16, 16384, (16, 64), (16,) if flex else (), gen)
    bench_decode(256, 1024, (16, 64), (16,) if flex else (), gen)
    bench_head_dims(gen)
    run_fp8(gen)


if __name__ == "__main__":
    main()
