"""The simulator's accounting against hand-computed traces, and every built-in workload."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import numpy as np

import pytest

from kvforge.config import CacheConfig
from kvforge.errors import ConfigError
from kvforge.model_shapes import MODEL_SHAPES
from kvforge.tools.simulate import SimulationConfig, register, simulate, simulate_static
from kvforge.tools.workload import BUILTIN_WORKLOADS, Request, Workload, make_workload


def _workload(*reqs: tuple[float, int, int], max_model_len: int = 10, **kw) -> Workload:
    """Requests given as (arrival, prompt_len, output_len)."""
    return Workload("hand", tuple(Request(f"r{i}", i, a, p, o, **kw) for i, (a, p, o) in enumerate(reqs)),
                    max_model_len, max_model_len)


def _cfg(**kw) -> SimulationConfig:
    base = dict(block_size=4, num_blocks=16, enable_prefix_caching=False, enable_compaction=False)
    base.update(kw)
    return SimulationConfig(**base)


def test_two_requests_exact_accounting():
    # A: prompt 5, output 4 -> holds 5, 6, 7, 8 tokens at steps 0..3 (2 blocks of 4)
    # B: prompt 3, output 2 -> holds 3, 4 tokens at steps 0..1 (1 block)
    w = _workload((0, 5, 4), (0, 3, 2))
    r = simulate(w, _cfg(), check=True)
    tl = r.timeline
    assert tl.step.tolist() == [0, 1, 2, 3]
    assert tl.held_blocks.tolist() == [3, 3, 2, 2]
    assert tl.live_slots.tolist() == [8, 10, 7, 8]
    assert tl.wasted_slots.tolist() == [4, 2, 1, 0]
    assert tl.running.tolist() == [2, 2, 1, 1]
    p = r.paged
    assert (p.steps, p.peak_blocks, p.peak_step, p.max_concurrency) == (4, 3, 0, 2)
    assert p.waste == pytest.approx(7 / 40)                      # wasted over reserved slot-steps
    assert p.internal_fragmentation_max == pytest.approx(4 / 12)
    assert p.memory_efficiency_max == pytest.approx(10 / 64)
    assert p.preemptions == 0 and p.compactions == 0 and p.mean_wait_steps == 0
    # static, max-model-len: each request reserves 10 slots for its whole life
    s = r.static
    assert s is not None and s.reserve_mode == "max-model-len"
    assert r.static_timeline.reserved_slots.tolist() == [20, 20, 10, 10]
    assert s.waste == pytest.approx(1 - 33 / 60)
    assert (s.steps, s.max_concurrency, s.peak_reserved_slots) == (4, 2, 20)


def test_block_ops_count_allocations_and_frees():
    w = _workload((0, 5, 4), (0, 3, 2))
    r = simulate(w, _cfg())
    # A: 2 blocks at admission, none while decoding to 8 tokens; B: 1 block. All 3 freed.
    assert r.paged.block_ops == 3 + 3


def test_static_oracle_and_max_output_reservations():
    w = Workload("hand", (Request("a", 0, 0, 5, 4, max_output_len=6), Request("b", 1, 0, 3, 2)), 12, 4)
    oracle, tl = simulate_static(w, _cfg(static_reserve="oracle"))
    assert tl.reserved_slots.tolist() == [12, 12, 8, 8]           # 8 + 4, exactly what each holds at the end
    assert oracle.waste == pytest.approx(1 - 33 / 40)
    maxout, tl = simulate_static(w, _cfg(static_reserve="max-output"))
    assert tl.reserved_slots.tolist() == [11 + 7, 11 + 7, 11, 11]  # 5 + 6 and 3 + max(4, 2)
    assert maxout.mean_reservation == pytest.approx(9)


def test_preemption_recompute_exact():
    # 3 blocks of 4 tokens. A and B: prompt 4, output 3 -> 6 tokens, 2 blocks each.
    w = _workload((0, 4, 3), (0, 4, 3), max_model_len=7)
    r = simulate(w, _cfg(num_blocks=3), check=True)
    tl = r.timeline
    # step 1: both need a new block, one is free: B (newest) is preempted, A grows to 5 tokens.
    # step 2: A reaches 6 tokens and finishes; step 3: B returns with prompt + 1 output token
    # (5 tokens recomputed); step 4: B reaches 6 tokens and finishes.
    assert tl.running.tolist() == [2, 1, 1, 1, 1]
    assert tl.waiting.tolist() == [0, 1, 1, 0, 0]
    assert tl.held_blocks.tolist() == [2, 2, 2, 2, 2]
    assert tl.live_slots.tolist() == [8, 5, 6, 5, 6]
    assert r.paged.preemptions == 1
    assert r.paged.steps == 5
    assert r.paged.waste == pytest.approx(10 / 40)
    # static with 12 slots and 7-token reservations: one request at a time
    s = r.static
    assert (s.steps, s.max_concurrency) == (6, 1)
    assert s.waste == pytest.approx(12 / 42)
    assert s.mean_wait_steps == pytest.approx(1.5)


def test_preempted_request_hits_its_own_cached_blocks():
    w = _workload((0, 4, 3), (0, 4, 3), max_model_len=7)
    r = simulate(w, _cfg(num_blocks=3, enable_prefix_caching=True), check=True)
    assert r.paged.preemptions == 1
    # lookups: A 4 tokens, B 4 tokens, B again with 5 tokens: its full first block hits
    assert r.paged.prefix_hit_tokens == 4
    assert r.paged.prefix_hit_rate == pytest.approx(4 / 13)


def test_compaction_when_fragmented_and_inefficient():
    # 6 blocks of 4. A (8 tokens, output 1) takes blocks 0-1 and finishes at once;
    # B (4 tokens) sits in block 2: 2 of 5 free blocks are trapped (40% > 30%),
    # efficiency 4/24 < 70% -> one compaction moves B's block 2 -> 0.
    w = _workload((0, 8, 1), (0, 4, 10), max_model_len=14)
    r = simulate(w, _cfg(num_blocks=6, enable_compaction=True), check=True)
    assert [(e.step, e.blocks_moved) for e in r.compactions] == [(0, 1)]
    assert r.compactions[0].fragmentation_before == pytest.approx(2 / 5)
    assert r.compactions[0].memory_efficiency_before == pytest.approx(4 / 24)
    assert r.timeline.external_fragmentation[0] == pytest.approx(0.4)
    assert r.timeline.trapped_blocks[0] == 2
    assert (r.paged.compactions, r.paged.blocks_moved) == (1, 1)
    assert r.timeline.external_fragmentation[1:].max() == 0.0
    off = simulate(w, _cfg(num_blocks=6, compaction_threshold=0.5, enable_compaction=True))
    assert off.paged.compactions == 0


def test_eager_eviction_drops_cached_blocks():
    # B shares A's two full prefix blocks (same group, 8 tokens) only while they stay cached.
    w = _workload((0, 9, 1), (2, 9, 1), max_model_len=12, prefix_group="g", prefix_len=8)
    lru = simulate(w, _cfg(enable_prefix_caching=True), check=True)
    eager = simulate(w, _cfg(enable_prefix_caching=True, eviction_policy="eager"), check=True)
    assert lru.paged.prefix_hit_tokens == 8
    assert eager.paged.prefix_hit_tokens == 0
    assert eager.paged.evictions == 4  # A's two cached blocks, then B's


def test_arrivals_wait_for_their_step():
    w = _workload((2.5, 4, 2), max_model_len=6)
    r = simulate(w, _cfg())
    assert r.timeline.running.tolist() == [0, 0, 0, 1, 1]   # arrives at 2.5, first seen at step 3
    assert r.paged.mean_wait_steps == 0


def test_request_larger_than_the_pool_is_refused():
    w = _workload((0, 30, 5), max_model_len=40)
    with pytest.raises(ConfigError, match="only 4 blocks"):
        simulate(w, _cfg(num_blocks=4))


def test_static_too_small_is_reported_not_fatal():
    w = _workload((0, 5, 2), max_model_len=100)
    r = simulate(w, _cfg(num_blocks=8))
    assert r.static is None and "cannot hold" in r.static_note
    assert "static: a static cache" in r.report()


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
@pytest.mark.parametrize("prefix", [True, False])
def test_every_builtin_workload_runs(name: str, prefix: bool):
    small = name == "long-context"
    w = make_workload(name, 4 if small else 30, seed=3, rate=0.05 if small else 2.0)
    cfg = SimulationConfig(block_size=16, num_blocks=2048 if small else 400, enable_prefix_caching=prefix,
                           max_num_seqs=16)
    r = simulate(w, cfg, check=True)
    assert r.paged.requests_finished == len(w)
    assert 0 <= r.paged.waste < 0.2
    assert r.paged.peak_blocks <= cfg.num_blocks
    assert r.peak_map is not None and (r.peak_map.states >= 0).sum() + (r.peak_map.states == -3).sum() \
        == r.paged.peak_blocks
    if name == "shared-prefix" and prefix:
        assert r.paged.prefix_hit_rate > 0.5
    json.dumps(r.to_dict())
    assert "waste" in r.report()


def test_sharegpt_paged_waste_is_small_and_static_is_large():
    w = make_workload("sharegpt", 150, seed=0)
    r = simulate(w, SimulationConfig(block_size=16, num_blocks=2048))
    assert r.paged.waste < 0.03
    assert r.static.waste > 0.6
    assert r.paged.max_concurrency > r.static.max_concurrency


def test_config_validation():
    with pytest.raises(ConfigError):
        SimulationConfig(eviction_policy="lfu")
    with pytest.raises(ConfigError):
        SimulationConfig(compaction_threshold=1.5)
    with pytest.raises(ConfigError):
        SimulationConfig(block_size=0)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kvforge")
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["simulate", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(capsys):
    code, out, _ = _cli(["--requests", "20", "--rate", "1", "--num-blocks", "300", "--json", "--no-plots"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["workload"]["name"] == "sharegpt" and data["workload"]["num_requests"] == 20
    assert data["config"]["num_blocks"] == 300 and data["config"]["model"] == "llama-3-8b"
    assert data["paged"]["requests_finished"] == 20 and data["plots"] == []


def test_cli_table_plots_and_vram(capsys, tmp_path):
    code, out, _ = _cli(["--workload", "shared-prefix", "--requests", "15", "--rate", "1", "--vram", "1GiB",
                         "--no-prefix-caching", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "512 blocks x 16 tokens = 1.00 GiB (llama-3-8b)" in out  # 2 MiB per block
    assert "prefix caching off" in out and "waste (reserved, unused)" in out
    wrote = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 3 and all(p.startswith(str(tmp_path)) and p.endswith(".png") for p in wrote)


def test_cli_bad_trace_exits_with_the_line(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_len": 4, "output_len": 2}\n{"prompt_len": 4}\n')
    code, out, err = _cli(["--trace", str(trace), "--no-plots"], capsys)
    assert code == 2 and out == ""
    assert f"{trace}:2:" in err and "output_len" in err


def test_cli_rejects_options_that_do_not_apply(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_len": 4, "output_len": 2}\n')
    code, _, err = _cli(["--trace", str(trace), "--requests", "5", "--no-plots"], capsys)
    assert code == 2 and "--requests" in err
    code, _, err = _cli(["--max-model-len", "100", "--no-plots"], capsys)
    assert code == 2 and "--max-model-len" in err


def test_cli_trace_json_has_a_timeline(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_len": 5, "output_len": 4}\n{"prompt_len": 3, "output_len": 2}\n')
    code, out, _ = _cli(["--trace", str(trace), "--block-size", "4", "--num-blocks", "16", "--no-prefix-caching",
                         "--max-model-len", "10", "--json", "--no-plots"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["timeline"]["held_blocks"] == [3, 3, 2, 2] and data["timeline"]["stride"] == 1
    assert data["paged"]["waste"] == pytest.approx(7 / 40) and data["static"]["waste"] == pytest.approx(27 / 60)


def test_cli_unwritable_out_is_one_line_exit_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out_dir in ("/proc/kvforge-x", str(blocker), str(blocker / "sub")):
        code, out, err = _cli(["--requests", "5", "--rate", "1", "--num-blocks", "300", "--out", out_dir], capsys)
        assert code == 2 and out == "", (out_dir, out)
        assert err.startswith("kvforge simulate: error: --out") and err.count("\n") == 1 and out_dir in err


def test_cli_plot_write_failure_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    import kvforge.tools.plot

    def fail(result, out_dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kvforge.tools.plot, "plot_simulation", fail)
    code, _, err = _cli(["--requests", "5", "--rate", "1", "--num-blocks", "300", "--out", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1 and "Permission denied" in err


# ------------------------------------------------ shared pieces of the package
def test_compaction_uses_the_shared_trigger(monkeypatch):
    import kvforge.tools.simulate.paged as paged

    seen: list[tuple[float, float, float]] = []

    def never(fragmentation, efficiency, threshold, releasable_chunks=None):
        seen.append((fragmentation, efficiency, threshold))
        return False

    w = _workload((0, 8, 1), (0, 4, 10), max_model_len=14)
    monkeypatch.setattr(paged, "should_compact", never)
    r = simulate(w, _cfg(num_blocks=6, enable_compaction=True))
    assert r.paged.compactions == 0
    assert seen[0] == (pytest.approx(2 / 5), pytest.approx(4 / 24), 0.3)
    assert paged.should_compact is never
    monkeypatch.undo()
    from kvforge.core.compaction import should_compact

    assert paged.should_compact is should_compact


def test_readme_sharegpt_figures():
    # README: `kvforge simulate --workload sharegpt --block-size 16` (4096 blocks)
    r = simulate(make_workload("sharegpt"), SimulationConfig(block_size=16, num_blocks=4096))
    p, s = r.paged, r.static
    assert (p.steps, s.steps) == (3287, 10105)
    assert (p.max_concurrency, s.max_concurrency) == (163, 32)
    assert (f"{p.waste:.2%}", f"{s.waste:.2%}") == ("1.79%", "79.88%")
    assert (p.compactions, p.blocks_moved, p.preemptions) == (32, 10238, 48)


def test_report_table_layout():
    w = _workload((0, 5, 4), (0, 3, 2))
    lines = simulate(w, _cfg()).report().splitlines()
    header, rule = lines[3], lines[4]
    assert lines[2] == "" and header.startswith("metric") and header.endswith("static (contiguous)")
    widths = [len(part) for part in rule.split("  ")]
    assert rule == "  ".join("-" * n for n in widths) and len(widths) == 3
    steps = lines[5]
    assert steps.startswith("steps to drain ") and steps.endswith("4")
    assert len(steps) == len(rule) == len(header)  # values right-aligned under their headers


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_cli_takes_every_builtin_model(name, capsys):
    code, out, err = _cli(["--model", name, "--requests", "10", "--rate", "1", "--vram", "4GiB", "--json",
                           "--no-plots"], capsys)
    assert code == 0, err
    data = json.loads(out)
    per_token = CacheConfig.for_model(name, vram_budget="4GiB").bytes_per_token
    assert data["config"]["model"] == name and data["config"]["bytes_per_token"] == per_token
    assert data["config"]["num_blocks"] == 4 * 2**30 // (16 * per_token)
    assert data["paged"]["requests_finished"] == 10


def test_cli_tinyllama_table(capsys):
    code, out, _ = _cli(["--model", "tinyllama-1.1b", "--requests", "10", "--rate", "1", "--vram", "1GiB",
                         "--no-plots"], capsys)
    # 22 layers x 4 KV heads x 64 x 2 x 2 bytes = 22 KiB per token, 352 KiB per 16-token block
    assert code == 0 and "2,978 blocks x 16 tokens = 1023.69 MiB (tinyllama-1.1b)" in out


def test_cli_unknown_model_is_one_line(capsys):
    code, out, err = _cli(["--model", "gpt-5", "--no-plots"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("kvforge simulate: error: --model 'gpt-5' is neither") and "qwen2.5-7b" in err


def test_package_exports():
    import kvforge.tools.simulate as sim

    for name in sim.__all__:
        assert getattr(sim, name) is not None
    assert {"SimulationConfig", "SimulationResult", "simulate", "simulate_static", "register"} <= set(sim.__all__)


def test_progress_off_a_terminal_has_no_carriage_returns():
    import io

    from kvforge.tools.output import Progress

    stream = io.StringIO()
    progress = Progress("simulate sharegpt", stream=stream, interval=0.0)
    simulate(make_workload("sharegpt", 50, seed=0), SimulationConfig(num_blocks=600), progress=progress)
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("simulate sharegpt: ") for line in lines)
    assert lines[-1].startswith("simulate sharegpt: 50/50 requests (100%) ")


# ------------------------------------------------------------ idle time jumped
def test_a_late_arrival_is_jumped_to_not_stepped_to():
    from kvforge.tools.workload import parse_trace_lines

    # one request 1e6 s in: 5e7 steps of 20 ms, all idle but the last three
    w = parse_trace_lines(['{"arrival_s": 1e6, "prompt_len": 5, "output_len": 3}'])
    r = simulate(w, _cfg(), check=True)
    p, s = r.paged, r.static
    assert p.steps == s.steps == 50_000_000 + 3
    assert p.steps_executed == s.steps_executed == 1 + 3       # one idle step stands for the 5e7
    assert (p.max_concurrency, p.peak_blocks, p.peak_step, p.mean_wait_steps) == (1, 2, 50_000_000, 0)
    tl = r.timeline                                             # too long to expand: one sample per step run
    assert tl.step.tolist() == [0, 50_000_000, 50_000_001, 50_000_002]
    assert tl.num_steps.tolist() == [50_000_000, 1, 1, 1] and int(tl.num_steps.sum()) == p.steps
    assert tl.running.tolist() == [0, 1, 1, 1]
    assert p.mean_concurrency == pytest.approx(3 / p.steps)
    assert p.mean_blocks == pytest.approx(6 / p.steps)          # 2 blocks for 3 steps
    assert p.waste == pytest.approx(1 - (5 + 6 + 7) / 24)       # idle steps reserve nothing
    assert r.static_timeline.num_steps.tolist() == [50_000_000, 1, 1, 1]
    assert s.mean_concurrency == pytest.approx(3 / s.steps)


def test_the_largest_arrivals_a_trace_may_give_finish_in_a_few_steps():
    from kvforge.tools.workload import parse_trace_lines

    w = parse_trace_lines(['{"arrival": 500000000, "prompt_len": 4, "output_len": 2}',
                           '{"arrival_s": 1e7, "prompt_len": 4, "output_len": 2}',
                           '{"arrival": 0, "prompt_len": 4, "output_len": 2}'])
    r = simulate(w, _cfg())
    # 1e7 s at 20 ms is step 5e8 too: steps 0-1 run the first request, step 2 is idle
    # and stands for the rest up to 5e8, where the other two run together for 2 steps
    assert r.paged.steps == 500_000_000 + 2 and r.paged.steps_executed == 2 + 1 + 2
    assert r.timeline.num_steps.tolist() == [1, 1, 500_000_000 - 2, 1, 1]
    assert r.static.steps_executed == r.paged.steps_executed


def test_short_idle_stretches_still_give_one_sample_per_step():
    w = make_workload("sharegpt", 30, seed=1, rate=0.001)      # long quiet gaps between requests
    r = simulate(w, SimulationConfig(block_size=16, num_blocks=600))
    p, tl = r.paged, r.timeline
    assert p.steps_executed < p.steps / 2                       # most of the run was jumped
    assert tl.step.tolist() == list(range(p.steps)) and (tl.num_steps == 1).all()
    assert r.static_timeline.step.tolist() == list(range(r.static.steps))
    assert (tl.running == 0).sum() > p.steps / 2


def test_a_compressed_timeline_gives_the_same_summary(monkeypatch):
    import kvforge.tools.simulate.records as records

    w = make_workload("shared-prefix", 40, seed=2, rate=0.01)
    cfg = SimulationConfig(block_size=16, num_blocks=400, eviction_policy="eager")
    full = simulate(w, cfg)
    monkeypatch.setattr(records, "MAX_TIMELINE_STEPS", 0)      # never expand
    short = simulate(w, cfg)
    assert len(short.timeline.step) == short.paged.steps_executed < len(full.timeline.step) == full.paged.steps
    assert int(short.timeline.num_steps.sum()) == full.paged.steps
    for a, b in ((full.paged, short.paged), (full.static, short.static)):
        for name, value in dataclasses.asdict(a).items():
            if name not in ("wall_s", "steps_per_s", "block_ops_per_s"):
                assert getattr(b, name) == pytest.approx(value), name
    # expanding the compressed samples gives the per-step timeline back
    for name, column in full.timeline._asdict().items():
        if name not in ("step", "num_steps"):
            assert (np.repeat(getattr(short.timeline, name), short.timeline.num_steps) == column).all(), name


def test_report_says_how_many_steps_ran():
    w = _workload((100.5, 4, 2), max_model_len=6)
    r = simulate(w, _cfg())
    assert (r.paged.steps, r.paged.steps_executed) == (103, 3)
    row = next(line for line in r.report().splitlines() if line.startswith("steps run (idle time jumped)"))
    assert row.split()[-2:] == ["3", "3"]
    assert r.to_dict()["paged"]["steps_executed"] == 3


@pytest.mark.parametrize("field, value, match", [
    ("num_blocks", 2**24 + 1, "num_blocks=16777217 exceeds the limit of 16777216"),
    ("num_blocks", 2**63, "num_blocks=9223372036854775808 exceeds the limit"),
    ("block_size", 2**40, "block_size=1099511627776 exceeds the limit of 1048576"),
    ("max_num_seqs", 2**21, "max_num_seqs=2097152 exceeds the limit"),
    ("num_blocks", 16.0, "num_blocks must be a positive integer, got 16.0"),
    ("block_size", True, "block_size must be a positive integer, got True"),
    ("compaction_threshold", float("nan"), "compaction_threshold must be a number in"),
    ("bytes_per_token", 2**61, "bytes_per_token must be an integer in"),
])
def test_simulation_config_limits(field, value, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        SimulationConfig(**{field: value})


# ------------------------------------------------------------------ host tier
def _cycle_workload() -> Workload:
    """6 prefix groups of 4 blocks (of 4 tokens) visited in turn: 24 prefix blocks, more
    than a 12-block pool holds, so LRU evicts every prefix before it comes round again."""
    reqs = tuple(Request(f"r{i}", i, i // 2, 18, 2, prefix_group=f"g{i % 6}", prefix_len=16) for i in range(36))
    return Workload("cycle", reqs, 24, 24)


def test_host_tier_serves_the_prefixes_the_device_pool_cannot_keep():
    w = _cycle_workload()
    off = simulate(w, _cfg(num_blocks=12, enable_prefix_caching=True), check=True).paged
    on = simulate(w, _cfg(num_blocks=12, enable_prefix_caching=True, num_host_blocks=64), check=True).paged
    assert off.prefix_hit_rate == 0 and off.host_hit_tokens == 0 and off.spilled_blocks == 0
    assert on.host_hit_tokens > 0 and on.prefix_hit_rate > off.prefix_hit_rate
    # the 30 requests after the first round each find their 16-token prefix on the host
    assert (on.host_hit_tokens, on.device_hit_tokens, on.onboarded_blocks) == (30 * 16, 0, 120)
    assert on.prefix_hit_rate == pytest.approx(480 / (36 * 18)) == on.device_hit_rate + on.host_hit_rate
    assert (on.spilled_blocks, on.dropped_host_blocks, on.host_peak_blocks) == (24, 0, 24)
    assert on.steps == off.steps  # hits save prefill compute, which the step model does not price
    # a host tier too small to hold one round of prefixes drops them before they come back
    small = simulate(w, _cfg(num_blocks=12, enable_prefix_caching=True, num_host_blocks=8), check=True).paged
    assert small.host_hit_tokens == 0 and small.dropped_host_blocks > 0 and small.host_peak_blocks == 8


def test_host_tier_exact_counters_and_copy_time():
    # 4 blocks of 4; three prompts of 9 tokens (2 keyed blocks + 1), output 1, one a step: g0, g1, g0.
    # t0: g0 takes 3 blocks, finishes: its 2 keyed blocks stay cached (its last one released first).
    # t1: g1 needs 3: 2 free + g0's second block, evicted -> spilled (1 block to the host).
    # t2: g0 again: its first block hits on the device, its second on the host (onboarded:
    #     1 block to the device); the new block evicts g1's second one (spilled, flushed first).
    reqs = tuple(Request(f"r{i}", i, i, 9, 1, prefix_group=g, prefix_len=8) for i, g in enumerate(["g0", "g1", "g0"]))
    w = Workload("hand", reqs, 10, 10)
    cfg = _cfg(num_blocks=4, enable_prefix_caching=True, num_host_blocks=8, bytes_per_token=1000,
               host_bandwidth=4000.0)                               # 4000 bytes a block: 1 s a block
    r = simulate(w, cfg, check=True)
    p, tl = r.paged, r.timeline
    assert (p.prefix_hit_tokens, p.device_hit_tokens, p.host_hit_tokens) == (8, 4, 4)
    assert (p.prefix_hit_rate, p.device_hit_rate, p.host_hit_rate) == (pytest.approx(8 / 27), pytest.approx(4 / 27),
                                                                       pytest.approx(4 / 27))
    assert (p.spilled_blocks, p.onboarded_blocks, p.dropped_host_blocks, p.evictions) == (2, 1, 0, 2)
    assert (p.bytes_to_host, p.bytes_to_device, p.copy_batches) == (8000, 4000, 3)
    assert tl.host_used_blocks.tolist() == [0, 1, 2]   # the onboarded block's host copy stays
    assert tl.blocks_to_host.tolist() == [0, 1, 1] and tl.blocks_to_device.tolist() == [0, 0, 1]
    assert tl.copy_s.tolist() == [0.0, 1.0, 2.0]
    assert (p.copy_s, p.copy_s_per_step_max, p.copy_s_per_step_mean) == (3.0, 2.0, 1.0)
    assert (p.host_peak_blocks, p.host_mean_blocks) == (2, 1.0)
    plain = simulate(w, dataclasses.replace(cfg, num_host_blocks=0), check=True).paged
    assert (plain.prefix_hit_tokens, plain.host_hit_tokens, plain.copy_s, plain.host_peak_blocks) == (4, 0, 0.0, 0)
    d = r.to_dict(timeline_points=10)
    assert d["paged"]["host_hit_tokens"] == 4 and d["config"]["num_host_blocks"] == 8
    assert d["timeline"]["host_used_blocks"] == [0, 1, 2] and d["timeline"]["copy_s"] == [0.0, 1.0, 2.0]
    report = r.report()
    assert "host tier: 8 blocks = 31.25 KiB, copies at 4e-06 GB/s, preemption recompute" in report
    rows = {name.strip(): value for name, value, _ in r.rows()}
    assert rows["prefix hits device / host"] == "14.8% / 14.8%"
    assert rows["spills / onboards (blocks)"] == "2 / 1" and rows["host blocks dropped"] == "0"
    assert rows["modelled copy time"] == "3.000 s in 3 batches"
    assert "prefix hits device / host" not in simulate(w, dataclasses.replace(cfg, num_host_blocks=0)).report()


def test_swap_preemption_exact():
    # test_preemption_recompute_exact's trace, preempting by swap: B's one block goes to the
    # host at step 1 and comes back at step 3, where B decodes on (5 tokens, none recomputed).
    w = _workload((0, 4, 3), (0, 4, 3), max_model_len=7)
    cfg = _cfg(num_blocks=3, num_host_blocks=4, preemption="swap", bytes_per_token=1000, host_bandwidth=4000.0)
    r = simulate(w, cfg, check=True)
    p, tl = r.paged, r.timeline
    assert tl.running.tolist() == [2, 1, 1, 1, 1] and tl.waiting.tolist() == [0, 1, 1, 0, 0]
    assert tl.held_blocks.tolist() == [2, 2, 2, 2, 2] and tl.live_slots.tolist() == [8, 5, 6, 5, 6]
    assert tl.host_used_blocks.tolist() == [0, 1, 1, 0, 0]
    assert tl.copy_s.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert (p.preemptions, p.swap_preemptions, p.swap_drops) == (1, 1, 0)
    assert (p.swapped_out_blocks, p.swapped_in_blocks, p.copy_s, p.steps) == (1, 1, 2.0, 5)
    rows = {name: value for name, value, _ in r.rows()}
    assert rows["preemptions (swap / recompute)"] == "1 / 0" and rows["swapped out / in (blocks)"] == "1 / 1"
    # no room on the host: the victim is recomputed, as without a host tier
    full = simulate(w, dataclasses.replace(cfg, num_host_blocks=1), check=True).paged
    tiny = simulate(w, dataclasses.replace(cfg, num_host_blocks=1, preemption="recompute"), check=True).paged
    assert full.preemptions == 1 and full.steps == tiny.steps == 5


@pytest.mark.parametrize("num_host_blocks", [64, 3])
def test_swap_preemption_with_shared_prefixes_drains(num_host_blocks):
    # 12 requests of two prefix groups in a pool of 9 blocks: victims share their prefix
    # blocks with running requests (those stay on the device) or not (they move)
    reqs = tuple(Request(f"r{i}", i, i // 4, 10, 12, prefix_group=f"g{i % 2}", prefix_len=8) for i in range(12))
    w = Workload("shared", reqs, 22, 22)
    cfg = SimulationConfig(block_size=4, num_blocks=9, num_host_blocks=num_host_blocks, preemption="swap")
    p = simulate(w, cfg, check=True).paged
    assert p.requests_finished == 12 and 0 < p.swap_preemptions <= p.preemptions
    assert p.swapped_in_blocks >= p.swapped_out_blocks > 0  # a block with a host copy is not copied out again
    if num_host_blocks == 3:                                   # too small for some victims: they recompute
        assert p.swap_preemptions < p.preemptions


@pytest.mark.parametrize("field, value, match", [
    ("num_host_blocks", -1, "num_host_blocks must be an integer >= 0"),
    ("num_host_blocks", 2**24 + 1, "num_host_blocks=16777217 exceeds the limit"),
    ("host_bandwidth", 0.0, "host_bandwidth must be a finite number of bytes/s > 0"),
    ("host_bandwidth", float("inf"), "host_bandwidth must be a finite number"),
    ("preemption", "swap", "preemption='swap' needs a host tier"),
    ("preemption", "kill", "preemption 'kill' is not one of"),
])
def test_host_tier_config_limits(field, value, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        SimulationConfig(**{field: value})


def test_from_cache_config_takes_the_host_tier():
    cfg = CacheConfig(block_size=16, num_blocks=64, num_layers=2, num_kv_heads=2, head_dim=32,
                      host_memory="1MiB")                           # 8 KiB a block (fp16)
    assert SimulationConfig.from_cache_config(cfg).num_host_blocks == cfg.num_host_blocks > 0


def _cycle_trace(tmp_path) -> str:
    trace = tmp_path / "cycle.jsonl"
    trace.write_text("".join(json.dumps({"arrival": r.arrival, "prompt_len": r.prompt_len, "output_len": r.output_len,
                                         "prefix_group": r.prefix_group, "prefix_len": r.prefix_len}) + "\n"
                             for r in _cycle_workload().requests))
    return str(trace)


def test_cli_host_memory(capsys, tmp_path):
    # tinyllama: 22 KiB a token, 88 KiB a block of 4: 5632 KiB = 64 host blocks
    base = ["--trace", _cycle_trace(tmp_path), "--model", "tinyllama-1.1b", "--block-size", "4", "--num-blocks", "12",
            "--no-plots"]
    code, out, _ = _cli([*base, "--json"], capsys)
    assert code == 0
    off = json.loads(out)["paged"]
    code, out, err = _cli([*base, "--host-memory", "5632KiB", "--host-bandwidth", "22.528", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    on = data["paged"]
    assert data["config"]["num_host_blocks"] == 64 and data["config"]["host_bandwidth"] == pytest.approx(22.528e9)
    assert on["host_hit_tokens"] == 480 and on["prefix_hit_rate"] > off["prefix_hit_rate"] == 0
    assert on["bytes_to_host"] == 24 * 90112 and on["bytes_to_device"] == 120 * 90112
    assert on["copy_s"] == pytest.approx(144 * 90112 / 22.528e9)     # 144 blocks at 4 us each
    assert max(data["timeline"]["host_used_blocks"]) == 24
    code, out, _ = _cli([*base, "--host-memory", "5632KiB", "--preemption", "swap"], capsys)
    assert code == 0
    assert "host tier: 64 blocks = 5.50 MiB, copies at 55 GB/s, preemption swap" in out
    assert "prefix hits device / host" in out and "preemptions (swap / recompute)" in out


@pytest.mark.parametrize("argv, match", [
    (["--host-memory", "abc"], "--host-memory: cannot read a byte size from 'abc'"),
    (["--host-memory", "-1"], "--host-memory: cannot read a byte size from '-1'"),
    (["--host-memory=-1GiB"], "--host-memory: cannot read a byte size from '-1GiB'"),
    (["--host-memory", "1KiB"], "--host-memory 1KiB holds no block of 2.00 MiB"),
    (["--host-memory", "64GiB", "--host-bandwidth", "-5"], "--host-bandwidth must be a finite number in (0, "),
    (["--host-memory", "64GiB", "--host-bandwidth", "nan"], "--host-bandwidth must be a finite number"),
    (["--preemption", "swap"], "--preemption swap needs a host tier: give --host-memory"),
])
def test_cli_refuses_bad_host_values(argv, match, capsys):
    code, out, err = _cli(["--requests", "5", "--rate", "1", "--no-plots", *argv], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("kvforge simulate: error: ") and match in err


def test_cli_host_bandwidth_must_be_a_number(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(["--host-bandwidth", "abc"], capsys)
    assert exc.value.code == 2 and "--host-bandwidth: invalid float value: 'abc'" in capsys.readouterr().err


def test_memory_plot_has_a_host_panel_when_on():
    from kvforge.tools.plot_simulation import memory_figure

    w = _cycle_workload()
    off = simulate(w, _cfg(num_blocks=12, enable_prefix_caching=True))
    on = simulate(w, _cfg(num_blocks=12, enable_prefix_caching=True, num_host_blocks=64))
    assert len(memory_figure(off).axes) == 1
    fig = memory_figure(on)
    assert len(fig.axes) == 2
    line = fig.axes[1].get_lines()[0]
    assert line.get_label().startswith("host tier: blocks in use (24 spilled, 120 onboarded, 0 dropped)")
    assert max(line.get_ydata()) == pytest.approx(24 / 64 * 100)
