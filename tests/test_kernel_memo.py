"""The kernel wrappers' launch memo: a call over a described view checks and prepares
once per call signature, and nothing it remembers weakens a later call's checks.

Torch backend on the CPU (the memo logic is the same for every backend; the Triton
launches it keeps are covered in ``tests/gpu/test_kernel_launch_gpu.py`` and, under
the interpreter, in ``tests/test_kernels_triton.py``).
"""
from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch

from kvforge.errors import KernelError
from kvforge.kernels import (
    CacheView, describe_cache, ops, paged_decode_attention, paged_prefill_attention, reference, store_kv,
)

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 4, 2, 16, 8, 12


def _cache(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    v = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    return k, v


def _decode_inputs(gen: torch.Generator, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(batch, HEADS, DIM, generator=gen)
    tables = torch.stack([torch.randperm(NUM_BLOCKS, generator=gen)[:4] for _ in range(batch)]).to(torch.int32)
    ctx = torch.randint(1, 4 * BLOCK + 1, (batch,), generator=gen, dtype=torch.int32)
    return q, tables, ctx


def _plans(kind: str, serial: int) -> int:
    return sum(1 for key in ops._PLANS if key[0] == kind and key[1] == serial)


def test_repeated_calls_check_once_and_stay_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    for _ in range(3):  # fresh inputs of one signature: one plan, each result exact
        q, tables, ctx = _decode_inputs(gen)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, view, None, tables, ctx, out=out, sliding_window=5)
        want = reference.paged_decode_attention(q, [k], [v], tables, ctx, scale=DIM**-0.5, sliding_window=5)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert _plans("decode", view.serial) == 1
    q, tables, ctx = _decode_inputs(gen, batch=5)  # a new shape: a second plan
    paged_decode_attention(q, view, None, tables, ctx)
    assert _plans("decode", view.serial) == 2


def test_a_remembered_signature_does_not_let_a_changed_call_through() -> None:
    gen = torch.Generator().manual_seed(1)
    view = describe_cache(*_cache(gen))
    q, tables, ctx = _decode_inputs(gen)
    paged_decode_attention(q, view, None, tables, ctx, sliding_window=1, scale=0.5)
    with pytest.raises(KernelError, match="query dtype"):
        paged_decode_attention(q.half(), view, None, tables, ctx, sliding_window=1, scale=0.5)
    with pytest.raises(KernelError, match="block_tables dtype"):
        paged_decode_attention(q, view, None, tables.long(), ctx, sliding_window=1, scale=0.5)
    with pytest.raises(KernelError, match="sliding_window"):  # True == 1 and hashes like it
        paged_decode_attention(q, view, None, tables, ctx, sliding_window=True, scale=0.5)
    with pytest.raises(KernelError, match="scale"):
        paged_decode_attention(q, view, None, tables, ctx, sliding_window=1, scale=float("inf"))
    with pytest.raises(KernelError, match="out"):
        paged_decode_attention(q, view, None, tables, ctx, out=torch.empty(3, HEADS, DIM, dtype=torch.float16))
    with pytest.raises(KernelError, match="context_lens"):
        paged_decode_attention(q, view, None, tables, [1, 2, 3])
    with pytest.raises(KernelError, match="num_splits"):
        paged_decode_attention(q, view, None, tables, ctx, num_splits=[2])  # unhashable: checked, not memoized


def test_value_checks_run_at_every_call_of_a_remembered_signature() -> None:
    gen = torch.Generator().manual_seed(2)
    view = describe_cache(*_cache(gen))
    q, tables, ctx = _decode_inputs(gen)
    paged_decode_attention(q, view, None, tables, ctx)
    bad = tables.clone()
    bad[0, 0] = NUM_BLOCKS
    ctx_bad = ctx.clone()
    ctx_bad[0] = max(int(ctx_bad[0]), 1)
    with pytest.raises(KernelError, match=f"block id {NUM_BLOCKS} is outside"):
        paged_decode_attention(q, view, None, bad, ctx_bad)
    slots = torch.arange(3, dtype=torch.int64)
    kv = torch.randn(3, KV_HEADS, DIM, generator=gen)
    store_kv(kv, kv, view, None, slots)
    with pytest.raises(KernelError, match="slot_mapping: slot 96 is outside"):
        store_kv(kv, kv, view, None, torch.tensor([0, 1, NUM_BLOCKS * BLOCK]))
    # on the GPU value checks are opt-in (validate=True); here validate=False skips them
    store_kv(kv, kv, view, None, torch.tensor([0, 1, 2]), validate=False)


def test_store_and_prefill_memo_write_and_read_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    for _ in range(2):
        new_k = torch.randn(5, KV_HEADS, DIM, generator=gen)
        new_v = torch.randn(5, KV_HEADS, DIM, generator=gen)
        slots = torch.randperm(NUM_BLOCKS * BLOCK, generator=gen)[:5]
        store_kv(new_k, new_v, view, None, slots)
        torch.testing.assert_close(k.view(-1, KV_HEADS, DIM)[slots], new_k, rtol=0, atol=0)
        torch.testing.assert_close(v.view(-1, KV_HEADS, DIM)[slots], new_v, rtol=0, atol=0)
    assert _plans("store", view.serial) == 1
    for _ in range(2):
        q = torch.randn(6, HEADS, DIM, generator=gen)
        tables = torch.randperm(NUM_BLOCKS, generator=gen)[:8].view(2, 4).to(torch.int32)
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
        ctx = torch.tensor([9, 30], dtype=torch.int32)
        out = paged_prefill_attention(q, view, None, tables, cu, ctx)
        want = reference.paged_prefill_attention(q, [k], [v], tables, cu, ctx, scale=DIM**-0.5)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert _plans("prefill", view.serial) == 1
    with pytest.raises(KernelError, match="cu_query_lens: expected to run from 0 to 6"):
        paged_prefill_attention(q, view, None, tables, torch.tensor([0, 2, 5], dtype=torch.int32), ctx)


def test_a_replaced_or_hand_made_view_is_checked_every_call() -> None:
    gen = torch.Generator().manual_seed(4)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    other = view._replace(block_size=BLOCK)  # a copy: no longer the described view, so not trusted as one
    assert other.serial == 0 and view._replace(serial=view.serial).serial == 0
    for copied in (copy.copy(view), copy.deepcopy(view), pickle.loads(pickle.dumps(view)), CacheView._make(view)):
        assert type(copied) is CacheView and copied.serial == 0 and copied.num_blocks == view.num_blocks
    q, tables, ctx = _decode_inputs(gen)
    before = len(ops._PLANS)
    with pytest.raises(KernelError, match="query heads"):
        paged_decode_attention(q[:, :3], other, None, tables, ctx)
    paged_decode_attention(q, view._replace(), None, tables, ctx)
    assert len(ops._PLANS) == before  # nothing remembered for serial 0


def test_remembered_plans_keep_no_cache_memory_alive() -> None:
    gen = torch.Generator().manual_seed(5)
    k, v = _cache(gen)
    view = describe_cache(k, v)
    q, tables, ctx = _decode_inputs(gen)
    paged_decode_attention(q, view, None, tables, ctx)
    store_kv(q[:, :KV_HEADS].contiguous(), q[:, :KV_HEADS].contiguous(), view, None, torch.arange(3))
    assert _plans("decode", view.serial) == 1
    alive = weakref.ref(k)
    del k, v, view
    gc.collect()
    assert alive() is None


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_MAX_PLANS", 4)
    gen = torch.Generator().manual_seed(6)
    view = describe_cache(*_cache(gen))
    for batch in range(1, 10):
        q, tables, ctx = _decode_inputs(gen, batch=batch)
        paged_decode_attention(q, view, None, tables, ctx, scale=1.0 / batch)
        assert len(ops._PLANS) <= 4


def test_launch_hooks_are_seen() -> None:
    """The fast launch is skipped while a Triton launch hook is installed (profilers)."""
    triton_launch = pytest.importorskip("kvforge.kernels.triton_launch")
    from triton import knobs

    assert triton_launch.no_launch_hooks()

    def hook(metadata: object) -> None:
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not triton_launch.no_launch_hooks()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert triton_launch.no_launch_hooks()
    assert triton_launch.aligned(0, 16, 4096) and not triton_launch.aligned(16, 18)


def test_the_forced_fp8_read_path_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_kernels and the tests switch an fp8 view's read path (triton_fp8.FORCE_DECODE)
    between calls: a launch remembered for one path must not serve the other."""
    triton_fp8 = pytest.importorskip("kvforge.kernels.triton_fp8")
    gen = torch.Generator().manual_seed(7)
    k = torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=torch.float8_e4m3fn)
    view = describe_cache(k, torch.zeros_like(k), k_scale=0.5, v_scale=0.5, model_dtype=torch.float32)
    q, tables, ctx = _decode_inputs(gen)
    paged_decode_attention(q, view, None, tables, ctx)
    monkeypatch.setattr(triton_fp8, "FORCE_DECODE", "bits")
    paged_decode_attention(q, view, None, tables, ctx)
    assert _plans("decode", view.serial) == 2


def test_bad_options_and_devices_after_a_remembered_call_raise_kernel_errors() -> None:
    gen = torch.Generator().manual_seed(8)
    view = describe_cache(*_cache(gen))
    kv = torch.randn(3, KV_HEADS, DIM, generator=gen)
    slots = torch.arange(3)
    store_kv(kv, kv, view, None, slots)
    with pytest.raises(KernelError, match="backend"):
        store_kv(kv, kv, view, None, slots, backend=["torch"])  # unhashable: checked, not memoized
    meta = torch.empty(3, KV_HEADS, DIM, device="meta")  # index -1 like the CPU's
    with pytest.raises(KernelError, match="expected device cpu"):
        store_kv(meta, meta, view, None, slots)
    q, tables, ctx = _decode_inputs(gen)
    paged_decode_attention(q, view, None, tables, ctx)
    with pytest.raises(KernelError, match="expected device cpu"):
        paged_decode_attention(q.to("meta"), view, None, tables, ctx)
