"""Caches and engines sharing prefix blocks through a real Redis server (``tests/redis_server.py``).

Two caches (and two engine processes) over one server: what one computed and
published, the other finds by its prefix keys, copies in bit-exact and counts
as cached; the outputs equal computing it. Faults at this level: a dead,
restarted or full server, values overwritten with garbage, another model,
another tenant's salt, another namespace: the cache computes instead and
never uses wrong data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from kvforge import CacheConfig, ConfigError, KVCache, KVForgeError, RedisTier
from tests.redis_server import RedisServer

BS = 8


def tier(server: RedisServer, namespace: str = "t", **kw) -> RedisTier:
    return RedisTier(server.url(), namespace=namespace, timeout=0.5, retry_after=0.2, **kw)


def cache(remote: RedisTier | None, model: str = "m", **kw) -> KVCache:
    cfg = CacheConfig(block_size=BS, num_blocks=kw.pop("num_blocks", 16), num_layers=2, num_kv_heads=2,
                      head_dim=16, dtype=torch.float32, device="cpu", **kw)
    c = KVCache(cfg, backend="torch", remote=remote, model=model)
    if remote is not None:
        assert remote.wait_ready(30.0)  # its reader processes, started at bind: timings below leave them out
    return c


def computed(c: KVCache, seq: str, prompt: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Admit ``prompt``, write random keys/values for what was not cached; return what the sequence holds."""
    r = c.add_sequence(seq, prompt)
    g = torch.Generator().manual_seed(seed)
    for layer in range(2):
        k = torch.randn(len(r.slots), 2, 16, generator=g)
        c.write(layer, r.slots, k, -k)
    return [c.gather(seq, layer) for layer in range(2)]


PROMPT = list(range(100, 141))  # 41 tokens: 5 full blocks before the last token


def publish_from_a(server: RedisServer, **kw) -> tuple[RedisTier, list]:
    ta = tier(server, **kw)
    a = cache(ta)
    want = computed(a, "x", PROMPT)
    a.free_sequence("x")
    assert ta.flush(5.0)
    return ta, want


def test_a_second_cache_copies_in_what_the_first_published(redis: RedisServer) -> None:
    ta, want = publish_from_a(redis)
    assert ta.stats().blocks_written == 5
    b = cache(tier(redis))
    r = b.add_sequence("y", PROMPT)
    assert r.num_cached_tokens == 40 and len(r.slots) == 1
    assert b.prefix_stats().remote_hit_tokens == 40
    for layer in range(2):  # the copied part is bit-exact
        k, v = b.gather("y", layer)
        assert torch.equal(k[:40], want[layer][0][:40]) and torch.equal(v[:40], want[layer][1][:40])
    b.check_invariants()
    procs = b.remote._processes  # the payloads were lent (no copy-out), and every slot is back
    assert procs and all(p.num_free_slots == p.num_slots for p in procs)
    # now local: a third sequence hits on the device, not the server
    fetched = b.remote.stats().hits
    assert b.add_sequence("z", PROMPT).num_cached_tokens == 40
    assert b.remote.stats().hits == fetched


def test_a_prefetch_brings_the_blocks_before_admission_asks(redis: RedisServer) -> None:
    ta, want = publish_from_a(redis)
    b = cache(tier(redis))
    assert b.prefetch_remote(PROMPT[:BS]) is None  # no full block before the last token: nothing to ask
    f = b.prefetch_remote(PROMPT)
    assert f is not None and f.keys == b.manager.remote_candidates(PROMPT)
    f.future.result(timeout=30)
    assert f.done() and b.take_prefetched(f) == 5
    b.remote_prefetching = True  # admissions take only what was prefetched: no second round trip
    r = b.add_sequence("y", PROMPT)
    assert r.num_cached_tokens == 40 and b.remote.stats().fetch_calls == 1
    for layer in range(2):
        k, v = b.gather("y", layer)
        assert torch.equal(k[:40], want[layer][0][:40]) and torch.equal(v[:40], want[layer][1][:40])
    assert b.add_sequence("w", list(range(500, 541))).num_cached_tokens == 0  # not prefetched: computed
    assert b.remote.stats().fetch_calls == 1
    b.check_invariants()
    with pytest.raises(KVForgeError, match="no remote tier"):
        cache(None).prefetch_remote(PROMPT)


def test_lent_payloads_go_back_whether_admitted_replaced_or_dropped(redis: RedisServer) -> None:
    """Prefetched payloads lie in the reader's shared memory until admission uploads them: a
    second prefetch of the same blocks replaces the first (its slot goes back), the admission
    uploads the kept ones (its slot goes back), and a prefetch never taken gives its slot back
    once dropped. A live sequence's blocks are never touched by any of it."""
    _, want = publish_from_a(redis)
    b = cache(tier(redis), num_blocks=24)
    live = computed(b, "live", list(range(900, 941)), seed=3)
    proc = b.remote._processes[0]
    first, second = b.prefetch_remote(PROMPT), b.prefetch_remote(PROMPT)
    assert first is not None and second is not None
    first.future.result(timeout=30), second.future.result(timeout=30)
    assert proc.num_free_slots == proc.num_slots - 2  # both lent
    assert b.take_prefetched(first) == 5 and b.take_prefetched(second) == 5
    assert proc.num_free_slots == proc.num_slots - 1  # the first one's blocks were replaced
    b.remote_prefetching = True
    assert b.add_sequence("y", PROMPT).num_cached_tokens == 40
    assert proc.num_free_slots == proc.num_slots
    for layer in range(2):
        k, v = b.gather("y", layer)
        assert torch.equal(k[:40], want[layer][0][:40]) and torch.equal(v[:40], want[layer][1][:40])
    b.free_sequence("y", publish=False)
    b.reclaim_unused_blocks()  # not local any more: asked of the tier again
    never = b.prefetch_remote(PROMPT)
    assert never is not None and len(never.future.result(timeout=30)) == 5
    assert proc.num_free_slots == proc.num_slots - 1
    del never  # a prefetch whose sequence went away: collected, its slot goes back
    assert proc.num_free_slots == proc.num_slots
    for layer in range(2):
        lk, lv = b.gather("live", layer)
        assert torch.equal(lk, live[layer][0]) and torch.equal(lv, live[layer][1])
    b.check_invariants()


def test_a_chunked_first_step_takes_the_whole_remote_run_when_it_fits(redis: RedisServer) -> None:
    publish_from_a(redis)
    b = cache(tier(redis))
    r = b.add_sequence("y", PROMPT, num_tokens=8)  # a chunked prefill's first chunk
    assert r.num_cached_tokens == 40 and b.seq_len("y") == 40 and b.num_pending_tokens("y") == 1
    b.check_invariants()


def test_publish_false_and_unknown_ids_share_nothing(redis: RedisServer) -> None:
    ta = tier(redis)
    a = cache(ta)
    computed(a, "x", PROMPT)
    a.free_sequence("x", publish=False)  # a failed step's blocks were never computed
    assert ta.flush(5.0) and ta.stats().blocks_written == 0
    unknown = cache(tier(redis))
    unknown.add_sequence("n", num_tokens=40)  # no token ids: no keys, nothing to share
    assert unknown.publish("n") == 0


@pytest.mark.parametrize("other", ["model", "salt", "namespace", "dtype"])
def test_other_models_tenants_namespaces_and_layouts_never_share(redis: RedisServer, other: str) -> None:
    publish_from_a(redis)
    if other == "model":
        b = cache(tier(redis), model="another-model")
    elif other == "namespace":
        b = cache(tier(redis, namespace="other"))
    elif other == "dtype":
        cfg = CacheConfig(block_size=BS, num_blocks=16, num_layers=2, num_kv_heads=2, head_dim=16,
                          dtype=torch.float16, device="cpu")
        b = KVCache(cfg, backend="torch", remote=tier(redis), model="m")
    else:
        b = cache(tier(redis))
    r = b.add_sequence("y", PROMPT, salt="tenant-2" if other == "salt" else None)
    assert r.num_cached_tokens == 0 and b.prefix_stats().remote_hit_tokens == 0


def test_garbage_values_are_refused_and_the_prompt_computed(redis: RedisServer) -> None:
    publish_from_a(redis)
    client = redis.client()
    names = sorted(client.keys("kvforge:t:*"))
    assert len(names) == 5
    for name in names:  # flip one payload byte in each stored value
        value = bytearray(client.get(name))
        value[-1] ^= 0xFF
        client.set(name, bytes(value))
    tb = tier(redis)
    b = cache(tb)
    r = b.add_sequence("y", PROMPT)
    assert r.num_cached_tokens == 0 and len(r.slots) == len(PROMPT)
    assert tb.stats().bad_checksum >= 1
    b.check_invariants()


def test_a_dead_server_costs_misses_not_errors(redis: RedisServer, tmp_path: Path) -> None:
    with RedisServer() as dying:
        ta = tier(dying)
        a = cache(ta)
        computed(a, "x", PROMPT)
        dying.kill()
        a.free_sequence("x")  # the publish is dropped or fails on the writer thread
        ta.flush(5.0)
        b = cache(tier(dying))
        r = b.add_sequence("y", PROMPT)
        assert r.num_cached_tokens == 0 and len(r.slots) == len(PROMPT)
        assert b.remote.stats().connection_errors + b.remote.stats().timeouts >= 1
        b.check_invariants()


# ------------------------------------------------------------- two engine processes
ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from kvforge import RedisTier
    from kvforge.engine import Engine, SamplingParams
    folder, url, namespace, prompt = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    tier = RedisTier(url, namespace=namespace, timeout=1.0)
    engine = Engine(folder, num_blocks=32, block_size=8, remote=tier)
    out = engine.generate([prompt], SamplingParams(max_tokens=8))[0]
    assert tier.flush(10.0)
    engine.check_invariants()
    stats = engine.stats()
    print(json.dumps(dict(tokens=out.token_ids, cached=out.metrics.num_cached_tokens,
                          remote=stats.prefix.remote_hit_tokens, remote_stat=stats.prefix_remote_hit_tokens,
                          fetches=stats.num_remote_fetches, declined=stats.num_remote_fetches_declined)))
""")


def test_two_engine_processes_share_a_prompt_through_one_server(redis: RedisServer, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint
    folder = tmp_path / "ckpt"
    model = save_tiny_checkpoint("LlamaForCausalLM", folder)
    script = tmp_path / "serve.py"
    script.write_text(ENGINE_SCRIPT)
    prompt = list(range(3, 60))
    namespace = f"e{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def serve() -> dict:
        r = subprocess.run([sys.executable, str(script), str(folder), redis.url(), namespace, json.dumps(prompt)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = serve()
    second = serve()
    assert first["remote"] == 0 and first["cached"] == 0
    assert second["remote"] == second["remote_stat"] == 56 and second["cached"] == 56  # every full block but the last
    # the first finds nothing (one lookup, no fetch); the second fetches once
    assert (first["fetches"], first["declined"], second["fetches"], second["declined"]) == (0, 0, 1, 0)
    assert first["tokens"] == second["tokens"] == hf_greedy(model, prompt, 8)


def test_an_engine_keeps_serving_right_answers_when_its_server_dies_or_hangs(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint
    model = save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    prompts = [list(range(3, 40)), list(range(5, 50)), list(range(3, 40)) + [7, 8, 9]]
    params = SamplingParams(max_tokens=6)
    with RedisServer() as s:
        t = RedisTier(s.url(), namespace="keep", timeout=0.2, retry_after=0.2)
        engine = Engine(str(tmp_path / "ckpt"), num_blocks=24, block_size=8, remote=t)
        assert [o.token_ids for o in engine.generate(prompts[:1], params)] == [hf_greedy(model, prompts[0], 6)]
        s.pause()  # hung: every wait is bounded by the timeout
        got = [o.token_ids for o in engine.generate(prompts[1:2], params)]
        s.resume()
        s.kill()  # dead
        got += [o.token_ids for o in engine.generate(prompts[2:], params)]
        assert got == [hf_greedy(model, p, 6) for p in prompts[1:]]
        stats = t.stats()
        assert stats.timeouts + stats.connection_errors >= 1
        engine.check_invariants()


def test_the_remote_tier_is_in_the_prometheus_metrics(redis: RedisServer) -> None:
    pytest.importorskip("prometheus_client")
    from kvforge.tools.metrics import METRIC_NAMES, REMOTE_METRIC_NAMES, render
    publish_from_a(redis)
    b = cache(tier(redis))
    b.add_sequence("y", PROMPT)
    text = render(b)
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert set(REMOTE_METRIC_NAMES) <= set(samples)
    assert samples['kvforge_remote_events_total{event="hits"}'] == 5
    assert samples["kvforge_prefix_cache_remote_hit_tokens_total"] == 40
    without = render(cache(None))
    assert "kvforge_remote_events_total" not in without and all(n.split("{")[0] in without for n in METRIC_NAMES)


def test_blocks_the_tier_has_are_not_copied_off_the_device_again(redis: RedisServer) -> None:
    ta = tier(redis)
    a = cache(ta)
    computed(a, "x", PROMPT)
    assert a.publish("x") == 5 and ta.flush(5.0)
    a.fork("x", "x2")
    assert a.publish("x2") == 0  # the same blocks: nothing to copy or send
    slots = a.append_tokens("x2", 7, list(range(7)))  # fills the sixth block: only it is new
    for layer in range(2):
        a.write(layer, slots, torch.ones(7, 2, 16), torch.ones(7, 2, 16))
    assert a.publish("x2") == 1 and ta.flush(5.0)
    assert ta.stats().blocks_written == 6


def test_a_prompt_waiting_for_the_remote_tier_holds_up_no_other(tmp_path: Path) -> None:
    """The engine prefetches in the background: while a long prompt's fetch hangs on the
    server (the server stops the moment the fetch starts, after the lookup found the
    blocks), a short prompt behind it is admitted and finishes; the long one is then
    computed once the fetch times out."""
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint
    model = save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    long, short = list(range(3, 60)), [5, 6, 7]  # 7 full blocks; none
    params = SamplingParams(max_tokens=4)
    with RedisServer() as s:
        a = Engine(str(tmp_path / "ckpt"), num_blocks=24, block_size=8,
                   remote=RedisTier(s.url(), namespace="hold", timeout=1.0))
        a.generate([long], params)
        assert a.cache.remote.flush(5.0)
        t = RedisTier(s.url(), namespace="hold", timeout=1.5, retry_after=0.2)

        def hung(fetch):  # the cache calls fetch_held (lent payloads), or fetch with reader="thread"
            def hung_fetch(keys: list[bytes]):
                s.pause()  # a real server that stops answering, at this very moment
                return fetch(keys)
            return hung_fetch
        t.fetch, t.fetch_held = hung(t.fetch), hung(t.fetch_held)  # type: ignore[method-assign]
        engine = Engine(str(tmp_path / "ckpt"), num_blocks=24, block_size=8, remote=t)
        assert engine.cache.remote_prefetching
        first, second = engine.add_request(long, params), engine.add_request(short, params)
        finished: list[str] = []
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished]
            finished += [o.request_id for o in done]
            tokens.update((o.request_id, list(o.token_ids)) for o in done)
            if [o.request_id for o in done] == [second]:  # the short one is done while the long one waits
                assert engine.scheduler.num_fetching == 1 and len(engine.scheduler.waiting) == 1
        s.resume()
        assert finished == [second, first]
        st = t.stats()
        assert (st.lookup_calls, st.fetch_calls, st.timeouts, st.hits) == (1, 1, 1, 0)  # found, then timed out
        engine.check_invariants()
        for rid, prompt in ((first, long), (second, short)):
            assert tokens[rid] == hf_greedy(model, prompt, 4)


def fp8_cache(remote: RedisTier | None, num_blocks: int = 16) -> KVCache:
    cfg = CacheConfig(block_size=BS, num_blocks=num_blocks, num_layers=2, num_kv_heads=2, head_dim=16,
                      dtype="fp8_e4m3", model_dtype=torch.float32, device="cpu")
    c = KVCache(cfg, backend="torch", remote=remote, model="m")
    if remote is not None:
        assert remote.wait_ready(30.0)
    return c


def test_fp8_caches_share_only_with_the_same_scales(redis: RedisServer) -> None:
    """An fp8 block's bytes mean something only with its scales: the tier's names carry a digest
    of every layer's scales, so a cache with other scales misses instead of misreading; scales
    set after the tier was bound (the loader's order) bind it again, once, before its first use."""
    ta = tier(redis, "fp8")
    a = fp8_cache(ta)
    for layer in range(2):
        a.set_kv_scales(layer, 0.5, 0.25)
    want = computed(a, "x", PROMPT)
    a.free_sequence("x")
    assert ta.flush(5.0) and ta.stats().blocks_written == 5
    assert ta.layout is not None and ta.layout.quant.startswith("scales:")
    same = fp8_cache(tier(redis, "fp8"))
    for layer in range(2):
        same.set_kv_scales(layer, 0.5, 0.25)
    r = same.add_sequence("y", PROMPT)
    assert r.num_cached_tokens == 40
    for layer in range(2):  # dequantized with the same scales: the same values
        k, v = same.gather("y", layer)
        assert torch.equal(k[:40], want[layer][0][:40]) and torch.equal(v[:40], want[layer][1][:40])
    other = fp8_cache(tier(redis, "fp8"))  # scales left at 1.0: other names, a plain miss
    assert other.add_sequence("z", PROMPT).num_cached_tokens == 0
    assert other.remote.stats().misses >= 1 and other.remote.stats().bad_fingerprint == 0
    # once the tier was used, new scales are refused (and nothing changes)
    before = other.kv_scales(0)
    other.free_sequence("z", publish=False)
    other.reclaim_unused_blocks()
    with pytest.raises(ConfigError, match="was used with the current scales"):
        other.set_kv_scales(0, 2.0, 2.0)
    assert torch.equal(other.kv_scales(0).k_scale, before.k_scale)
    for c in (a, same, other):
        c.remote.close()
