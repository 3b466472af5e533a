"""KVCache: device storage, writes, batched tensors, copy-on-write and prefix reuse with real data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvforge import CacheConfig, KVCache, KvCache
from kvforge.errors import KernelError, KVForgeError, OutOfBlocksError, SequenceError
from kvforge.kernels import reference


def make_cache(num_blocks: int = 32, block_size: int = 8, layers: int = 2, heads: int = 2, dim: int = 16,
               **kw) -> KVCache:
    cfg = CacheConfig(block_size=block_size, num_blocks=num_blocks, num_layers=layers, num_kv_heads=heads,
                      head_dim=dim, dtype=torch.float32, device="cpu", **kw)
    return KVCache(cfg)


def fill(cache: KVCache, slots: np.ndarray, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    c = cache.config
    ks, vs = [], []
    for layer in range(c.num_layers):
        k = torch.randn(len(slots), c.num_kv_heads, c.head_dim, generator=g)
        v = torch.randn(len(slots), c.num_kv_heads, c.head_dim, generator=g)
        cache.write(layer, slots, k, v)
        ks.append(k)
        vs.append(v)
    return ks, vs


def test_storage_bytes_equal_allocated_tensors():
    cache = make_cache(num_blocks=32)
    c = cache.config
    assert cache.storage_bytes == sum(t.numel() * t.element_size() for t in cache.chunks)
    assert cache.storage_bytes == c.estimated_memory_bytes() == 32 * 2 * 2 * 8 * 2 * 16 * 4
    assert cache.chunks[0].shape == (2, 2, cache.chunk_blocks, 8, 2, 16)
    assert KvCache is KVCache
    cache.check_invariants()


def test_write_then_gather_round_trip_across_chunks():
    cache = make_cache(num_blocks=32, chunk_blocks=2)
    assert cache.num_chunks == 16
    cache.add_sequence("filler", list(range(30)))  # push the next sequence into later chunks
    r = cache.add_sequence("s", list(range(100, 137)))
    ks, vs = fill(cache, r.slots, seed=1)
    for layer in range(2):
        k, v = cache.gather("s", layer)
        assert torch.equal(k, ks[layer]) and torch.equal(v, vs[layer])
    assert len({b // 2 for b in cache.block_table("s")}) > 1  # really spans chunks


def test_padding_slots_are_skipped():
    cache = make_cache()
    r = cache.add_sequence("s", list(range(8)))
    fill(cache, r.slots, seed=2)
    before = [t.clone() for t in cache.chunks]
    k = torch.randn(3, 2, 16)
    cache.write(0, np.array([-1, -1, -1]), k, k)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.chunks))


def test_batched_device_views_match_bookkeeping():
    cache = make_cache()
    for i, n in enumerate([5, 17, 9]):
        cache.add_sequence(i, list(range(n)))
    slots = cache.append_tokens_batch([0, 1, 2], 1, token_ids=[1, 2, 3])
    bt = cache.block_tables([0, 1, 2])
    assert bt.dtype == torch.int32 and bt.shape == (3, 3)
    assert bt[0].tolist() == cache.block_table(0) + [-1, -1]
    assert bt[1].tolist() == cache.block_table(1)
    assert cache.context_lens([0, 1, 2]).tolist() == [6, 18, 10]
    sm = cache.slot_mapping(slots)
    assert sm.dtype == torch.int32 and sm.tolist() == slots.tolist()
    assert cache.slot_mapping([0, 1, 2]).tolist() == slots.tolist()
    for sid, slot in zip([0, 1, 2], slots.tolist()):
        b, off = cache.get_block_for_position(sid, cache.seq_len(sid) - 1)
        assert slot == b * 8 + off


def test_copy_blocks_copies_every_layer_keys_and_values():
    cache = make_cache(chunk_blocks=4)
    r = cache.add_sequence("s", list(range(16)))
    fill(cache, r.slots, seed=3)
    src = cache.block_table("s")
    cache.copy_blocks([(src[0], 20), (src[1], 31)])
    for chunk_list in cache.layer_kv(0) + cache.layer_kv(1):
        flat = torch.cat(chunk_list)
        assert torch.equal(flat[20], flat[src[0]]) and torch.equal(flat[31], flat[src[1]])


def test_fork_shares_then_copy_on_write_copies_the_partial_tail():
    cache = make_cache()
    r = cache.add_sequence("p", list(range(12)))  # one full block + 4 tokens
    ks, vs = fill(cache, r.slots, seed=4)
    cache.fork("p", "c")
    assert cache.block_table("c") == cache.block_table("p")
    assert [cache.pool.ref_count(b) for b in cache.block_table("p")] == [2, 2]
    slot = cache.append_token("c", 99)
    assert cache.manager.num_cow_copies == 1
    pt, ct = cache.block_table("p"), cache.block_table("c")
    assert ct[0] == pt[0] and ct[1] != pt[1]          # full block shared, tail copied
    assert cache.pool.ref_count(pt[0]) == 2 and cache.pool.ref_count(pt[1]) == 1
    k_new = torch.full((1, 2, 16), 7.0)
    for layer in range(2):
        cache.write(layer, np.array([slot]), k_new, k_new)
        k, v = cache.gather("c", layer)
        assert torch.equal(k[:12], ks[layer]) and torch.equal(v[:12], vs[layer])
        assert torch.equal(k[12], k_new[0])
        kp, _ = cache.gather("p", layer)
        assert torch.equal(kp, ks[layer])  # the parent is untouched
    cache.append_token("p", 5)  # the parent's tail is now its own: no second copy
    assert cache.manager.num_cow_copies == 1
    cache.check_invariants()


def test_prefix_reuse_gives_the_same_attention_as_computing_from_scratch():
    torch.manual_seed(0)
    cache = make_cache(num_blocks=16, heads=2, dim=16)
    prompt = list(range(40))
    r1 = cache.add_sequence("a", prompt)
    assert r1.num_cached_tokens == 0
    ks, vs = fill(cache, r1.slots, seed=5)
    r2 = cache.add_sequence("b", prompt + [7, 8, 9])
    assert r2.num_cached_tokens == 40
    assert cache.block_table("b")[:5] == cache.block_table("a")[:5]
    # b computes only its 3 new tokens; reuse must read exactly a's keys/values
    k_new, v_new = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    for layer in range(2):
        cache.write(layer, r2.slots, k_new, v_new)
    q = torch.randn(1, 4, 16)
    bt = cache.block_tables(["b"])
    out = reference.paged_decode_attention(q, *cache.layer_kv(1), bt, cache.context_lens(["b"]))
    keys = torch.cat([ks[1], k_new]).repeat_interleave(2, dim=1)
    vals = torch.cat([vs[1], v_new]).repeat_interleave(2, dim=1)
    scores = torch.einsum("hd,thd->ht", q[0].double(), keys.double()) / 4.0
    dense = torch.einsum("ht,thd->hd", scores.softmax(-1), vals.double())
    torch.testing.assert_close(out[0].double(), dense, rtol=1e-5, atol=1e-5)


def test_reuse_after_eviction_and_reallocation_to_other_content():
    cache = make_cache(num_blocks=6, block_size=8)
    prompt = list(range(24))
    r = cache.add_sequence("a", prompt)
    ks, _ = fill(cache, r.slots, seed=6)
    cache.free_sequence("a")  # 3 blocks stay cached and evictable
    assert cache.pool.num_evictable_blocks == 3
    r2 = cache.add_sequence("x", list(range(500, 540)))  # 5 blocks: evicts two cached ones
    fill(cache, r2.slots, seed=7)
    cache.free_sequence("x")
    r3 = cache.add_sequence("b", prompt)
    # whatever survived must still hold a's content; the rest is recomputed
    kb, _ = cache.gather("b", 0)
    n = r3.num_cached_tokens
    assert torch.equal(kb[:n], ks[0][:n])
    assert cache.prefix_stats().evictions >= 2
    cache.check_invariants()


def test_errors_change_nothing():
    cache = make_cache(num_blocks=4)
    cache.add_sequence("a", list(range(20)))
    stats = cache.stats
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence("b", list(range(100, 120)))
    with pytest.raises(SequenceError):
        cache.add_sequence("a")
    with pytest.raises(SequenceError):
        cache.append_tokens("nope", 1)
    with pytest.raises(KVForgeError):
        cache.write(5, np.array([0]), torch.randn(1, 2, 16), torch.randn(1, 2, 16))
    with pytest.raises(KernelError):
        cache.write(0, np.array([0]), torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    with pytest.raises(KernelError):
        cache.write(0, np.array([4 * 8]), torch.randn(1, 2, 16), torch.randn(1, 2, 16))
    assert cache.stats == stats
    assert "b" not in cache
    cache.check_invariants()


def test_config_is_checked():
    with pytest.raises(KVForgeError):
        KVCache("not a config")  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [dict(block_size=3), dict(head_dim=100), dict(device="cuda:7")])
def test_layouts_the_kernels_cannot_run_are_refused_up_front(change):
    from kvforge.errors import ConfigError

    args = dict(block_size=8, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=16, device="cpu")
    args.update(change)
    with pytest.raises(ConfigError):
        KVCache(CacheConfig(**args))


def test_cache_memory_equals_the_config_estimate():
    cfg = CacheConfig.new(16, 100, 4, 16, 2, device="cpu", dtype=torch.float32)
    cache = KVCache(cfg)
    assert cache.storage_bytes == cfg.estimated_memory_bytes()
    for i in range(100):
        cache.add_sequence(i, num_tokens=16)
    assert cache.memory_efficiency() == 1.0 and cache.memory_profile().free_bytes == 0


def test_bad_token_ids_and_pairs_raise_kvforge_errors():
    cache = make_cache()
    for bad in ("hello", [[1, 2]], [1.5, 2]):
        with pytest.raises(SequenceError):
            cache.add_sequence("x", bad)
    assert "x" not in cache
    for bad in ([(0, 1, 2)], [(0, 99)], [("a", 1)]):
        with pytest.raises(KVForgeError):
            cache.copy_blocks(bad)
    cache.add_sequence("y", num_tokens=3)
    with pytest.raises(SequenceError):
        cache.append_tokens_batch(["y"], 1.5)
    assert cache.seq_len("y") == 3


def test_unknown_backend_is_refused():
    from kvforge.errors import ConfigError

    with pytest.raises(ConfigError, match="backend"):
        KVCache(make_cache().config, backend="cuda")


def test_numpy_integer_chunk_counts_build_a_cache() -> None:
    """``CacheConfig`` takes numpy integers; the views sized for the pool's most chunks too."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=32, dtype=torch.float32,
                      device="cpu", chunk_blocks=np.int64(8), initial_blocks=np.int64(8))
    cache = KVCache(cfg, backend="torch")
    view = cache.layer_view(1)
    assert cache.num_chunks == 1 and view.max_chunks == 4 and view.offsets is not None
    cache.add_sequence("s", list(range(40)))  # 10 blocks: a second chunk
    assert cache.num_chunks == 2 and cache.layer_view(1).chunks_pad == 4
