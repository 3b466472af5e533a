"""Triton paged decode attention: split-KV (flash-decoding), merged in the same launch.

Grid ``(num_kv_heads, num_splits, batch)``: one program per KV head, split
and sequence. It loads the ``group = num_q_heads // num_kv_heads`` query rows
of its KV head (padded to ``GROUP_PAD >= 16`` rows so that ``tl.dot`` runs on
the tensor cores), walks its share of the context in tiles of ``BLOCK_N``
tokens gathered through the block table (several pages per tile), and keeps
an online softmax in float32 (base 2). With one split the program normalizes
and writes the output itself; otherwise it writes its normalized partial
output and log2-sum-exp to float32 scratch, and the last program of its
(sequence, KV head) to finish — an int32 counter per pair says which — folds
every split into the output and zeroes the counter again: one launch, no
merge kernel. ``num_splits`` is a runtime argument (no recompile per split
count) chosen from shapes alone by :func:`choose_num_splits`. KV heads vary
fastest in the launch order so that the programs reading the same pages
(different heads of one token row) run together. With several chunks, the
per-chunk offset table is loaded once into registers and indexed with
``tl.gather``, so the block-table load stays the only dependent global load
in the loop (and stays software-pipelined).

A head dim that is not a power of two of at least 16 (80, 96, 112, 192, 8,
...) runs in a tile of ``BLOCK_D`` = the next one (:func:`padded_head_dim`)
with ``HAS_PAD`` set: every load masks the padding columns to 0 (so they add
nothing to ``Q·Kᵀ`` and leave zero columns in the output) and every store
skips them. ``HAS_PAD`` is a constexpr, so a power-of-two head dim compiles to
exactly the kernel without masks on ``head_dim``.

Host cost per launch is kept to the launch itself: :class:`DecodeLaunch`
fixes the split count, config, grid and scalars of a call signature once,
then launches the kept compiled kernel with raw pointers
(:mod:`kvforge.kernels.triton_launch`); the split-KV scratch and counters
come from buffers per (device, stream) that grow on demand
(:func:`split_scratch`, :func:`split_counters`), fresh only while a CUDA graph
is being captured.
An fp8 cache (``FP8`` > 0) is read natively or by its bits
(:mod:`kvforge.kernels.triton_fp8`); each tile is cast to the query dtype
(float16 with a bfloat16 model: ``HALF_DOTS``) before ``tl.dot``, the KV
head's key scale is folded into ``q_scale`` and its value scale multiplies
the normalized output, so dequantizing adds no per-element multiply. On CUDA
an e4m3 value tile is read as int16 pairs of columns (``FP8 == 4``,
:func:`~kvforge.kernels.triton_fp8.paired_values`): the pairs transpose as
16-bit words for the B operand of ``P·V`` (a byte tile would be gathered
from shared memory one byte at a time), :func:`e4m3_pairs_to_f16` splits them
into the even and the odd columns, and each gets its own dot and accumulator,
interleaved after the loop. fp8 tiles hold twice bf16's tokens under a
128-register cap (:func:`_config_for`).
This module imports triton; :mod:`kvforge.kernels.ops` loads it lazily.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvforge.kernels.layout import CacheView, padded_head_dim
from kvforge.kernels.triton_fp8 import decode_mode, e4m3_pairs_to_f16, fp8_bits_to_f16, paired_values, raw_mul
from kvforge.kernels.triton_launch import (
    Launch, aligned, attention_scalars, current_device, current_stream, is_capturing, no_launch_hooks, view_chunks,
    view_pointers,
)

__all__ = ["DecodeLaunch", "launch_decode", "choose_num_splits", "split_scratch", "split_counters", "release_scratch",
           "KERNELS"]

@triton.jit(do_not_specialize=["num_chunks", "num_splits"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, chunk_off_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, k_scale_ptr, v_scale_ptr,
    scale, soft_cap, sliding_window, chunk_blocks, num_chunks, num_splits,
    stride_qb, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    MULTI_CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, RAW_MUL: tl.constexpr, HALF_DOTS: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM  # used only with HAS_PAD (all true otherwise)
    if HAS_PAD:
        out_mask = row_ok[:, None] & d_ok[None, :]
    else:
        out_mask = row_ok[:, None]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=out_mask, other=0.0)
    if USE_SOFT_CAP:
        q_scale = scale
    else:
        q_scale = scale * 1.4426950408889634  # fold log2(e) for exp2
    if HALF_DOTS:  # fp8 widens to float16 in one instruction (bfloat16 takes several): the dots
        # run in float16, the query converted once (exact for |q| up to 65504, saturated beyond)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)
    if FP8 != 0:  # dequantize by folding: s = (q . k_raw) * k_scale, o = (p @ v_raw) * v_scale
        q_scale = q_scale * (tl.load(k_scale_ptr + kv_head) * RAW_MUL)
        v_mul = tl.load(v_scale_ptr + kv_head) * RAW_MUL

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    if FP8 == 4:
        acc = tl.zeros([GROUP_PAD, BLOCK_D // 2], tl.float32)
        acc2 = tl.zeros([GROUP_PAD, BLOCK_D // 2], tl.float32)
    else:
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        acc2 = 0.0  # unused
    table = block_tables_ptr + seq * stride_bt
    head_off = kv_head * stride_ch
    if MULTI_CHUNK:
        offs_c = tl.arange(0, CHUNKS_PAD)
        chunk_table = tl.load(chunk_off_ptr + offs_c, mask=offs_c < num_chunks, other=0)
    for t0 in range(start, end, BLOCK_N):
        n = t0 + offs_n
        n_ok = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0)
        if MULTI_CHUNK:
            # chunk offsets come from registers (tl.gather), not a second dependent
            # global load, so the block-table load stays pipelined; int32 division
            which = block // chunk_blocks
            chunk_base = tl.multiple_of(tl.gather(chunk_table, which, 0), 16)
            base = chunk_base + (block - which * chunk_blocks).to(tl.int64) * stride_cb
        else:
            base = block.to(tl.int64) * stride_cb
        row = base + (n % BLOCK_SIZE) * stride_ct + head_off
        if HAS_PAD:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = n_ok[:, None]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8 == 1 or FP8 == 4:
            k = k.to(q.dtype)
        elif FP8 != 0:
            k = fp8_bits_to_f16(k, FP8 == 2).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * q_scale
        if USE_SOFT_CAP:
            # c * tanh(x / c), tanh written with exp so the interpreter runs it too
            s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0)) * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8 == 4:  # int16 words (d, d+1): even and odd columns into their own accumulators
            offs_j = tl.arange(0, BLOCK_D // 2)
            if HAS_PAD:
                w_mask = n_ok[:, None] & (offs_j * 2 < HEAD_DIM)[None, :]
            else:
                w_mask = n_ok[:, None]
            w = tl.load(v_ptr + (row // 2)[:, None] + offs_j[None, :], mask=w_mask, other=0)
            v_even, v_odd = e4m3_pairs_to_f16(w)
            p16 = p.to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p16, v_even)
            acc2 = acc2 * alpha[:, None] + tl.dot(p16, v_odd)
        else:
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if FP8 == 1:
                v = v.to(q.dtype)
            elif FP8 != 0:
                v = fp8_bits_to_f16(v, FP8 == 2).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if FP8 == 4:  # interleave the even and odd columns back
        acc = tl.reshape(tl.join(acc, acc2), [GROUP_PAD, BLOCK_D])

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if FP8 != 0:
        o = o * v_mul
    if SINGLE_SPLIT:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # scratch is contiguous [batch, num_q_heads, num_splits, HEAD_DIM] / [.., num_splits]
        num_q_heads = tl.num_programs(0) * GROUP
        first = (seq * num_q_heads + heads) * num_splits
        tl.store(part_out_ptr + (first + split)[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + first + split, lse, mask=row_ok)
        # the last split of (seq, kv_head) to finish folds every split's partial into the
        # output: no second launch. Every thread's stores are issued before the barrier, and the
        # counter's acq_rel atomic (gpu scope) publishes them to, and takes the others' from, the
        # other programs; the partials are then read past the non-coherent L1 (volatile).
        tl.debug_barrier()
        counter = counter_ptr + seq * tl.num_programs(0) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            m_all = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            for s in range(0, num_splits):
                m_all = tl.maximum(m_all, tl.load(part_lse_ptr + first + s, mask=row_ok, other=float("-inf"),
                                                  volatile=True))
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            num = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
            den = tl.zeros([GROUP_PAD], tl.float32)
            for s in range(0, num_splits):
                w = tl.exp2(tl.load(part_lse_ptr + first + s, mask=row_ok, other=float("-inf"), volatile=True)
                            - m_all)
                part_o = tl.load(part_out_ptr + (first + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=out_mask,
                                 other=0.0, volatile=True)
                num += part_o * w[:, None]
                den += w
            res = num / tl.where(den > 0.0, den, 1.0)[:, None]
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: the most splits :func:`choose_num_splits` picks
MAX_AUTO_SPLITS = 64


@functools.lru_cache(maxsize=4096)
def choose_num_splits(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int, block_n: int,
                      programs_per_sm: int = 4) -> int:
    """Split count so that ``batch * num_kv_heads * splits`` programs fill
    the GPU in near-whole waves of ``programs_per_sm`` resident programs per
    SM (the smallest count reaching 90% wave efficiency), never giving a
    split fewer than ``4 * block_n`` tokens of the longest context the block
    table can hold. Depends on shapes only, so it never syncs; memoized on
    its integer arguments (bounded: the table width grows with the context)."""
    work = batch * num_kv_heads
    slots = programs_per_sm * num_sms
    max_splits = max(1, min(MAX_AUTO_SPLITS, -(-max_tokens // (4 * block_n))))
    best, best_eff = 1, 0.0
    for splits in range(1, max_splits + 1):
        programs = work * splits
        eff = programs / (-(-programs // slots) * slots)
        if eff > best_eff + 1e-9:
            best, best_eff = splits, eff
        if eff >= 0.9:
            break
    return best


def _config(view: CacheView, fp8: int = 0) -> tuple[int, int, int, int | None]:
    """(BLOCK_N, num_warps, num_stages, maxnreg) for this head dim's tile, dtype and fp8 read mode."""
    return _config_for(view.device.type == "cuda" and torch.version.hip is None, view.device.type == "cuda",
                       padded_head_dim(view.head_dim), view.dtype == torch.float32, fp8)


@functools.lru_cache(maxsize=None)  # at most 2 x 2 x 5 x 2 x 5 entries
def _config_for(on_cuda: bool, on_gpu: bool, block_d: int, is_fp32: bool, fp8: int) -> tuple[int, int, int, int | None]:
    # keyed on the padded tile width: registers and shared memory follow the tile, not head_dim.
    # The launch pipelines one tile ahead; at 4 warps the registers decide how many programs
    # an SM holds, so the fp8 tiles (half the bytes) are twice as long and, on CUDA, capped at
    # 128 registers (4 programs per SM): measured on an H200, docs/kernels.md "fp8 decode".
    if not on_gpu:
        return (16 if block_d >= 128 else 32), 4, 1, None  # interpreter: small tiles, several per page
    if on_cuda and fp8 == 4:  # paired values
        return {32: (128, 4, 3, 128), 64: (128, 4, 3, 128), 128: (128, 4, 3, 128), 256: (64, 4, 2, 128)}[block_d]
    if on_cuda and fp8 == 1 and not is_fp32 and block_d in (64, 128):  # cast tiles
        return (128, 4, 3, 128) if block_d == 64 else (128, 4, 2, 128)
    block_n = {16: 128, 32: 128, 64: 128, 128: 64, 256: 32}[block_d]
    if is_fp32:
        block_n //= 2
    return block_n, 4, 2 if block_d == 256 else 3, None


#: Split-KV scratch, one flat float32 buffer per (device, stream), and the
#: int32 split counters beside it (:data:`_COUNTERS`). Reuse is safe because
#: everything on one stream runs in order: call n's last programs, which read
#: its partials and zero its counters again, finish before call n+1's first
#: programs write them. A buffer that is dropped (grown, evicted, released) goes back to the
#: caching allocator, which hands its memory only to later work of the stream
#: it was allocated on, so in-flight kernels still reading it are safe too.
_SCRATCH: dict[tuple[str, int, int], Tensor] = {}
_MAX_SCRATCH = 64


def split_scratch(batch: int, num_q_heads: int, num_splits: int, head_dim: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Float32 scratch ``part_out`` ``[batch, num_q_heads, num_splits,
    head_dim]`` and ``part_lse`` ``[batch, num_q_heads, num_splits]``, both
    contiguous, for one decode launch on the current stream.

    Views of the reusable buffer of (``device``, current stream), grown to the
    next power of two of elements when short; valid until the next call on
    that stream. While the current stream is capturing a CUDA graph the
    tensors are fresh allocations instead (the graph keeps them in its pool),
    so a graph never points at a buffer that a later, larger call replaces.
    """
    n_out = batch * num_q_heads * num_splits * head_dim
    need = n_out + batch * num_q_heads * num_splits
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        buf = torch.empty(need, dtype=torch.float32, device=device)
    else:
        buf = _stream_buffer(_SCRATCH, need, torch.float32, device)
    return _split(buf, n_out, need, batch, num_q_heads, num_splits, head_dim)


def _stream_buffer(buffers: dict[tuple[str, int, int], Tensor], need: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """The reusable buffer of (``device``, current stream) in ``buffers``, grown to the next
    power of two of ``need`` elements when short (zeros: the counters rely on it)."""
    if device.type == "cuda":
        key = (device.type, device.index if device.index is not None else torch.cuda.current_device(),
               torch.cuda.current_stream(device).cuda_stream)
    else:  # the interpreter: runs synchronously
        key = (device.type, device.index if device.index is not None else -1, 0)
    buf = buffers.get(key)
    if buf is None or buf.numel() < need:
        buffers.pop(key, None)  # drop the old buffer before allocating its successor
        if len(buffers) >= _MAX_SCRATCH:  # streams come and go (stream pools): bound the dict
            del buffers[next(iter(buffers))]
        buf = buffers[key] = torch.zeros(triton.next_power_of_2(need), dtype=dtype, device=device)
    return buf


#: Per (device, stream): int32 zeros, one counter per (sequence, KV head) of a split
#: launch; each launch leaves them zero again (the last split of a pair resets its own).
_COUNTERS: dict[tuple[str, int, int], Tensor] = {}


def split_counters(batch: int, num_kv_heads: int, device: torch.device) -> Tensor:
    """Int32 zeros ``[batch * num_kv_heads]`` for one split decode launch on the current
    stream: the reusable buffer of (``device``, current stream), or fresh zeros while a
    CUDA graph is captured (as :func:`split_scratch`)."""
    need = batch * num_kv_heads
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(need, dtype=torch.int32, device=device)
    return _stream_buffer(_COUNTERS, need, torch.int32, device)[:need]


def _split(buf: Tensor, n_out: int, need: int, batch: int, num_q_heads: int, num_splits: int,
           head_dim: int) -> tuple[Tensor, Tensor]:
    # part_out is a multiple of 8 floats (head_dim a multiple of 8), so part_lse stays 32-byte aligned
    return (buf[:n_out].view(batch, num_q_heads, num_splits, head_dim),
            buf[n_out:need].view(batch, num_q_heads, num_splits))


def release_scratch() -> None:
    """Frees every split-KV scratch buffer and counter (memory returns to the caching allocator)."""
    _SCRATCH.clear()
    _COUNTERS.clear()


class DecodeLaunch:
    """The launches of one decode call shape: built once from validated inputs, then
    called with every later call's tensors of the same metadata (shapes, dtypes,
    strides, devices) over the same view, the same options.

    Built for such repeats (the kernel wrapper keeps one per call signature): the
    split count, configs, grids and scalars are fixed here, and after the first
    launch each kernel is launched again through :class:`~kvforge.kernels.triton_launch.Launch`
    without the JIT's dispatch (the host then spends a few microseconds a call).
    """

    __slots__ = ("num_splits", "scalars", "view_ptrs", "decode", "scratch_shape", "num_pairs", "fp8", "on_gpu")

    def __init__(self, query: Tensor, view: CacheView, block_tables: Tensor, out: Tensor, *, scale: float,
                 sliding_window: int | None, soft_cap: float | None, num_splits: int | None,
                 block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                 maxnreg: int | None = None) -> None:
        batch, num_q_heads, head_dim = query.shape
        group = num_q_heads // view.num_kv_heads
        block_d = padded_head_dim(head_dim)
        k0 = view.k_chunks[0]
        fp8 = 0
        if view.k_scale is not None:
            fp8 = paired_values(decode_mode(k0.dtype, view.device), k0.dtype, view.device, block_d, query.dtype,
                                view.v_chunks[0])
        self.fp8 = fp8
        cfg_n, cfg_warps, cfg_stages, cfg_maxnreg = _config(view, fp8)
        block_n = block_n or cfg_n
        maxnreg = maxnreg if maxnreg is not None else cfg_maxnreg
        if num_splits is None:
            sms = 4  # the interpreter: any small number
            if view.device.type == "cuda":
                sms = _num_sms(view.device.index if view.device.index is not None else torch.cuda.current_device())
            num_splits = choose_num_splits(batch, view.num_kv_heads, block_tables.shape[1] * view.block_size, sms,
                                           block_n)
        self.num_splits = num_splits
        self.on_gpu = view.device.type == "cuda"
        self.scratch_shape = (batch, num_q_heads, num_splits, head_dim)
        self.num_pairs = batch * view.num_kv_heads  # split counters: one per (sequence, KV head)
        self.scalars = attention_scalars(view, query, block_tables, out, scale=scale, soft_cap=soft_cap,
                                         sliding_window=sliding_window, count=num_splits)
        self.view_ptrs = view_pointers(view)
        self.decode = Launch(
            _decode_kernel, (view.num_kv_heads, num_splits, batch), dict(
                GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                BLOCK_D=block_d, HAS_PAD=block_d != head_dim, BLOCK_SIZE=view.block_size, BLOCK_N=block_n,
                SINGLE_SPLIT=num_splits == 1, MULTI_CHUNK=view.offsets is not None, CHUNKS_PAD=view.chunks_pad,
                USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=soft_cap is not None,
                DOT_PRECISION="ieee" if view.dtype == torch.float32 else None,  # None: the default (tensor cores)
                FP8=fp8, RAW_MUL=raw_mul(fp8), HALF_DOTS=fp8 in (1, 4) and query.dtype == torch.bfloat16),
            num_warps=num_warps or cfg_warps, num_stages=num_stages or cfg_stages,
            **({"maxnreg": maxnreg} if maxnreg and torch.version.hip is None else {}))

    def __call__(self, view: CacheView, query: Tensor, block_tables: Tensor, context_lens: Tensor,
                 out: Tensor) -> None:
        """Launches over validated tensors of this launch's metadata; writes ``out``."""
        decode = self.decode
        # the fast path: a kept kernel for the current device, no hooks, aligned pointers and,
        # with splits, no graph capture (a graph gets its own scratch: split_scratch)
        if self.on_gpu and decode.device >= 0 and no_launch_hooks():
            pq, pt, pc, po = query.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr()
            if not (pq | pt | pc | po) & 15 and current_device() == decode.device:
                pk, pv, poff, pks, pvs = self.view_ptrs
                if self.num_splits == 1:
                    decode.fast(current_stream(decode.device), pq, pk, pv, poff or pt, pt, pc, po, po, po, po,
                                pks or po, pvs or po, *self.scalars)
                    return
                if not is_capturing():
                    stream = current_stream(decode.device)
                    p_out, p_lse, p_cnt = _scratch_pointers(decode.device, stream, self.scratch_shape, self.num_pairs)
                    decode.fast(stream, pq, pk, pv, poff or pt, pt, pc, po, p_out, p_lse, p_cnt, pks or po,
                                pvs or po, *self.scalars)
                    return
        self._jit(view, query, block_tables, context_lens, out)

    def _jit(self, view: CacheView, query: Tensor, block_tables: Tensor, context_lens: Tensor, out: Tensor) -> None:
        k0, v0 = view_chunks(view, self.fp8 in (2, 3))
        if self.fp8 == 4:
            v0 = v0.view(torch.int16)
        if self.num_splits > 1:
            part_out, part_lse = split_scratch(*self.scratch_shape, query.device)
            counters = split_counters(self.scratch_shape[0], self.num_pairs // self.scratch_shape[0], query.device)
        else:
            part_out = part_lse = counters = out  # unused
        offsets = view.offsets if view.offsets is not None else block_tables
        k_scale = view.k_scale if self.fp8 else out
        v_scale = view.v_scale if self.fp8 else out
        tensors = (query, k0, v0, offsets, block_tables, context_lens, out, part_out, part_lse, counters, k_scale,
                   v_scale)
        ok = self.on_gpu and aligned(*(t.data_ptr() for t in tensors))
        self.decode.jit(*tensors, *self.scalars, pointers_aligned=ok)


def _scratch_pointers(device_index: int, stream: int, shape: tuple[int, int, int, int],
                     num_pairs: int) -> tuple[int, int, int]:
    """Pointers of the split scratch and counters :func:`split_scratch` and :func:`split_counters`
    hand out on this stream (outside a capture)."""
    batch, num_q_heads, num_splits, head_dim = shape
    n_out = batch * num_q_heads * num_splits * head_dim
    key = ("cuda", device_index, stream)
    buf, counters = _SCRATCH.get(key), _COUNTERS.get(key)
    if (buf is None or buf.numel() < n_out + batch * num_q_heads * num_splits
            or counters is None or counters.numel() < num_pairs):
        device = torch.device("cuda", device_index)
        part_out, part_lse = split_scratch(batch, num_q_heads, num_splits, head_dim, device)
        return part_out.data_ptr(), part_lse.data_ptr(), split_counters(batch, num_pairs // batch, device).data_ptr()
    base = buf.data_ptr()
    return base, base + 4 * n_out, counters.data_ptr()


def launch_decode(
    query: Tensor, view: CacheView, offsets: Tensor | None, block_tables: Tensor, context_lens: Tensor,
    out: Tensor, *, scale: float, sliding_window: int | None, soft_cap: float | None,
    num_splits: int | None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    maxnreg: int | None = None,
) -> None:
    """Launches once on validated inputs; writes ``out`` ``[batch, num_q_heads, head_dim]``.
    ``offsets`` must be the view's own table (kept for the callers of the earlier signature).
    ``block_n``, ``num_warps``, ``num_stages``, ``maxnreg`` override the launch config
    (:func:`_config_for`; ``maxnreg=0``: no register cap; CUDA only)."""
    assert offsets is view.offsets, "launch_decode: offsets must be view.offsets"
    DecodeLaunch(query, view, block_tables, out, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                 num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                 num_stages=num_stages, maxnreg=maxnreg)(view, query, block_tables, context_lens, out)


KERNELS = (_decode_kernel,)
