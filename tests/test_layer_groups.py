"""Layer groups: sliding-window layers keep only the blocks they read (``CacheConfig.layer_windows``).

The plan of groups; a grouped cache against an ungrouped one driven by the
same operations (prefill chunks, decodes, prefix hits, fork, truncation,
compaction), with attention read through each group's own tables equal to
attention over every block; the blocks a long decode holds; refusals that
change nothing; and the engine (native Qwen2 with a window on its last layer,
and transformers' Gemma 2 in ``test_engine_transformers``) token-equal to
transformers' ``generate`` while its window layers release their blocks.
"""
from __future__ import annotations

import random

import pytest
import torch

from kvforge import CacheConfig, KVCache, kernels
from kvforge.config import KVGroup, plan_kv_groups
from kvforge.errors import ConfigError, KVForgeError, OutOfBlocksError, SequenceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BS, HEADS, DIM = 4, 2, 8
WINDOWS = (None, 6, None, 6)  # Gemma 2's alternation, a window of 6 tokens


def config(windows=WINDOWS, num_blocks: int = 96, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
           **kw) -> CacheConfig:
    return CacheConfig(block_size=BS, num_blocks=num_blocks, num_layers=4, num_kv_heads=HEADS,
                       head_dim=DIM, dtype=dtype, device=device, layer_windows=windows, **kw)


def test_plan_of_groups() -> None:
    assert plan_kv_groups(None, 3) == (KVGroup(None, (0, 1, 2)),)
    assert plan_kv_groups((None, 8, None, 8), 4) == (KVGroup(None, (0, 2)), KVGroup(8, (1, 3)))
    # Gemma 3's five windowed layers per full one: groups of the full layers' count, the last one short
    g = plan_kv_groups((8, 8, 8, 8, 8, None) * 2, 12)
    assert g[0] == KVGroup(None, (5, 11)) and [x.layers for x in g[1:]] == [(0, 1), (2, 3), (4, 6), (7, 8), (9, 10)]
    assert plan_kv_groups((8, 8), 2) == (KVGroup(None, (0, 1)),)  # no full layer: one group keeps everything
    assert len(plan_kv_groups((None,) + (8,) * 20, 21)) == 1  # 21 groups: beyond MAX_KV_GROUPS
    c = config()
    assert c.page_layers == 2 and c.bytes_per_block == 2 * 2 * BS * HEADS * DIM * 4
    assert c.layer_group(3) == (1, 1) and c.layer_group(2) == (0, 1)
    assert config((None,) * 4).kv_groups == (KVGroup(None, (0, 1, 2, 3)),) and config((None,) * 4).layer_windows is None


@pytest.mark.parametrize("bad, match", [
    ((None, 6, None), "one window .* per layer, 4 of them"),
    ((None, 0, None, 6), r"layer_windows\[1\] must be None or a window"),
    ((None, 6.0, None, 6), r"layer_windows\[1\]"),
    ("full", "one window"),
])
def test_bad_layer_windows_are_refused(bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config(bad)


def test_host_and_remote_tiers_are_refused_for_a_grouped_cache() -> None:
    with pytest.raises(ConfigError, match="host_memory with layer_windows"):
        config(host_memory="1MiB")
    config((None,) * 4, host_memory="1MiB")  # no window: no groups, the host tier is fine


def _kv_of(ids: torch.Tensor, pos: torch.Tensor, layer: int, which: int) -> torch.Tensor:
    """Deterministic keys (``which`` 0) or values (1) ``[T, HEADS, DIM]`` of tokens ``ids`` at ``pos``."""
    x = ids.cpu().double()[:, None, None] * 0.37 + pos.cpu().double()[:, None, None] * 0.11
    h = torch.arange(HEADS, dtype=torch.float64)[None, :, None]
    d = torch.arange(DIM, dtype=torch.float64)[None, None, :]
    return torch.sin(x * (1.3 + d * 0.17) + h * 0.7 + layer * 0.5 + which * 1.9).float()


class Pair:
    """A grouped cache and an ungrouped one (every block kept), fed the same keys and values."""

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, tol: float = 1e-5) -> None:
        self.grouped = KVCache(config(num_blocks=96, device=device, dtype=dtype))
        self.plain = KVCache(config((None,) * 4, num_blocks=192, device=device, dtype=dtype))
        assert self.grouped.groups is not None and self.plain.groups is None
        self.gen = torch.Generator().manual_seed(0)
        self.device, self.dtype, self.tol = device, dtype, tol

    def both(self, name: str, *args, **kw):
        out = getattr(self.grouped, name)(*args, **kw)
        getattr(self.plain, name)(*args, **kw)
        return out

    def step(self, seq_ids: list, counts: list[int]) -> None:
        """Write fresh keys/values for the step's new tokens in every layer, then compare each
        layer's attention over the step's rows (prefill kernel: ragged) in the two caches."""
        total = sum(counts)
        bg = self.grouped.prepare_step(seq_ids, counts)
        bp = self.plain.prepare_step(seq_ids, counts)
        for layer, window in enumerate(WINDOWS):
            # keys and values a function of (token id, position, layer), as a model's are of the
            # prefix: a block computed twice for one prefix holds the same bytes in either cache
            k, v = (_kv_of(bg.input_ids, bg.positions, layer, which).to(self.device, self.dtype) for which in (0, 1))
            q = torch.randn(total, 4, DIM, generator=self.gen).to(self.device, self.dtype)
            outs = []
            for cache, b in ((self.grouped, bg), (self.plain, bp)):
                b = b.for_group(cache.layer_groups[layer])
                cache.write(layer, b.slot_mapping, k, v)
                if b.is_decode:
                    o = kernels.paged_decode_attention(q, cache.layer_view(layer), None, b.decode_block_tables,
                                                       b.decode_context_lens, sliding_window=window)
                else:
                    assert not b.num_decodes
                    o = kernels.paged_prefill_attention(q, cache.layer_view(layer), None, b.prefill_block_tables,
                                                        b.cu_query_lens, b.prefill_context_lens,
                                                        sliding_window=window)
                outs.append(o)
            assert outs[0].isfinite().all()
            torch.testing.assert_close(outs[0], outs[1], rtol=self.tol, atol=self.tol)

    def check(self) -> None:
        self.grouped.check_invariants()
        self.plain.check_invariants()


def test_a_grouped_cache_reads_what_keeping_every_block_reads() -> None:
    grouped_against_plain(Pair())


def grouped_against_plain(p: Pair) -> None:
    """Prefill chunks, decodes, a prefix hit, a fork, a truncation and a compaction, the
    same in both caches; every layer's attention compared after every step."""
    rng = random.Random(7)
    prompt = [rng.randrange(100) for _ in range(30)]
    p.both("add_sequence", "a", prompt, num_tokens=12)  # chunked prefill: 12, then 18
    p.step(["a"], [12])
    p.both("append_tokens", "a", 18)
    p.step(["a"], [18])
    p.check()
    # an append releases what its first new token no longer reads (token 12 reads from 7 on)
    t = p.grouped.groups.tables[0]
    row = p.grouped.manager._seqs.row("a")
    assert t.num_released(row) == (12 - 6 + 1) // BS and len(t.kept(row)) == 8 - 1
    for i in range(12):  # decodes with ids
        p.both("append_tokens_batch", ["a"], 1, [rng.randrange(100)])
        p.step(["a"], [1])
    p.check()
    assert t.num_released(row) == (41 - 6 + 1) // BS and len(t.kept(row)) == 11 - 9  # tokens 36..41
    # a second prompt sharing the first 30 tokens: its prefix hit reuses both groups' cached blocks
    r = p.both("add_sequence", "b", prompt + [1, 2, 3])
    assert r.num_cached_tokens == 28  # 7 full blocks, never the block of the last token
    p.step(["b"], [33 - 28])
    p.both("fork", "b", "c")
    for i in range(6):
        p.both("append_tokens_batch", ["b", "c"], 1, [rng.randrange(100), rng.randrange(100)])
        p.step(["b", "c"], [1, 1])
        p.check()
    p.both("truncate", "c", p.grouped.seq_len("c") - 2)  # speculative rollback within the window
    p.both("append_tokens_batch", ["c"], 1, [5])
    p.step(["c"], [1])
    p.both("free_sequence", "a")
    assert p.grouped.compact_cache() >= 0
    p.plain.compact_cache()
    p.check()
    p.both("append_tokens_batch", ["b", "c"], 1, [7, 8])
    p.step(["b", "c"], [1, 1])
    for s in ("b", "c"):
        p.both("free_sequence", s)
    p.check()
    assert p.grouped.pool.num_allocated_blocks == 0


def test_a_long_decode_holds_the_window_not_the_context() -> None:
    cache = KVCache(config(num_blocks=64))
    cache.add_sequence("s", list(range(8)))
    for i in range(200):
        cache.append_tokens_batch(["s"], 1, [i % 50])
        cache.prepare_step(["s"], 1)  # a step releases what its token no longer reads
    cache.check_invariants()
    n = cache.seq_len("s")
    full = -(-n // BS)
    # group 0 holds every block; the window group the blocks of the last 6 tokens and the next one's
    assert cache.pool.num_allocated_blocks <= full + 3
    assert cache.live_kv_bytes() < 2 * n * cache.config.bytes_per_block // BS
    with pytest.raises(KVForgeError, match="layer 1 has a sliding window of 6 tokens and released"):
        cache.gather("s", 1)
    k, _ = cache.gather("s", 0)
    assert k.shape[0] == n


def test_failed_calls_change_nothing() -> None:
    cache = KVCache(config(num_blocks=12))
    cache.add_sequence("a", list(range(20)))  # 5 + 5 blocks
    cache.check_invariants()
    before = (cache.pool.num_allocated_blocks, cache.seq_len("a"), cache.block_table("a"))
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence("b", list(range(100, 120)))
    with pytest.raises(OutOfBlocksError):
        cache.append_tokens("a", 40)
    with pytest.raises(SequenceError, match="cannot go back to 2 tokens: its sliding-window layers"):
        for i in range(10):
            cache.append_tokens_batch(["a"], 1, [i])
            cache.prepare_step(["a"], 1)  # the step releases what its token no longer reads
        cache.truncate("a", 2)
    cache.check_invariants()
    assert cache.seq_len("a") == 30 and before[2] == cache.block_table("a")[:5]
    with pytest.raises(KVForgeError, match="not built for a cache whose layers are split into groups"):
        cache.reserve_tokens_batch(["a"], 1)
    with pytest.raises(SequenceError):
        cache.append_tokens_batch(["a", "nobody"], 1, [1, 2])
    cache.check_invariants()
    cache.free_sequence("a")
    cache.check_invariants()
    assert cache.pool.num_allocated_blocks == 0


def test_a_failed_step_drops_the_window_groups_cached_copies() -> None:
    """The engine drops a failed step's cached blocks by their group-0 ids: the other groups'
    copies of them (never written either) go too."""
    cache = KVCache(config(num_blocks=64))
    cache.add_sequence("a", list(range(17)))
    table = cache.block_table("a")
    cache.free_sequence("a")
    evictable = len(cache.pool.evictable_blocks())
    assert evictable == 8  # 4 full blocks in each group
    assert cache.drop_cached_blocks(table) == 8
    r = cache.add_sequence("b", list(range(17)))
    assert r.num_cached_tokens == 0


def test_native_engine_with_a_window_layer_equals_transformers(tmp_path) -> None:
    """Qwen2 with a sliding window on its last layer (``max_window_layers=1`` of 2), prompts
    sharing 29 tokens, chunked prefill, in the same KV memory with the window layer's blocks
    released and kept: both equal transformers' greedy ``generate``; releasing holds less."""
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, run_steps, save_tiny_checkpoint

    model = save_tiny_checkpoint("Qwen2ForCausalLM", tmp_path, use_sliding_window=True, sliding_window=8,
                                 max_window_layers=1)
    rng = random.Random(3)
    shared = [rng.randrange(3, 128) for _ in range(29)]
    prompts = [shared + [rng.randrange(3, 128) for _ in range(n)] for n in (2, 7, 4)]
    want = [hf_greedy(model, p, 20) for p in prompts]
    stats = {}
    for mode in ("free", "keep"):
        engine = Engine(str(tmp_path), kv_memory="96KiB", block_size=4, max_num_batched_tokens=16,
                        sliding_window_blocks=mode)
        assert engine.model_impl == "native"
        assert (engine.cache.groups is not None) == (mode == "free")
        got = run_steps(engine, prompts, [SamplingParams(max_tokens=20)] * len(prompts))
        assert got == want, mode
        stats[mode] = engine.stats()
        assert stats[mode].prefix_hit_tokens > 0
    assert stats["free"].peak_kv_bytes < 0.8 * stats["keep"].peak_kv_bytes


def test_transformers_gemma2_releases_its_window_blocks(tmp_path) -> None:
    """Gemma 2 through ``model_impl="transformers"`` (a window layer and a full one, soft-capping):
    its window layer gets a group of its own, and the output is transformers' own."""
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, run_steps
    from tests.hf_models import save_tiny_model

    model = save_tiny_model("gemma2", tmp_path)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (30, 19)]
    engine = Engine(str(tmp_path), model_impl="transformers", num_blocks=64, block_size=4)
    assert engine.cache.groups is not None and engine.cache.config.kv_groups[1].window == 8
    got = run_steps(engine, prompts, [SamplingParams(max_tokens=12)] * len(prompts))
    assert got == [hf_greedy(model, p, 12) for p in prompts]


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_against_keeping_every_block(seed: int) -> None:
    """Random admissions with shared prefixes (chunked or whole), decodes, forks, truncations,
    frees and compactions on a small grouped pool and on an ungrouped one: whenever both
    reused the same prefix, every layer's attention is equal after every step, the invariants
    hold, and the pool is empty at the end. An admission one of them refused or reused less
    of is taken back as the engine takes back a step it never ran."""
    _fuzz(seed)


def _discard(cache: KVCache, seq_id: str, num_cached: int) -> None:
    """Take back an admission whose step never ran: free it and drop its uncomputed blocks."""
    blocks = cache.blocks_of_tokens(seq_id, num_cached, cache.seq_len(seq_id))
    cache.free_sequence(seq_id, publish=False)
    cache.drop_cached_blocks(blocks)


def _fuzz(seed: int, steps: int = 150, blocks: int = 40) -> None:
    rng = random.Random(seed)
    p = Pair()
    p.grouped = KVCache(config(num_blocks=blocks))  # small enough that appends run out
    p.plain = KVCache(config((None,) * 4, num_blocks=blocks * 2))
    g, plain = p.grouped, p.plain
    live: list[str] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    for step in range(steps):
        op = rng.random()
        if op < 0.2 or not live:  # admit, reusing a shared prefix, whole or chunked
            pre = rng.choice(prefixes)
            prompt = pre[:rng.randrange(1, len(pre) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(8))]
            sid, n = f"s{step}", rng.choice([None, max(1, len(prompt) // 2)])
            try:
                rg = g.add_sequence(sid, prompt, num_tokens=n)
            except OutOfBlocksError:
                continue
            try:
                rp = plain.add_sequence(sid, prompt, num_tokens=n)
            except OutOfBlocksError:
                _discard(g, sid, rg.num_cached_tokens)
                continue
            if rg.num_cached_tokens != rp.num_cached_tokens:  # the window group held less of it
                _discard(g, sid, rg.num_cached_tokens)
                _discard(plain, sid, rp.num_cached_tokens)
                continue
            live.append(sid)
            if g.seq_len(sid) > rg.num_cached_tokens:
                p.step([sid], [g.seq_len(sid) - rg.num_cached_tokens])
        elif op < 0.6:  # the next prompt chunk of one, or a decode of a few
            sids = rng.sample(live, k=min(len(live), rng.randrange(1, 4)))
            pending = [s for s in sids if g.num_pending_tokens(s)]
            if pending:
                sid = pending[0]
                k = min(g.num_pending_tokens(sid), rng.randrange(1, 10))
                sids, counts, ids = [sid], [k], None
            else:
                counts, ids = [1] * len(sids), [rng.randrange(50) for _ in sids]
            try:
                g.append_tokens_batch(sids, counts, ids)
            except OutOfBlocksError:
                continue
            plain.append_tokens_batch(sids, counts, ids)
            p.step(sids, counts)
        elif op < 0.7:  # fork
            sid = rng.choice(live)
            if not g.num_pending_tokens(sid):
                child = f"s{step}"
                p.both("fork", sid, child)
                live.append(child)
        elif op < 0.8:  # take back a few tokens (refused below what a window released)
            sid = rng.choice(live)
            if not g.num_pending_tokens(sid):
                k = max(1, g.seq_len(sid) - rng.randrange(5))
                try:
                    g.truncate(sid, k)
                except SequenceError:
                    continue
                plain.truncate(sid, k)
        elif op < 0.92:
            sid = live.pop(rng.randrange(len(live)))
            p.both("free_sequence", sid)
        else:
            p.both("compact_cache")
        p.check()
    for sid in live:
        p.both("free_sequence", sid)
    p.check()
    assert g.pool.num_allocated_blocks == 0
