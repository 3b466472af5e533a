"""On a GPU, with a real Redis server: blocks published by one cache come back bit-exact
in another, straight from the reader processes' page-locked shared memory (one upload per
contiguous run) or, with reads on threads, through the pinned staging rounds (packing a
round while the one before uploads); and the side-stream copy off the device, in bf16 and fp16."""
from __future__ import annotations

import pytest
import torch

import kvforge.storage.sharing as sharing
from kvforge import CacheConfig, KVCache, RedisTier
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")]

BS, LAYERS, HEADS, DIM = 16, 2, 2, 64
PROMPT = list(range(11, 11 + 12 * BS + 3))  # 12 full blocks


def make(server: RedisServer, namespace: str, dtype: torch.dtype, reader: str = "auto") -> KVCache:
    cfg = CacheConfig(block_size=BS, num_blocks=64, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                      dtype=dtype, device="cuda", chunk_blocks=8)  # blocks over several device chunks
    return KVCache(cfg, backend="torch", remote=RedisTier(server.url(), namespace, timeout=2.0, reader=reader),
                   model="m")


@pytest.mark.parametrize("reader", ["process", "thread"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_published_blocks_come_back_bit_exact(redis: RedisServer, dtype: torch.dtype, reader: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ns = f"gpu-{str(dtype).removeprefix('torch.')}-{reader}"
    a = make(redis, ns, dtype)
    r = a.add_sequence("x", PROMPT)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in range(LAYERS):
        k = torch.randn(len(r.slots), HEADS, DIM, generator=gen, device="cuda").to(dtype)
        a.write(layer, r.slots, k, -k)
    want = [tuple(t.clone() for t in a.gather("x", layer)) for layer in range(LAYERS)]
    a.free_sequence("x")
    # the freed blocks are overwritten at once: the publish copy must have gathered them first
    z = a.add_sequence("z", list(range(5000, 5000 + len(PROMPT))))
    for layer in range(LAYERS):
        a.write(layer, z.slots, torch.full((len(z.slots), HEADS, DIM), 7.0, dtype=dtype, device="cuda"),
                torch.zeros(len(z.slots), HEADS, DIM, dtype=dtype, device="cuda"))
    assert a.remote.flush(10.0) and a.remote.stats().blocks_written == 12

    block_bytes = a.config.bytes_per_block
    monkeypatch.setattr(sharing, "STAGING_BYTES", 5 * block_bytes)  # rounds of 5, 5 and 2 blocks
    b = make(redis, ns, dtype, reader)
    got = b.add_sequence("y", PROMPT)
    assert got.num_cached_tokens == 12 * BS
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        k, v = b.gather("y", layer)
        assert torch.equal(k[: 12 * BS], want[layer][0][: 12 * BS])
        assert torch.equal(v[: 12 * BS], want[layer][1][: 12 * BS])
    staged = [buf for buf in b._remote_bufs if buf is not None]
    if reader == "process":  # lent from page-locked shared memory: uploaded from there, nothing staged
        procs = b.remote._processes
        assert procs and all(p.pinned is not None for p in procs) and not staged
        assert all(p.num_free_slots == p.num_slots for p in procs)  # handed back after the upload
    else:
        assert len(staged) == 2 and all(buf.is_pinned() for buf in staged)
    b.check_invariants()
    for cache in (a, b):
        cache.remote.close()
