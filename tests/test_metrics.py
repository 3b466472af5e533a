"""The Prometheus endpoint serves the cache's and the engine's metrics (real HTTP on loopback)."""
from __future__ import annotations

import re
import socket
import threading
import urllib.request

import pytest

pytest.importorskip("prometheus_client")

import torch  # noqa: E402

from kvforge import BlockManager, CacheConfig, KVCache  # noqa: E402
from kvforge.tools.metrics import HOST_TIER_METRIC_NAMES, METRIC_NAMES, KVForgeCollector, render, serve  # noqa: E402


def _cache() -> KVCache:
    cfg = CacheConfig(block_size=8, num_blocks=16, num_layers=1, num_kv_heads=1, head_dim=16, device="cpu",
                      enable_compaction=True, chunk_blocks=4)
    cache = KVCache(cfg)
    cache.add_sequence("a", list(range(20)))   # 3 blocks, tail 4 tokens
    cache.add_sequence("b", list(range(20)))   # shares 2 full blocks, own tail
    cache.add_sequence("c", list(range(50, 70)))
    cache.free_sequence("c")                   # 2 cached blocks evictable, tail freed
    return cache


def _values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$", line)  # labels kept in the key
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class _Engine:
    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def stats(self) -> dict:
        return {"num_preemptions": 7, "running": 3, "tokens_generated_total": 120, "model": "tiny",
                "step_ms": {"p50": 1.5}, "busy": True}


def test_endpoint_serves_the_expected_names_over_loopback():
    cache = _cache()
    with serve(0, cache, _Engine(cache)) as server:
        assert server.addr == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    v = _values(text)
    assert len(METRIC_NAMES) >= 25
    for name in METRIC_NAMES:
        assert name in v, name
    assert "# TYPE kvforge_evictions_total counter" in text
    assert "# TYPE kvforge_external_fragmentation_ratio gauge" in text
    assert v["kvforge_blocks_used"] == 4 and v["kvforge_blocks_evictable"] == 2
    assert v["kvforge_blocks_free"] == 10 and v["kvforge_blocks_max"] == 16
    assert v["kvforge_cache_usage_ratio"] == pytest.approx(4 / 16)
    assert v["kvforge_internal_fragmentation_ratio"] == pytest.approx(8 / 32)  # 24 of 32 slots used
    assert v["kvforge_prefix_cache_hit_rate"] == pytest.approx(16 / 60)
    assert v["kvforge_prefix_cache_hit_tokens_total"] == 16
    assert v["kvforge_sequences_active"] == 2 and v["kvforge_tokens_active"] == 40
    assert v["kvforge_cache_bytes"] == cache.storage_bytes
    assert v["kvforge_memory_efficiency_ratio"] == pytest.approx(cache.memory_efficiency())
    assert v["kvforge_preemptions_total"] == 7
    assert v["kvforge_engine_running"] == 3 and v["kvforge_engine_busy"] == 1
    assert v["kvforge_engine_tokens_generated_total"] == 120
    assert v["kvforge_engine_step_ms_p50"] == 1.5
    assert "kvforge_engine_model" not in text
    assert all(name.startswith("kvforge_") for name in v)


def test_scrape_reads_the_cache_at_scrape_time_and_stop_closes_the_port():
    cache = _cache()
    server = serve(0, cache)
    try:
        first = _values(urllib.request.urlopen(server.url, timeout=10).read().decode())
        cache.free_sequence("a")
        cache.free_sequence("b")
        released = cache.compact_cache()
        second = _values(urllib.request.urlopen(server.url, timeout=10).read().decode())
    finally:
        server.stop()
    assert first["kvforge_compactions_total"] == 0 and second["kvforge_compactions_total"] == 1
    assert second["kvforge_bytes_returned_total"] == released > 0
    assert second["kvforge_sequences_active"] == 0
    assert second["kvforge_preemptions_total"] == 0  # no engine: the series exists, at 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.stop()  # idempotent


def test_collector_for_a_block_manager_with_a_lock():
    m = BlockManager(num_blocks=8, block_size=4)
    m.add_sequence(1, num_tokens=6)
    lock = threading.Lock()
    v = _values(render(m, lock=lock))
    assert v["kvforge_blocks_used"] == 2 and v["kvforge_cache_bytes"] == 0
    assert v["kvforge_memory_efficiency_ratio"] == pytest.approx(6 / 32)
    assert not lock.locked()
    # an engine alone: its cache attribute is read
    v = _values(render(engine=_Engine(_cache())))
    assert v["kvforge_blocks_used"] == 4 and v["kvforge_preemptions_total"] == 7
    with pytest.raises(ValueError):
        KVForgeCollector()


def test_generate_serves_engine_metrics_while_running(tmp_path, capsys):
    """`kvforge generate --metrics-port 0` serves the cache's and engine's names on loopback."""
    import json as _json
    import urllib.request

    pytest.importorskip("transformers")
    from kvforge.tools.cli import main as cli_main
    from kvforge.engine import Engine
    from kvforge.engine.testing import save_tiny_checkpoint
    from kvforge.tools.metrics import serve

    save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(_json.dumps({"prompt_token_ids": [1, 2, 3, 4, 5]}) + "\n")
    rc = cli_main(["generate", "--model", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--max-tokens", "3",
                   "--device", "cpu", "--num-blocks", "16", "--metrics-port", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "serving metrics on http://127.0.0.1:" in out and "3 tokens" in out

    engine = Engine(tmp_path / "ckpt", num_blocks=16, device="cpu")
    engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], None)
    with serve(0, engine.cache, engine, lock=engine.step_lock) as server:
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    for name in ("kvforge_blocks_used", "kvforge_preemptions_total", "kvforge_engine_num_generated_tokens"):
        assert name in text, name


def test_an_engine_in_the_cache_place_and_a_cache_only_scrape():
    cache = _cache()
    engine = _Engine(cache)
    engine.step_lock = threading.Lock()  # type: ignore[attr-defined]
    v = _values(render(engine))  # the engine first: its cache is read, its stats exported
    assert v["kvforge_blocks_used"] == 4 and v["kvforge_preemptions_total"] == 7
    assert v["kvforge_engine_running"] == 3
    assert KVForgeCollector(engine).lock is engine.step_lock
    with serve(0, engine) as server:
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    assert _values(text)["kvforge_preemptions_total"] == 7
    only = _values(render(cache))
    assert only["kvforge_preemptions_total"] == 0 and "kvforge_engine_running" not in only
    assert "kvforge_preemptions_total" in METRIC_NAMES


def test_real_engine_stats_are_exported_when_passed_first(tmp_path):
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import save_tiny_checkpoint

    save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    engine = Engine(tmp_path / "ckpt", num_blocks=16, block_size=8, device="cpu")
    engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], SamplingParams(max_tokens=3))
    v = _values(render(engine))
    assert v["kvforge_engine_num_generated_tokens"] == 3 and v["kvforge_preemptions_total"] == 0
    assert v["kvforge_engine_memory_efficiency"] == pytest.approx(engine.stats().memory_efficiency)
    assert "kvforge_engine_allocation_peak_allocations" in v  # nested snapshots flattened one level


# ------------------------------------------------------------ bad ports, taken ports
@pytest.mark.parametrize("port", [-1, 65536, 99999, 2**64, True, False, 8080.0, "8080", None], ids=repr)
def test_a_port_outside_the_range_or_not_an_int_is_a_config_error(port):
    from kvforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^port must be an integer in \[0, 65535\].*got " + re.escape(f"{port!r}")):
        serve(port, _cache())


def test_a_port_in_use_is_a_kvforge_error_naming_the_address():
    from kvforge.errors import AddressInUseError, KVForgeError, ServeError

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(AddressInUseError) as info:
            serve(port, _cache())
    finally:
        holder.close()
    err = info.value
    assert isinstance(err, KVForgeError) and isinstance(err, ServeError) and isinstance(err, OSError)
    assert f"127.0.0.1:{port}" in str(err) and "already in use" in str(err)
    assert (err.addr, err.port, err.errno) == ("127.0.0.1", port, __import__("errno").EADDRINUSE)


def test_an_address_not_on_this_host_is_a_serve_error():
    from kvforge.errors import AddressInUseError, ServeError

    # 192.0.2.0/24 is TEST-NET-1: never a local address, so bind fails at once (no DNS)
    with pytest.raises(ServeError, match=r"^cannot serve metrics on 192\.0\.2\.1:0: ") as info:
        serve(0, _cache(), addr="192.0.2.1")
    assert not isinstance(info.value, AddressInUseError)


def test_serve_first_attach_later():
    cache = _cache()
    with serve(0) as server:
        assert server.collector is None
        assert _values(urllib.request.urlopen(server.url, timeout=10).read().decode()) == {}
        server.attach(cache)
        values = _values(urllib.request.urlopen(server.url, timeout=10).read().decode())
        assert values["kvforge_blocks_used"] == cache.pool.num_allocated_blocks
        from kvforge.errors import ConfigError

        with pytest.raises(ConfigError, match="attach once"):
            server.attach(cache)


# ------------------------------------------------------------ the host tier
def _tiered() -> KVCache:
    """A 4-block device pool (4 KiB blocks) and an 8-block host tier allocated 2 blocks at a time:
    a's 2 full blocks spill, b (4 blocks) swaps out, c onboards a's prefix from the host."""
    cfg = CacheConfig(block_size=8, num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device="cpu", host_memory="32KiB", host_chunk_blocks=2)
    cache = KVCache(cfg, backend="torch")
    cache.add_sequence("a", list(range(16)))
    cache.free_sequence("a")
    cache.add_sequence("b", list(range(100, 132)))  # evicts a's 2 cached blocks: spilled to host 0, 1
    cache.swap_out(["b"])                           # host 2..5
    cache.add_sequence("c", list(range(16)) + [5])  # onboards host 0, 1; evicts 3 of b's (copies exist)
    cache.check_invariants()
    return cache


def test_tier_metrics_of_a_host_tier_are_exact():
    cache = _tiered()
    v = _values(render(cache))
    for name in METRIC_NAMES + HOST_TIER_METRIC_NAMES:
        assert name in v, name
    kib = 1024
    assert v['kvforge_tier_blocks_capacity{tier="device"}'] == 4 and v['kvforge_tier_blocks_capacity{tier="host"}'] == 8
    assert v['kvforge_tier_blocks_used{tier="device"}'] == 4 and v['kvforge_tier_blocks_used{tier="host"}'] == 6
    assert v['kvforge_tier_blocks_cached{tier="device"}'] == 3 and v['kvforge_tier_blocks_cached{tier="host"}'] == 6
    assert v['kvforge_tier_usage_ratio{tier="device"}'] == 1.0 and v['kvforge_tier_usage_ratio{tier="host"}'] == 0.75
    assert v['kvforge_tier_allocated_bytes{tier="device"}'] == 16 * kib == cache.storage_bytes
    assert v['kvforge_tier_allocated_bytes{tier="host"}'] == 24 * kib  # 3 of 4 chunks touched
    assert v['kvforge_tier_bytes_moved_total{direction="to_host"}'] == 24 * kib  # 2 spilled + 4 swapped
    assert v['kvforge_tier_bytes_moved_total{direction="to_device"}'] == 8 * kib  # 2 onboarded
    assert v['kvforge_swapped_blocks_total{direction="out"}'] == 4
    assert v['kvforge_swapped_blocks_total{direction="in"}'] == 0
    assert v["kvforge_sequences_swapped"] == 1 and v["kvforge_sequences_active"] == 1
    assert v["kvforge_host_spilled_blocks_total"] == 2 and v["kvforge_host_spill_reuses_total"] == 3
    assert v["kvforge_host_onboarded_blocks_total"] == 2 and v["kvforge_host_dropped_blocks_total"] == 0
    assert v["kvforge_prefix_cache_host_hit_tokens_total"] == 16 == v["kvforge_prefix_cache_hit_tokens_total"]
    assert v["kvforge_failed_tier_copies_total"] == 0
    text = render(cache)
    assert "# TYPE kvforge_tier_blocks_used gauge" in text and "# TYPE kvforge_tier_bytes_moved_total counter" in text
    # read at scrape time: swapping b back in moves 4 blocks to the device
    cache.free_sequence("c")
    assert cache.swap_in(["b"]) == 4
    w = _values(render(cache))
    assert w['kvforge_swapped_blocks_total{direction="in"}'] == 4 and w["kvforge_sequences_swapped"] == 0
    assert w['kvforge_tier_bytes_moved_total{direction="to_device"}'] == (2 + 4) * 4 * kib


def test_without_a_host_tier_the_counters_read_zero_and_only_the_device_tier_is_exported():
    cache = _cache()
    v = _values(render(cache))
    for name in METRIC_NAMES:
        assert name in v, name
    for name in HOST_TIER_METRIC_NAMES:
        assert name not in v, name
    assert not any('tier="host"' in name for name in v)
    # the device tier: 4 referenced + 2 cached-evictable of 16 backed (compaction's pool: all 16 backed here)
    assert v['kvforge_tier_blocks_used{tier="device"}'] == 6 == v["kvforge_blocks_used"] + v["kvforge_blocks_evictable"]
    assert v['kvforge_tier_blocks_capacity{tier="device"}'] == v["kvforge_blocks_capacity"]
    assert v['kvforge_tier_allocated_bytes{tier="device"}'] == v["kvforge_cache_bytes"] == cache.storage_bytes
    for name in ("kvforge_sequences_swapped", "kvforge_host_spilled_blocks_total", "kvforge_host_spill_reuses_total",
                 "kvforge_host_onboarded_blocks_total", "kvforge_host_dropped_blocks_total",
                 "kvforge_failed_tier_copies_total", "kvforge_prefix_cache_host_hit_tokens_total",
                 'kvforge_tier_bytes_moved_total{direction="to_host"}',
                 'kvforge_tier_bytes_moved_total{direction="to_device"}',
                 'kvforge_swapped_blocks_total{direction="out"}', 'kvforge_swapped_blocks_total{direction="in"}'):
        assert v[name] == 0, name


def test_a_failed_spill_and_a_full_host_tier_are_counted():
    cfg = CacheConfig(block_size=8, num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device="cpu", host_memory="8KiB")  # 2 host blocks
    cache = KVCache(cfg, backend="torch")
    cache.add_sequence("a", list(range(16)))
    cache.free_sequence("a")
    wired = cache.manager.copy_to_host

    def failing(pairs):  # the device-to-host copy fails (injected at the cache's wiring point)
        raise RuntimeError("injected copy failure")

    cache.manager.copy_to_host = failing
    cache.add_sequence("b", list(range(100, 132)))  # a's 2 blocks are evicted; their spill fails
    cache.manager.copy_to_host = wired
    cache.check_invariants()
    v = _values(render(cache))
    assert v["kvforge_failed_tier_copies_total"] == 1
    assert v['kvforge_tier_blocks_used{tier="host"}'] == 0  # the failed spill's keys are forgotten
    assert v['kvforge_tier_bytes_moved_total{direction="to_host"}'] == 0
    cache.free_sequence("b")                        # b's 4 full blocks cached on the device
    for i in range(2):                              # each evicts 2 of them: 4 spills into 2 host blocks
        cache.add_sequence(f"x{i}", list(range(1000 + 100 * i, 1016 + 100 * i)))
        cache.check_invariants()
    v = _values(render(cache))
    assert v['kvforge_tier_blocks_used{tier="host"}'] == 2 and v['kvforge_tier_usage_ratio{tier="host"}'] == 1.0
    assert v["kvforge_host_spilled_blocks_total"] == 4  # the failed 2 are not counted as spilled
    assert v["kvforge_host_dropped_blocks_total"] == 2      # the first 2 of b's, dropped for its last 2
    assert v['kvforge_tier_bytes_moved_total{direction="to_host"}'] == 4 * cfg.bytes_per_block


def test_a_block_manager_with_a_host_tier_has_blocks_and_no_bytes():
    m = BlockManager(num_blocks=4, block_size=4, num_host_blocks=3)
    m.add_sequence(1, list(range(8)))
    m.free_sequence(1)
    m.add_sequence(2, list(range(50, 66)))          # 4 blocks: 1's 2 cached blocks spill (no copy: no storage)
    m.check_invariants()
    v = _values(render(m))
    assert v['kvforge_tier_blocks_capacity{tier="host"}'] == 3 and v['kvforge_tier_blocks_used{tier="host"}'] == 2
    assert v['kvforge_tier_blocks_used{tier="device"}'] == 4 and v["kvforge_host_spilled_blocks_total"] == 2
    assert v['kvforge_tier_allocated_bytes{tier="host"}'] == 0 == v['kvforge_tier_allocated_bytes{tier="device"}']
    assert v['kvforge_tier_bytes_moved_total{direction="to_host"}'] == 0
