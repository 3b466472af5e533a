"""The kernels' fast launches on a CUDA/ROCm device: after the first call of a call
signature, the wrappers launch the kept compiled kernel with raw pointers (no Triton
JIT dispatch). Each repeat runs on fresh random inputs with the output poisoned, against
the torch reference; a misaligned tensor, a CUDA graph capture and a fp8 cache go their
own ways and stay exact."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")

from kvforge.kernels import (  # noqa: E402
    describe_cache, ops, paged_decode_attention, paged_prefill_attention, reference, store_kv,
)
from kvforge.kernels import triton_decode, triton_prefill, triton_store  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16
HQ, HKV, D, BS, NB = 8, 2, 64, 16, 64


class JitCalls:
    """Counts calls that go through a kernel's JIT dispatch (a spy on the real kernel)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *kernels) -> None:
        self.count = 0
        for kernel in kernels:
            real = kernel.run

            def run(*args, _real=real, **kwargs):
                self.count += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", run)


def _cache(gen: torch.Generator):
    k = torch.randn(NB, BS, HKV, D, generator=gen).to(BF16).to(DEV)
    v = torch.randn(NB, BS, HKV, D, generator=gen).to(BF16).to(DEV)
    return k, v


def _decode_inputs(gen: torch.Generator, batch: int, max_blocks: int):
    q = torch.randn(batch, HQ, D, generator=gen).to(BF16).to(DEV)
    tables = torch.stack([torch.randperm(NB, generator=gen)[:max_blocks] for _ in range(batch)]).int().to(DEV)
    ctx = torch.randint(1, max_blocks * BS + 1, (batch,), generator=gen, dtype=torch.int32).to(DEV)
    return q, tables, ctx


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_fast_launch_is_exact_and_skips_the_jit(monkeypatch: pytest.MonkeyPatch, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(num_splits)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    spy = JitCalls(monkeypatch, triton_decode._decode_kernel)
    for i in range(4):
        q, tables, ctx = _decode_inputs(gen, 5, 8)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, view, None, tables, ctx, out=out, num_splits=num_splits)
        want = reference.paged_decode_attention(q, [k], [v], tables, ctx)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert spy.count == 1  # the first call only (the splits merge inside the same launch)


def test_a_misaligned_query_takes_the_jit_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    q, tables, ctx = _decode_inputs(gen, 3, 4)
    paged_decode_attention(q, view, None, tables, ctx, num_splits=1)  # kept, aligned
    spy = JitCalls(monkeypatch, triton_decode._decode_kernel)
    for _ in range(2):
        wide = torch.randn(3 * HQ * D + 1, generator=gen).to(BF16).to(DEV)
        q_odd = wide[1:].view(3, HQ, D)  # same shape and strides, 2 bytes off alignment
        assert q_odd.data_ptr() % 16
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q_odd, view, None, tables, ctx, out=out, num_splits=1)
        want = reference.paged_decode_attention(q_odd, [k], [v], tables, ctx)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert spy.count == 2


def test_prefill_and_store_fast_launches_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(8)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    spy = JitCalls(monkeypatch, triton_prefill._prefill_kernel, triton_store._store_kernel)
    for _ in range(3):
        new_k = torch.randn(40, HKV, D, generator=gen).to(BF16).to(DEV)
        new_v = torch.randn(40, HKV, D, generator=gen).to(BF16).to(DEV)
        slots = torch.randperm(NB * BS, generator=gen)[:40].to(DEV)
        store_kv(new_k, new_v, view, None, slots)
        assert torch.equal(k.view(-1, HKV, D)[slots], new_k) and torch.equal(v.view(-1, HKV, D)[slots], new_v)
        q = torch.randn(30, HQ, D, generator=gen).to(BF16).to(DEV)
        tables = torch.stack([torch.randperm(NB, generator=gen)[:8] for _ in range(2)]).int().to(DEV)
        cu = torch.tensor([0, 10, 30], dtype=torch.int32, device=DEV)
        ctx = torch.tensor([50, 128], dtype=torch.int32, device=DEV)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, view, None, tables, cu, ctx, out=out)
        want = reference.paged_prefill_attention(q, [k], [v], tables, cu, ctx)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert spy.count == 2  # one JIT call each


def test_fp8_cache_fast_launches_are_exact() -> None:
    gen = torch.Generator().manual_seed(9)
    k = torch.zeros(NB, BS, HKV, D, dtype=torch.float8_e4m3fn, device=DEV)
    v = torch.zeros_like(k)
    view = describe_cache(k, v, k_scale=0.5, v_scale=0.25, model_dtype=BF16)
    slots = torch.arange(NB * BS, device=DEV)
    keys = torch.randn(NB * BS, HKV, D, generator=gen).to(BF16).to(DEV)
    store_kv(keys, keys * 0.5, view, None, slots)
    store_kv(keys, keys * 0.5, view, None, slots)  # the fast launch writes the same bytes
    for _ in range(3):
        q, tables, ctx = _decode_inputs(gen, 4, 8)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, view, None, tables, ctx, out=out)
        want = reference.paged_decode_attention(q, [k], [v], tables, ctx, k_scale=view.k_scale,
                                                v_scale=view.v_scale)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_graph_capture_after_fast_launches_replays_exactly() -> None:
    gen = torch.Generator().manual_seed(10)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    q, tables, ctx = _decode_inputs(gen, 6, 8)
    out = torch.full_like(q, float("nan"))
    for _ in range(2):  # kept and launched fast
        paged_decode_attention(q, view, None, tables, ctx, out=out, num_splits=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        paged_decode_attention(q, view, None, tables, ctx, out=out, num_splits=3)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        q.copy_(torch.randn(q.shape, generator=gen).to(BF16))
        paged_decode_attention(q[:1], view, None, tables[:1], ctx[:1], num_splits=3)  # other work between replays
        out.fill_(float("nan"))
        graph.replay()
        want = reference.paged_decode_attention(q, [k], [v], tables, ctx)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert any(key[0] == "decode" for key in ops._PLANS)


def test_a_launch_hook_sees_every_launch() -> None:
    """With a launch hook installed (a profiler's), every launch goes through the JIT."""
    from triton import knobs

    gen = torch.Generator().manual_seed(11)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    q, tables, ctx = _decode_inputs(gen, 2, 4)
    paged_decode_attention(q, view, None, tables, ctx, num_splits=1)
    seen = []

    def hook(metadata) -> None:
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            paged_decode_attention(q, view, None, tables, ctx, num_splits=1)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3


@pytest.mark.parametrize("num_splits", [2, 7, 64])
def test_the_last_split_merges_every_time(num_splits: int) -> None:
    """The split counters: over many back-to-back launches (no sync between them) and batch
    sizes that reuse one counter buffer, the fused merge matches one split's output."""
    gen = torch.Generator().manual_seed(20 + num_splits)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    outs, wants = [], []
    for i in range(24):
        q, tables, ctx = _decode_inputs(gen, 1 + i % 5, 16)
        wants.append(paged_decode_attention(q, view, None, tables, ctx, num_splits=1))
        outs.append(paged_decode_attention(q, view, None, tables, ctx, num_splits=num_splits))
    torch.cuda.synchronize()
    for out, want in zip(outs, wants):
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    counters = [c for c in triton_decode._COUNTERS.values()]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)  # every launch left them zero


def test_a_copied_view_writes_its_own_tensors() -> None:
    """A deep copy of a view holds other tensors: a call over it must not reuse the launch
    remembered for the original (its pointers)."""
    import copy

    gen = torch.Generator().manual_seed(12)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    new = torch.randn(4, HKV, D, generator=gen).to(BF16).to(DEV)
    slots = torch.arange(4, device=DEV)
    for _ in range(2):  # kept and launched fast over the original
        store_kv(new, new, view, None, slots)
    twin = copy.deepcopy(view)
    before = k.clone()
    other = torch.randn(4, HKV, D, generator=gen).to(BF16).to(DEV)
    for _ in range(2):
        store_kv(other, other, twin, None, slots)
    torch.cuda.synchronize()
    assert torch.equal(k, before)
    assert torch.equal(twin.k_chunks[0].view(-1, HKV, D)[:4], other)
