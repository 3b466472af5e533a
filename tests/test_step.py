"""KVCache.prepare_step: one call builds a step's kernel inputs from the cache's own bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvforge import CacheConfig, KVCache
from kvforge.errors import KVForgeError
from kvforge.storage.step import FixedLayout, Staging


def make_cache(**kw: object) -> KVCache:
    cfg = CacheConfig(block_size=8, num_blocks=32, num_layers=2, num_kv_heads=2, head_dim=16,
                      dtype=torch.float32, device="cpu", **kw)
    return KVCache(cfg)


def test_decode_step_matches_the_bookkeeping() -> None:
    cache = make_cache()
    cache.add_sequence("a", list(range(10, 22)))        # 12 tokens: blocks 0, 1
    cache.add_sequence("b", list(range(30, 35)))        # 5 tokens: block 2
    cache.append_tokens_batch(["a", "b"], 1, [22, 35])  # a: 13 tokens, b: 6
    batch = cache.prepare_step(["a", "b"], 1)
    assert batch.is_decode and batch.num_decodes == 2 and batch.logits_indices is None
    assert batch.input_ids.tolist() == [22, 35]
    assert batch.positions.tolist() == [12, 5]
    assert batch.decode_context_lens.tolist() == [13, 6]
    assert batch.slot_mapping.tolist() == [1 * 8 + 4, 2 * 8 + 5]
    assert batch.slot_mapping.dtype == torch.int32
    tables = batch.decode_block_tables
    assert tables.shape == (2, 16)  # padded to a multiple of 16 columns
    assert tables[:, :2].tolist() == [[0, 1], [2, -1]] and (tables[:, 2:] == -1).all()
    assert batch.slot_mapping.tolist() == cache.slot_mapping(["a", "b"]).tolist()


def test_mixed_step_has_two_groups() -> None:
    cache = make_cache()
    cache.add_sequence("d", [1, 2, 3])
    cache.append_tokens_batch(["d"], 1, [4])
    cache.add_sequence("p", list(range(50, 60)), num_tokens=6)   # chunk 1 of a 10-token prompt
    batch = cache.prepare_step(["d", "p"], [1, 6], num_decodes=1, logits_indices=[0])
    assert not batch.is_decode and batch.num_decodes == 1 and batch.num_prefills == 1
    assert batch.input_ids.tolist() == [4, 50, 51, 52, 53, 54, 55]
    assert batch.positions.tolist() == [3, 0, 1, 2, 3, 4, 5]
    assert batch.decode_context_lens.tolist() == [4] and batch.prefill_context_lens.tolist() == [6]
    assert batch.cu_query_lens.tolist() == [0, 6]
    assert batch.logits_indices.tolist() == [0]
    # the next chunk: the pending prompt ids come from the cache
    cache.append_tokens("p", 4)
    nxt = cache.prepare_step(["p"], 4, num_decodes=0)
    assert nxt.input_ids.tolist() == [56, 57, 58, 59] and nxt.logits_indices.tolist() == [3]


def test_pad_to_fixed_layout_pads_rows() -> None:
    cache = make_cache()
    cache.add_sequence("a", [5, 6])
    cache.append_tokens_batch(["a"], 1, [7])
    batch = cache.prepare_step(["a"], 1, pad_to=(4, 32))
    assert batch.num_decodes == 4 and batch.decode_block_tables.shape == (4, 32)
    assert batch.input_ids.tolist() == [7, 0, 0, 0]
    assert batch.slot_mapping.tolist() == [2, -1, -1, -1]  # padding rows store nothing
    assert (batch.decode_block_tables[1:] == -1).all() and batch.decode_block_tables[0, 0] == 0
    assert batch.decode_context_lens.tolist() == [3, 0, 0, 0]
    sig = cache.address_signature
    cache.prepare_step(["a"], 1, pad_to=(2, 32))   # a smaller bucket reuses the buffer
    assert cache.address_signature == sig
    cache.prepare_step(["a"], 1, pad_to=(8, 32))   # a larger one moves it
    assert cache.address_signature != sig


def test_fixed_layout_offsets_do_not_depend_on_the_bucket() -> None:
    lay = FixedLayout(rows=100, width=64)
    assert lay.stride == 112 and lay.starts == [0, 112, 224, 448, 560]
    assert lay.size == 560 + 100 * 64
    staging = Staging(torch.device("cpu"), 16)
    a = np.arange(5, dtype=np.int32)
    b = np.arange(3, dtype=np.int64) * (2**40)
    out = staging.upload([a, b], [0, 16])
    assert out[0].tolist() == a.tolist() and out[1].tolist() == b.tolist()  # int64 survives as two words
    assert staging.host_np.size >= 22


def test_input_ids_override_and_unknown_ids() -> None:
    cache = make_cache()
    cache.add_sequence("x", num_tokens=3)  # no ids known
    with pytest.raises(KVForgeError, match="unknown"):
        cache.prepare_step(["x"], 3, num_decodes=0)
    batch = cache.prepare_step(["x"], 3, num_decodes=0, input_ids=[9, 8, 7])
    assert batch.input_ids.tolist() == [9, 8, 7]
    with pytest.raises(KVForgeError, match="input_ids"):
        cache.prepare_step(["x"], 3, num_decodes=0, input_ids=[1, 2])


@pytest.mark.parametrize("bad", [dict(num_decodes=3), dict(num_decodes=-1), dict(num_decodes=True),
                                 dict(logits_indices=[5]), dict(pad_to=(1, 16))])
def test_bad_arguments_are_refused(bad: dict) -> None:
    cache = make_cache()
    cache.add_sequence("a", [1, 2, 3])
    cache.add_sequence("b", [4, 5])
    before = (cache.seq_len("a"), cache.seq_len("b"), cache.pool.stats)
    with pytest.raises(KVForgeError):
        cache.prepare_step(["a", "b"], [3, 2], **({"num_decodes": 0} | bad))
    assert (cache.seq_len("a"), cache.seq_len("b"), cache.pool.stats) == before


def test_a_large_cpu_pool_starts_small_and_grows() -> None:
    """A 4 GiB CPU cache backs one chunk at first (nothing else is zeroed) and grows on demand."""
    from kvforge.storage.cache import CPU_EAGER_BYTES

    cfg = CacheConfig.for_memory("4GiB", 2, 2, 64, block_size=16, dtype=torch.float32, device="cpu")
    cache = KVCache(cfg, backend="torch")
    assert cache.storage_bytes <= max(CPU_EAGER_BYTES, cache.chunk_blocks * cfg.bytes_per_block)
    assert cache.storage_bytes < cfg.estimated_memory_bytes() // 8
    before = cache.capacity_blocks
    cache.add_sequence("long", num_tokens=(before + 1) * cfg.block_size)  # more than is backed
    assert cache.capacity_blocks > before and cache.seq_len("long") == (before + 1) * cfg.block_size
    cache.check_invariants()
    small = make_cache()  # a small pool is backed in full at once, as before
    assert small.storage_bytes == small.config.estimated_memory_bytes()


def test_large_pools_keep_int64_slots() -> None:
    cfg = CacheConfig(block_size=2**16, num_blocks=2**16, num_layers=1, num_kv_heads=1, head_dim=16,
                      dtype=torch.float16, device="cpu", initial_blocks=1, chunk_blocks=1)
    cache = KVCache(cfg, backend="torch")   # 2**32 slot ids: more than int32 holds
    cache.add_sequence("a", [1, 2])
    assert cache.prepare_step(["a"], 2, num_decodes=0).slot_mapping.dtype == torch.int64
