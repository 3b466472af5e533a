"""JSONL request traces: read (:func:`load_trace`, :func:`parse_trace_lines`) and write.

Trace format (JSON Lines, UTF-8, one request per line; blank lines allowed)::

    {"arrival": 0, "prompt_len": 161, "output_len": 338}
    {"arrival": 2, "prompt_len": 900, "output_len": 40, "prefix_group": "sys-a", "prefix_len": 800}
    {"arrival_s": 0.25, "prompt_token_ids": [1, 15043, 29892], "output_len": 12, "salt": "tenant-7"}

Fields: ``arrival`` (step, a finite number in [0, 5e8]) or ``arrival_s``
(seconds, a finite number in [0, 1e7], turned into steps with ``step_ms``
and then also at most 5e8 steps), at most one of the two (neither means 0);
``prompt_len`` (int >= 1) or ``prompt_token_ids`` (non-empty list of ints),
at least one, equal length when both; ``output_len`` (int >= 1, required);
every length at most 2**24 tokens, and ``prompt_len + output_len`` too
(:data:`MAX_ARRIVAL_STEPS`, :data:`MAX_ARRIVAL_S`, :data:`MAX_TRACE_TOKENS`);
optional ``id`` (string or int, unique; default ``line<N>``),
``prefix_group`` (string), ``prefix_len`` (int, 0..prompt_len, required with
``prefix_group`` when no token ids are given), ``salt`` (string; isolates
the request's cache entries), ``max_output_len`` (int >= output_len: the
request's ``max_tokens``, used by the static ``max-output`` reservation).
Any other key, a wrong type or an out-of-range value raises
:class:`~kvforge.errors.TraceError` ``"FILE:N: reason (line N)"`` with
attributes ``path`` and ``lineno`` (None for a file-level problem); nothing
is skipped.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable

from kvforge.errors import ConfigError, TraceError
from kvforge.tools.workload.request import Request, Workload

__all__ = ["load_trace", "parse_trace_lines", "write_trace", "MAX_ARRIVAL_S", "MAX_ARRIVAL_STEPS",
           "MAX_TRACE_TOKENS"]

#: Latest arrival a trace may give in seconds (``arrival_s``): 1e7 s, about 116 days.
MAX_ARRIVAL_S = 1e7
#: Latest arrival in decode steps (``arrival``, or ``arrival_s`` once converted):
#: 5e8 steps, 1e7 s at the default 20 ms a step.
MAX_ARRIVAL_STEPS = 5e8
#: Most tokens of one request (each length, and prompt + output): 2**24. The
#: simulator's synthetic token ids give each request 2**24 positions.
MAX_TRACE_TOKENS = 2**24

_TRACE_KEYS = frozenset({"id", "arrival", "arrival_s", "prompt_len", "prompt_token_ids", "output_len",
                         "prefix_group", "prefix_len", "salt", "max_output_len"})


def _fail(path: str, lineno: int | None, reason: str) -> TraceError:
    """``"FILE:LINE: reason (line LINE)"``, with ``.path`` and ``.lineno`` (None: not one line's fault)."""
    where = f"{path}:{lineno}" if lineno is not None else path
    err = TraceError(f"{where}: {reason}" + (f" (line {lineno})" if lineno is not None else ""))
    err.path = path  # type: ignore[attr-defined]
    err.lineno = lineno  # type: ignore[attr-defined]
    return err


def _int_field(obj: dict[str, Any], key: str, lo: int, where: Callable[[str], TraceError]) -> int | None:
    if key not in obj:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise where(f"{key!r} must be an integer, got {v!r}")
    if v < lo:
        raise where(f"{key!r} must be >= {lo}, got {v}")
    if v > MAX_TRACE_TOKENS:
        raise where(f"{key!r} must be <= {MAX_TRACE_TOKENS} (2**24 tokens), got {v}")
    return v


def _str_field(obj: dict[str, Any], key: str, where: Callable[[str], TraceError]) -> str | None:
    if key not in obj or obj[key] is None:
        return None
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise where(f"{key!r} must be a non-empty string, got {v!r}")
    return v


def _parse_request(obj: Any, index: int, step_ms: float, where: Callable[[str], TraceError],
                   lineno: int) -> Request:
    if not isinstance(obj, dict):
        raise where(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _TRACE_KEYS)
    if unknown:
        raise where(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(_TRACE_KEYS))})")
    if "arrival" in obj and "arrival_s" in obj:
        raise where("give 'arrival' (steps) or 'arrival_s' (seconds), not both")
    arrival = 0.0
    for key, scale, limit, unit in (("arrival", 1.0, MAX_ARRIVAL_STEPS, "steps"),
                                    ("arrival_s", 1000.0 / step_ms, MAX_ARRIVAL_S, "s")):
        if key in obj:
            v = obj[key]
            # compared before float(): nan fails, and an int too large for a float is refused, not an OverflowError
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= limit:
                raise where(f"{key!r} must be a finite number >= 0 and at most {limit:g} {unit}, got {v!r:.40}")
            arrival = float(v) * scale
            if not arrival <= MAX_ARRIVAL_STEPS:
                raise where(f"{key!r} {v!r} is {arrival:g} steps of {step_ms:g} ms, beyond the limit of "
                            f"{MAX_ARRIVAL_STEPS:g} steps")
    ids = obj.get("prompt_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise where("'prompt_token_ids' must be a non-empty list of integers")
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not -2**63 <= t < 2**63), None)
        if bad is not None:
            raise where(f"'prompt_token_ids' holds {bad!r}, not a 64-bit integer")
    prompt_len = _int_field(obj, "prompt_len", 1, where)
    if prompt_len is None and ids is None:
        raise where("needs 'prompt_len' or 'prompt_token_ids'")
    if prompt_len is not None and ids is not None and prompt_len != len(ids):
        raise where(f"'prompt_len' {prompt_len} != {len(ids)} 'prompt_token_ids'")
    plen = prompt_len if prompt_len is not None else len(ids)  # type: ignore[arg-type]
    output_len = _int_field(obj, "output_len", 1, where)
    if output_len is None:
        raise where("needs 'output_len'")
    if plen + output_len > MAX_TRACE_TOKENS:
        raise where(f"'prompt_len' + 'output_len' = {plen + output_len} tokens, more than the limit of "
                    f"{MAX_TRACE_TOKENS} (2**24)")
    group = _str_field(obj, "prefix_group", where)
    prefix_len = _int_field(obj, "prefix_len", 0, where)
    if prefix_len is not None and group is None:
        raise where("'prefix_len' needs a 'prefix_group'")
    if group is not None and prefix_len is None and ids is None:
        raise where("'prefix_group' without 'prompt_token_ids' needs 'prefix_len'")
    if prefix_len is not None and prefix_len > plen:
        raise where(f"'prefix_len' {prefix_len} exceeds the prompt's {plen} tokens")
    max_out = _int_field(obj, "max_output_len", 1, where)
    if max_out is not None and max_out < output_len:
        raise where(f"'max_output_len' {max_out} is below 'output_len' {output_len}")
    rid = obj.get("id", f"line{lineno}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise where(f"'id' must be a string or an integer, got {rid!r}")
    return Request(str(rid), index, arrival, plen, output_len, group, prefix_len or 0,
                   _str_field(obj, "salt", where), max_out, tuple(ids) if ids is not None else None)


def parse_trace_lines(lines: Iterable[str], *, source: str = "<trace>", step_ms: float = 20.0,
                      max_model_len: int | None = None, name: str | None = None) -> Workload:
    """A :class:`Workload` from JSONL text lines (see the module docstring for the format).

    ``max_model_len`` defaults to the longest sequence of the trace. Raises
    :class:`~kvforge.errors.TraceError` ``"<source>:<line>: <reason>"`` on the
    first malformed line, and when a request does not fit ``max_model_len``.
    """
    if isinstance(step_ms, bool) or not isinstance(step_ms, (int, float)) or not 0 < step_ms < math.inf:
        raise ConfigError(f"step_ms must be a positive finite number of milliseconds, got {step_ms!r:.40}")
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                      or not 1 <= max_model_len <= MAX_TRACE_TOKENS):
        raise ConfigError(f"max_model_len must be an integer in [1, {MAX_TRACE_TOKENS}], got {max_model_len!r:.40}")
    reqs: list[Request] = []
    seen: dict[str, int] = {}
    lineno = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def where(reason: str, _n: int = lineno) -> TraceError:
            return _fail(source, _n, reason)

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise where(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # an int of > 4300 digits; nesting too deep
            raise where(f"not readable JSON ({type(exc).__name__}: {str(exc):.80})") from None
        req = _parse_request(obj, len(reqs), step_ms, where, lineno)
        if req.request_id in seen:
            raise where(f"id {req.request_id!r} already used on line {seen[req.request_id]}")
        if max_model_len is not None and req.prompt_len + req.output_len > max_model_len:
            raise where(f"request needs {req.prompt_len + req.output_len} tokens, "
                        f"more than max_model_len={max_model_len}")
        seen[req.request_id] = lineno
        reqs.append(req)
    if not reqs:
        raise _fail(source, None, f"no requests ({lineno} line(s), all blank)")
    reqs.sort(key=lambda r: r.arrival)  # stable: file order among equal arrivals
    longest = max(r.prompt_len + r.output_len for r in reqs)
    mml = max_model_len if max_model_len is not None else longest
    # a request without max_output_len may generate up to the context limit
    return Workload(name or os.path.basename(source), tuple(reqs), mml, mml,
                    f"trace {source} ({len(reqs)} requests)")


def load_trace(path: str | os.PathLike[str], *, step_ms: float = 20.0,
               max_model_len: int | None = None) -> Workload:
    """Read a JSONL trace file (see the module docstring)."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            return parse_trace_lines(fh, source=p, step_ms=step_ms, max_model_len=max_model_len)
    except OSError as exc:
        raise _fail(p, None, f"cannot read the trace ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise _fail(p, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def write_trace(workload: Workload, path: str | os.PathLike[str]) -> None:
    """Write a workload as a JSONL trace that :func:`load_trace` reads back identically
    (arrivals in steps)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in workload.requests:
            obj: dict[str, Any] = {"id": r.request_id, "arrival": r.arrival}
            if r.prompt_token_ids is not None:
                obj["prompt_token_ids"] = list(r.prompt_token_ids)
            else:
                obj["prompt_len"] = r.prompt_len
            obj["output_len"] = r.output_len
            if r.prefix_group is not None:
                obj["prefix_group"] = r.prefix_group
                if r.prompt_token_ids is None or r.prefix_len:
                    obj["prefix_len"] = r.prefix_len
            if r.salt is not None:
                obj["salt"] = r.salt
            if r.max_output_len is not None:
                obj["max_output_len"] = r.max_output_len
            fh.write(json.dumps(obj) + "\n")
