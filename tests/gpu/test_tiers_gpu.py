"""On a GPU: the host tier's memory is pinned, its copies run on the side stream in the right
order against the compute stream, and spills, onboards and swaps are bit-exact in bf16 and
fp16, through staging rounds, scattered device chunks and host runs crossing host chunks.

Ordering tests hold the tier's side stream back with ``torch.cuda._sleep`` before a copy:
if the compute stream did not wait for the copy's events, its next kernels would run
first and the data read back would be wrong.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import kvforge.storage.host as host_module
from kvforge import CacheConfig, KVCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")]

DEV = "cuda"
BS, LAYERS, HEADS, DIM = 16, 2, 2, 64
DELAY_CYCLES = 200_000_000  # about 0.1 s of a GPU clock: long next to every copy here


def make_cache(dtype: torch.dtype = torch.bfloat16, *, num_blocks: int = 32, host_blocks: int = 32,
               chunk_blocks: int | None = None, host_chunk_blocks: int | None = None) -> KVCache:
    bytes_per_block = LAYERS * 2 * BS * HEADS * DIM * torch.empty((), dtype=dtype).element_size()
    cfg = CacheConfig(block_size=BS, num_blocks=num_blocks, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                      dtype=dtype, device=DEV, chunk_blocks=chunk_blocks, host_memory=host_blocks * bytes_per_block,
                      host_chunk_blocks=host_chunk_blocks)
    cache = KVCache(cfg, backend="torch")
    assert cache.host_storage is not None and cache.host_storage.num_blocks == host_blocks
    return cache


def fill(cache: KVCache, seq: Any, tokens: list[int], gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Add ``seq``, write fresh random keys/values for the tokens not cached; return what every
    layer holds for it now, ``[(k, v), ...]`` of ``[len(tokens), HEADS, DIM]`` (clones)."""
    r = cache.add_sequence(seq, tokens)
    write(cache, seq, len(tokens) - r.num_cached_tokens, gen)
    return expected(cache, seq)


def write(cache: KVCache, seq: Any, n: int, gen: torch.Generator) -> None:
    """Random keys/values for the last ``n`` tokens of ``seq`` (queued on the compute stream)."""
    if n <= 0:
        return
    slots = cache.slot_mapping([seq], n)
    for layer in range(LAYERS):
        k = torch.randn((n, HEADS, DIM), generator=gen, device=DEV).to(cache.config.dtype)
        v = torch.randn((n, HEADS, DIM), generator=gen, device=DEV).to(cache.config.dtype)
        cache.write(layer, slots, k, v)


def expected(cache: KVCache, seq: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in cache.gather(seq, layer)) for layer in range(LAYERS)]  # type: ignore[misc]


def assert_same(cache: KVCache, seq: Any, want: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (k, v) in enumerate(want):
        gk, gv = cache.gather(seq, layer)
        assert torch.equal(gk, k), (seq, layer, "keys")
        assert torch.equal(gv, v), (seq, layer, "values")


def hold_side_stream(cache: KVCache) -> None:
    """Queue a long sleep on both of the tier's side streams (transfers, gathers): its next copy starts late."""
    hs = cache.host_storage
    if hs is not None and hs.stream is not None and hasattr(torch.cuda, "_sleep"):
        for stream in (hs.stream, hs.gather_stream):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(DELAY_CYCLES)


def hold_and_mark(cache: KVCache) -> torch.cuda.Event:
    """:func:`hold_side_stream`, and an event that completes when both sleeps have."""
    hold_side_stream(cache)
    hs = cache.host_storage
    hs.stream.wait_stream(hs.gather_stream)  # type: ignore[union-attr]
    held = torch.cuda.Event()
    held.record(hs.stream)  # type: ignore[union-attr]
    return held


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def test_host_chunks_are_pinned_and_allocated_on_first_use() -> None:
    cache = make_cache(host_blocks=8, host_chunk_blocks=4)
    hs = cache.host_storage
    assert hs is not None and hs.num_chunks == 0 and hs.num_bytes == 0
    fill(cache, "a", list(range(3 * BS)), generator(0))
    assert cache.swap_out(["a"]) == 3
    assert hs.num_chunks == 1 and hs._chunks[0].is_pinned() and hs.is_pinned
    assert hs._chunks[0].device.type == "cpu"
    assert cache.tier_usage()[1].allocated_bytes == 4 * cache.config.bytes_per_block


def test_swap_out_then_overwriting_the_freed_blocks_at_once_then_swap_in_is_exact() -> None:
    cache = make_cache(num_blocks=8, host_blocks=16)
    gen = generator(1)
    want = fill(cache, "a", list(range(4 * BS)), gen)
    table = cache.block_table("a")
    others = fill(cache, "b", list(range(1000, 1000 + 3 * BS)), gen)
    hold_side_stream(cache)  # the gather into staging starts late ...
    assert cache.swap_out(["a"]) == 4
    # ... and the compute stream must wait for it before these writes land in a's old blocks
    cache.add_sequence("c", list(range(2000, 2000 + 4 * BS)))
    assert set(cache.block_table("c")) & set(table), "c was meant to take a's freed blocks"
    write(cache, "c", 4 * BS, gen)
    over = expected(cache, "c")
    cache.free_sequence("c")
    cache.reclaim_unused_blocks()
    hold_side_stream(cache)  # the copy back starts late: the gathers below must wait for it
    assert cache.swap_in(["a"]) == 4
    assert_same(cache, "a", want)  # no host synchronize before reading
    assert_same(cache, "b", others)
    assert not any(torch.equal(k, ok) for (k, _), (ok, _) in zip(want, over))
    cache.check_invariants()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spill_and_onboard_are_bit_exact(dtype: torch.dtype) -> None:
    cache = make_cache(dtype, num_blocks=8, host_blocks=16)
    gen = generator(2)
    prompt = list(range(3 * BS + 5))  # 3 full blocks and a partial one
    want = fill(cache, "a", prompt, gen)
    cache.free_sequence("a")
    fill(cache, "b", list(range(5000, 5000 + 8 * BS)), gen)  # the whole pool: a's cached blocks spill
    assert cache.host_stats().spilled_blocks == 3
    cache.free_sequence("b")
    hold_side_stream(cache)
    r = cache.add_sequence("a2", prompt)
    assert r.num_cached_tokens == 3 * BS and cache.host_stats().onboarded_blocks == 3
    for layer, (k, v) in enumerate(want):  # the onboarded part, read without a host synchronize
        gk, gv = cache.gather("a2", layer)
        assert torch.equal(gk[: 3 * BS], k[: 3 * BS]) and torch.equal(gv[: 3 * BS], v[: 3 * BS]), layer
    cache.synchronize_tiers()
    for i, b in enumerate(cache.block_table("a2")[:3]):  # and the host copies hold the same bytes
        h = cache.manager.host.copy_of(b)
        assert h is not None
        host = cache.host_block(h)
        for layer, (k, v) in enumerate(want):
            assert torch.equal(host[layer, 0].to(DEV), k[i * BS:(i + 1) * BS]), (i, layer)
            assert torch.equal(host[layer, 1].to(DEV), v[i * BS:(i + 1) * BS]), (i, layer)
    cache.check_invariants()


def test_tier_copies_run_on_the_side_stream_and_the_host_does_not_wait() -> None:
    cache = make_cache(num_blocks=16, host_blocks=16)
    hs = cache.host_storage
    assert hs is not None and hs.stream is not None
    main = torch.cuda.current_stream()
    assert hs.stream != main and hs.gather_stream != main
    want = fill(cache, "a", list(range(4 * BS)), generator(3))
    cache.swap_out(["a"])  # first use allocates the staging buffer and a pinned chunk (those may block)
    cache.swap_in(["a"])
    torch.cuda.synchronize()
    for op in (cache.swap_out, cache.swap_in):
        held = hold_and_mark(cache)
        op(["a"])
        assert torch.cuda.current_stream() == main  # the copy left the caller's stream as it was
        assert not held.query(), f"{op.__name__} made the host wait for the side stream"
        assert hs._last is not None and not hs._last.query()  # the copy is queued behind the sleep
    assert_same(cache, "a", want)  # the compute stream waited for the copy; the host did not
    cache.synchronize_tiers()
    assert hs._last.query()  # type: ignore[union-attr]


def hold_one(cache: KVCache, which: str) -> None:
    """A long sleep on one of the tier's streams: 'copy' (transfers) or 'gather' (gathers, scatters)."""
    hs = cache.host_storage
    if hs is not None and hasattr(torch.cuda, "_sleep"):
        with torch.cuda.stream(hs.stream if which == "copy" else hs.gather_stream):
            torch.cuda._sleep(DELAY_CYCLES)


@pytest.mark.parametrize("hold", ["both", "copy", "gather"])
def test_a_swap_beyond_the_staging_buffer_goes_in_rounds_and_is_exact(monkeypatch: pytest.MonkeyPatch,
                                                                      hold: str) -> None:
    """18 rounds through 3 staging slots: holding back one stream checks that a slot is reused only
    after its transfer (or scatter) is done, and that each round's two halves wait for each other."""
    held = hold_side_stream if hold == "both" else (lambda c: hold_one(c, hold))
    bytes_per_block = LAYERS * 2 * BS * HEADS * DIM * 2
    monkeypatch.setattr(host_module, "STAGING_BYTES", 3 * bytes_per_block)
    cache = make_cache(num_blocks=32, host_blocks=32, chunk_blocks=8, host_chunk_blocks=8)
    hs = cache.host_storage
    assert hs is not None and hs.staging_blocks == 3
    gen = generator(4)
    wants = {s: fill(cache, s, list(range(1000 * i, 1000 * i + 5 * BS + 3)), gen) for i, s in enumerate("abc")}
    copies = hs.num_copies
    held(cache)
    assert hs.round_blocks == 1 and hs.num_slots == 3
    assert cache.swap_out(["a", "b", "c"]) == 18  # 18 rounds through 3 staging slots in one copy
    fill(cache, "d", list(range(9000, 9000 + 20 * BS)), gen)  # overwrite what they left
    cache.free_sequence("d")
    cache.reclaim_unused_blocks()
    held(cache)
    assert cache.swap_in(["c", "a", "b"]) == 18
    assert hs.num_copies == copies + 2
    for s, want in wants.items():
        assert_same(cache, s, want)
    cache.check_invariants()


def test_scattered_device_blocks_and_host_runs_across_host_chunks_are_exact() -> None:
    cache = make_cache(num_blocks=24, host_blocks=20, chunk_blocks=2, host_chunk_blocks=3)
    assert cache.num_chunks == 12
    gen = generator(5)
    wants: dict[str, Any] = {}
    for step in range(4):  # interleaved growth: every table is spread over many device chunks
        for s in "abc":
            if s not in wants:
                cache.add_sequence(s, list(range(100 * ord(s), 100 * ord(s) + BS)))
                write(cache, s, BS, gen)
            else:
                cache.append_tokens(s, BS, list(range(BS)))
                write(cache, s, BS, gen)
            wants[s] = expected(cache, s)
    chunks_of = {b // cache.chunk_blocks for b in cache.block_table("a")}
    assert len(chunks_of) >= 3
    fill(cache, "pad", list(range(7000, 7000 + BS + 1)), gen)  # takes host blocks 0..1 below
    assert cache.swap_out(["pad"]) == 2
    hold_side_stream(cache)
    assert cache.swap_out(["c", "a"]) == 8  # host blocks 2..9: runs cut at host chunks 3, 6, 9
    hs = cache.host_storage
    assert hs is not None and hs.num_chunks == 4
    cache.synchronize_tiers()
    for s in "ca":  # the host holds each block whole, in position order
        rec = cache.manager.host.swapped[s]
        assert all(rec.on_host)
        for i, h in enumerate(rec.blocks):
            for layer, (k, v) in enumerate(wants[s]):
                assert torch.equal(cache.host_block(h)[layer, 0].to(DEV), k[i * BS:(i + 1) * BS]), (s, i)
                assert torch.equal(cache.host_block(h)[layer, 1].to(DEV), v[i * BS:(i + 1) * BS]), (s, i)
    fill(cache, "d", list(range(8000, 8000 + 3 * BS)), gen)  # swap-in lands in other, scattered blocks
    hold_side_stream(cache)
    assert cache.swap_in(["a", "c"]) == 8
    for s in "abc":
        assert_same(cache, s, wants[s])
    cache.check_invariants()


def test_a_swap_out_waits_for_writes_still_queued_on_the_compute_stream() -> None:
    cache = make_cache(num_blocks=8, host_blocks=8)
    cache.add_sequence("a", list(range(4 * BS)))
    blocks = cache.block_table("a")
    gen = generator(6)
    data = [torch.randn((LAYERS, 2, BS, HEADS, DIM), generator=gen, device=DEV).to(cache.config.dtype)
            for _ in blocks]
    torch.cuda.synchronize()
    torch.cuda._sleep(DELAY_CYCLES)  # on the compute stream: the writes below land late
    for b, d in zip(blocks, data):  # plain tensor copies: nothing here makes the host wait
        c, off = divmod(b, cache.chunk_blocks)
        cache.chunks[c][:, :, off].copy_(d)
    assert cache.swap_out(["a"]) == 4  # the side stream must wait for those writes before gathering
    cache.synchronize_tiers()
    rec = cache.manager.host.swapped["a"]
    for h, d in zip(rec.blocks, data):
        assert torch.equal(cache.host_block(h), d.cpu()), h
    assert cache.swap_in(["a"]) == 4
    for b, d in zip(cache.block_table("a"), data):
        c, off = divmod(b, cache.chunk_blocks)
        assert torch.equal(cache.chunks[c][:, :, off], d), b
