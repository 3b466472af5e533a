"""Built-in workloads and the JSONL trace format."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvforge.errors import ConfigError, TraceError
from kvforge.tools.workload import BUILTIN_WORKLOADS, load_trace, make_workload, parse_trace_lines, write_trace


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
def test_builtin_is_deterministic_sorted_and_within_limits(name: str):
    a = make_workload(name, 50, seed=7)
    b = make_workload(name, 50, seed=7)
    c = make_workload(name, 50, seed=8)
    assert a == b and a != c
    arrivals = [r.arrival for r in a.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in a.requests)
    assert all(r.prompt_len + r.output_len <= a.max_model_len for r in a.requests)
    assert len({r.request_id for r in a.requests}) == 50


def test_sharegpt_lengths_match_the_shared_trace():
    s = make_workload("sharegpt", 4000, seed=0).stats()
    assert 125 < s.mean_prompt_len < 175    # lognormal(4.6, 0.9): ~150
    assert 260 < s.mean_output_len < 340    # lognormal(5.4, 0.8): ~300, capped at the context
    assert s.max_total_len <= 2048


def test_bursty_arrives_in_bursts():
    w = make_workload("bursty", 600, seed=0, rate=0.5)
    _, counts = np.unique([r.arrival for r in w.requests], return_counts=True)
    assert counts.max() >= 100 and len(counts) < 10


def test_shared_prefix_requests_share_exactly_the_group_prefix():
    w = make_workload("shared-prefix", 200, seed=0)
    by_group: dict[str, list] = {}
    for r in w.requests:
        by_group.setdefault(r.prefix_group, []).append(r)
    assert len(by_group) == 4
    r1, r2 = by_group["system-0"][:2]
    t1, t2 = r1.token_ids(r1.prompt_len), r2.token_ids(r2.prompt_len)
    k = r1.prefix_len
    assert k == r2.prefix_len and 512 <= k < 1536
    assert (t1[:k] == t2[:k]).all() and t1[k] != t2[k]
    other = by_group["system-1"][0]
    assert not np.intersect1d(other.token_ids(other.prompt_len), t1).size


def test_unknown_workload_and_bad_sizes():
    with pytest.raises(ConfigError, match="unknown workload"):
        make_workload("nope")
    with pytest.raises(ConfigError):
        make_workload("sharegpt", 0)
    with pytest.raises(ConfigError):
        make_workload("sharegpt", 5, rate=0)


def test_trace_fields_and_defaults():
    lines = [
        '{"arrival": 3, "prompt_len": 10, "output_len": 5}',
        "",
        '{"arrival_s": 0.1, "prompt_token_ids": [1, 2, 3], "output_len": 2, "salt": "t1", "id": 9}',
        '{"prompt_len": 8, "output_len": 1, "prefix_group": "sys", "prefix_len": 6, "max_output_len": 4}',
    ]
    w = parse_trace_lines(lines, source="x.jsonl", step_ms=25)
    assert [r.request_id for r in w.requests] == ["line4", "line1", "9"]   # sorted by arrival
    assert [r.arrival for r in w.requests] == pytest.approx([0.0, 3.0, 4.0])  # 0.1 s at 25 ms a step
    by_id = {r.request_id: r for r in w.requests}
    assert by_id["9"].salt == "t1" and by_id["9"].prompt_len == 3
    assert by_id["9"].token_ids(4)[:3].tolist() == [1, 2, 3]
    assert by_id["line4"].prefix_len == 6 and by_id["line4"].max_output_len == 4
    assert w.max_model_len == 15                       # longest prompt + output
    assert w.max_reservation(by_id["line4"]) == 12     # 8 + 4
    assert w.max_reservation(by_id["line1"]) == 15     # no max_output_len: up to the context


def test_trace_round_trip(tmp_path):
    w = make_workload("shared-prefix", 30, seed=2)
    path = tmp_path / "w.jsonl"
    write_trace(w, path)
    back = load_trace(path, max_model_len=w.max_model_len)
    assert len(back) == len(w)
    for a, b in zip(w.requests, back.requests):
        assert (a.arrival, a.prompt_len, a.output_len, a.prefix_group, a.prefix_len) == \
            (b.arrival, b.prompt_len, b.output_len, b.prefix_group, b.prefix_len)
        assert (a.token_ids(a.prompt_len)[: a.prefix_len] == b.token_ids(b.prompt_len)[: b.prefix_len]).all()


GOOD = '{"prompt_len": 4, "output_len": 2}'


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt_len": 4, "output_len": 2', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt_len": 4, "output_len": 2, "colour": 1}', "unknown key(s) 'colour'"),
    ('{"prompt_len": 4}', "needs 'output_len'"),
    ('{"output_len": 4}', "needs 'prompt_len' or 'prompt_token_ids'"),
    ('{"prompt_len": 0, "output_len": 2}', "'prompt_len' must be >= 1"),
    ('{"prompt_len": 4.5, "output_len": 2}', "'prompt_len' must be an integer"),
    ('{"prompt_len": true, "output_len": 2}', "'prompt_len' must be an integer"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": -1}', "'arrival' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": 1, "arrival_s": 1}', "not both"),
    ('{"prompt_token_ids": [1, "a"], "output_len": 2}', "not a 64-bit integer"),
    ('{"prompt_token_ids": [], "output_len": 2}', "non-empty list"),
    ('{"prompt_len": 3, "prompt_token_ids": [1, 2], "output_len": 2}', "'prompt_len' 3 != 2"),
    ('{"prompt_len": 4, "output_len": 2, "prefix_group": "g"}', "needs 'prefix_len'"),
    ('{"prompt_len": 4, "output_len": 2, "prefix_len": 2}', "needs a 'prefix_group'"),
    ('{"prompt_len": 4, "output_len": 2, "prefix_group": "g", "prefix_len": 5}', "exceeds the prompt"),
    ('{"prompt_len": 4, "output_len": 2, "max_output_len": 1}', "below 'output_len'"),
    ('{"prompt_len": 4, "output_len": 2, "salt": 3}', "'salt' must be a non-empty string"),
    ('{"prompt_len": 4, "output_len": 2, "id": "line1"}', "already used on line 1"),
    ('{"prompt_len": 400, "output_len": 2}', "more than max_model_len=100"),
])
def test_malformed_line_names_its_number_and_reason(tmp_path, bad: str, reason: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path, max_model_len=100)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


def test_empty_or_missing_trace(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(empty)
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_trace(binary)


def test_trace_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_trace_lines([json.dumps({"prompt_len": 1})])


def test_equal_arrivals_keep_file_order():
    lines = ['{"id": "b", "arrival": 1, "prompt_len": 2, "output_len": 1}',
             '{"id": "a", "arrival": 1, "prompt_len": 2, "output_len": 1}',
             '{"id": "c", "arrival": 0.5, "prompt_len": 2, "output_len": 1}']
    assert [r.request_id for r in parse_trace_lines(lines).requests] == ["c", "b", "a"]


def test_trace_error_has_the_line_number_and_path(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(f"{GOOD}\n\n{{\"prompt_len\": 4}}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    err = info.value
    assert str(err).startswith(f"{path}:3: ") and "line 3" in str(err)
    assert err.lineno == 3 and err.path == str(path)
    with pytest.raises(TraceError) as info:
        load_trace(tmp_path / "missing.jsonl")
    assert info.value.lineno is None and info.value.path == str(tmp_path / "missing.jsonl")


# ------------------------------------------------------ bounds of trace values
@pytest.mark.parametrize("bad, reason", [
    ('{"prompt_len": 4, "output_len": 2, "arrival": 1e308}', "'arrival' must be a finite number >= 0 and at most 5e+08 steps, got 1e+308"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": NaN}', "'arrival' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": Infinity}', "'arrival' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": -Infinity}', "'arrival' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": 1e400}', "'arrival' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": 500000001}', "at most 5e+08 steps, got 500000001"),
    ('{"prompt_len": 4, "output_len": 2, "arrival": ' + "9" * 400 + "}", "'arrival' must be a finite number"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": 1e7001}', "'arrival_s' must be a finite number >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": 10000001}', "at most 1e+07 s, got 10000001"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": -0.5}', "'arrival_s' must be a finite number >= 0"),
    ('{"prompt_len": -4, "output_len": 2}', "'prompt_len' must be >= 1, got -4"),
    ('{"prompt_len": 4, "output_len": -2}', "'output_len' must be >= 1, got -2"),
    ('{"prompt_len": 4, "output_len": 0}', "'output_len' must be >= 1, got 0"),
    ('{"prompt_len": 16777217, "output_len": 2}', "'prompt_len' must be <= 16777216 (2**24 tokens), got 16777217"),
    ('{"prompt_len": 4, "output_len": 100000000000000000000}', "'output_len' must be <= 16777216"),
    ('{"prompt_len": 16777000, "output_len": 1000}', "'prompt_len' + 'output_len' = 16778000 tokens"),
    ('{"prompt_len": 4, "output_len": 2, "max_output_len": 16777217}', "'max_output_len' must be <= 16777216"),
    ('{"prompt_len": 4, "output_len": 2, "prefix_group": "g", "prefix_len": -1}', "'prefix_len' must be >= 0"),
    ('{"prompt_len": 4, "output_len": 2, "id": ' + "1" * 5000 + "}", "not readable JSON (ValueError"),
    ("[" * 100000 + "]" * 100000, "not readable JSON (RecursionError"),
])
def test_out_of_range_values_name_the_line_and_the_field(tmp_path, bad: str, reason: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


def test_arrival_s_is_bounded_after_the_conversion_to_steps():
    line = '{"prompt_len": 4, "output_len": 2, "arrival_s": 1e6}'
    assert parse_trace_lines([line]).requests[0].arrival == pytest.approx(5e7)  # 1e6 s at 20 ms
    with pytest.raises(TraceError, match=r"'arrival_s' 1000000.0 is 1e\+12 steps of 0.001 ms, beyond the limit"):
        parse_trace_lines([line], step_ms=0.001)


@pytest.mark.parametrize("step_ms", [0, -1, float("nan"), float("inf"), True, "20"], ids=repr)
def test_step_ms_must_be_positive_and_finite(step_ms):
    with pytest.raises(ConfigError, match="step_ms must be a positive finite number"):
        parse_trace_lines([GOOD], step_ms=step_ms)


@pytest.mark.parametrize("mml", [0, -5, 2**24 + 1, 2.5, True], ids=repr)
def test_max_model_len_is_checked(mml):
    with pytest.raises(ConfigError, match="max_model_len must be an integer in"):
        parse_trace_lines([GOOD], max_model_len=mml)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_requests=10**7 + 1), "num_requests"), (dict(num_requests=-1), "num_requests"),
    (dict(num_requests=2.0), "num_requests"), (dict(rate=float("nan")), "rate"), (dict(rate=float("inf")), "rate"),
    (dict(rate=1e308), "rate"), (dict(rate=1e-300), "rate"), (dict(rate=-1.0), "rate"), (dict(rate="2"), "rate"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
])
def test_builtin_arguments_out_of_range(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        make_workload("bursty", **{"num_requests": 5, **kwargs})


def test_a_workload_refuses_arrivals_it_cannot_count():
    from kvforge.tools.workload import Request, Workload

    for bad in (float("nan"), float("inf"), -1.0, 2.0**53, 1e308):
        with pytest.raises(ConfigError, match=r"request 'a': arrival must be a finite number of steps in \[0, 2\*\*53\)"):
            Workload("w", (Request("a", 0, bad, 4, 2),), 10, 10)
