"""Request workloads for the simulator: built-in generators and JSONL traces.

A :class:`Workload` is a list of :class:`Request` s sorted by arrival plus the
longest sequence a request may reach (``max_model_len``). Arrivals are in
decode *steps*: a request that arrives at step 3.5 is first seen by the
scheduler at step 4.

Token ids. The simulator needs token ids so that the prefix cache can match
blocks. They are not stored: :meth:`Request.token_ids` builds them on demand.
A request's prompt is its ``prompt_token_ids`` when the trace gives them;
otherwise the first ``prefix_len`` tokens are the shared tokens of its
``prefix_group`` (the same for every request of the group) and the rest are
unique to the request, as are all output tokens. So requests of one group
share exactly ``prefix_len`` prompt tokens and nothing else.

Trace format (JSON Lines, UTF-8, one request per line; blank lines allowed)::

    {"arrival": 0, "prompt_len": 161, "output_len": 338}
    {"arrival": 2, "prompt_len": 900, "output_len": 40, "prefix_group": "sys-a", "prefix_len": 800}
    {"arrival_s": 0.25, "prompt_token_ids": [1, 15043, 29892], "output_len": 12, "salt": "tenant-7"}

Fields: ``arrival`` (step, number >= 0) or ``arrival_s`` (seconds, turned
into steps with ``step_ms``), exactly one of the two (neither means 0);
``prompt_len`` (int >= 1) or ``prompt_token_ids`` (non-empty list of ints),
at least one, equal length when both; ``output_len`` (int >= 1, required);
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
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from kvforge.errors import ConfigError, TraceError

__all__ = [
    "Request",
    "Workload",
    "WorkloadStats",
    "BUILTIN_WORKLOADS",
    "make_workload",
    "load_trace",
    "parse_trace_lines",
    "write_trace",
    "synthetic_token_ids",
]

# Token-id spaces (int64): unique tokens of request i at position p are
# (i + 1) * 2**24 + p; shared tokens of a group are 2**60 + crc32(group) * 2**20 + p.
_UNIQUE_STRIDE = 1 << 24
_GROUP_BASE = 1 << 60
_GROUP_STRIDE = 1 << 20

_TRACE_KEYS = frozenset({"id", "arrival", "arrival_s", "prompt_len", "prompt_token_ids", "output_len",
                         "prefix_group", "prefix_len", "salt", "max_output_len"})


@dataclass(frozen=True, slots=True)
class Request:
    """One request: when it arrives, how long its prompt is, how many tokens it generates.

    ``index`` is its position in the workload (it keys the request's unique
    token ids). ``prompt_token_ids`` is kept only when a trace gave them.
    """

    request_id: str
    index: int
    arrival: float
    prompt_len: int
    output_len: int
    prefix_group: str | None = None
    prefix_len: int = 0
    salt: str | None = None
    max_output_len: int | None = None
    prompt_token_ids: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def total_len(self) -> int:
        """Tokens whose keys/values the sequence holds when it finishes (prompt + output - 1:
        the last generated token is never fed back)."""
        return self.prompt_len + self.output_len - 1

    def token_ids(self, stop: int) -> np.ndarray:
        """Token ids of positions ``0..stop-1`` of the request's sequence (int64)."""
        out = synthetic_token_ids(self.index, np.arange(stop, dtype=np.int64))
        p = min(stop, self.prompt_len)
        if self.prompt_token_ids is not None:
            out[:p] = np.asarray(self.prompt_token_ids[:p], dtype=np.int64)
        elif self.prefix_group is not None and self.prefix_len:
            k = min(stop, self.prefix_len)
            out[:k] = _group_tokens(self.prefix_group, k)
        return out


def synthetic_token_ids(index: int | np.ndarray, position: np.ndarray) -> np.ndarray:
    """Token ids unique to request ``index`` at ``position`` (int64, vectorised): the
    ids of every token that is neither given by the trace nor part of a shared prefix."""
    return (np.asarray(index, dtype=np.int64) + 1) * _UNIQUE_STRIDE + position


def _group_tokens(group: str, n: int) -> np.ndarray:
    base = _GROUP_BASE + zlib.crc32(group.encode()) * _GROUP_STRIDE
    return base + np.arange(n, dtype=np.int64)


class WorkloadStats(NamedTuple):
    """Length statistics of a workload (tokens)."""

    num_requests: int
    mean_prompt_len: float
    mean_output_len: float
    max_total_len: int
    last_arrival: float


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sorted by arrival (stable), and the model's context limit.

    ``max_model_len`` bounds every request's ``total_len`` + 1 and is what a
    static cache reserves per request in ``max-model-len`` mode.
    ``max_output_len`` is the default ``max_tokens`` of a request.
    """

    name: str
    requests: tuple[Request, ...]
    max_model_len: int
    max_output_len: int
    description: str = ""

    def __post_init__(self) -> None:
        if not self.requests:
            raise ConfigError(f"workload {self.name!r} has no requests")
        for r in self.requests:
            if r.prompt_len + r.output_len > self.max_model_len:
                raise ConfigError(f"request {r.request_id!r} needs {r.prompt_len + r.output_len} tokens, "
                                  f"more than max_model_len={self.max_model_len}")

    def __len__(self) -> int:
        return len(self.requests)

    def stats(self) -> WorkloadStats:
        """Mean prompt and output lengths, longest sequence, last arrival."""
        p = np.array([r.prompt_len for r in self.requests], dtype=np.float64)
        o = np.array([r.output_len for r in self.requests], dtype=np.float64)
        return WorkloadStats(len(self.requests), float(p.mean()), float(o.mean()),
                             max(r.prompt_len + r.output_len for r in self.requests),
                             float(self.requests[-1].arrival))

    def max_reservation(self, request: Request) -> int:
        """``prompt + max_output_len`` of a request, capped at ``max_model_len``."""
        cap = request.max_output_len if request.max_output_len is not None else self.max_output_len
        return min(self.max_model_len, request.prompt_len + max(cap, request.output_len))


# ----------------------------------------------------------------- built-ins
def _lognormal(rng: np.random.Generator, mu: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    return np.clip(rng.lognormal(mu, sigma, n).astype(np.int64), lo, hi)


def _poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def _sharegpt(n: int, rng: np.random.Generator, rate: float) -> Workload:
    # lengths as /work/shared/bench/alloc_trace.py: lognormal means ~150 in, ~300 out
    # (ShareGPT in the vLLM paper: 161 in, 338 out); each sequence fits 2048 tokens.
    prompt = _lognormal(rng, 4.6, 0.9, n, 4, 2044)
    output = np.minimum(_lognormal(rng, 5.4, 0.8, n, 4, 2048), 2048 - prompt)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("sharegpt", tuple(reqs), 2048, 2048,
                    "ShareGPT-like chat: lognormal prompts (mean ~150) and outputs (mean ~300), Poisson arrivals")


def _shared_prefix(n: int, rng: np.random.Generator, rate: float) -> Workload:
    groups = 4
    sys_len = rng.integers(512, 1536, groups)
    pick = rng.choice(groups, n, p=np.array([0.4, 0.3, 0.2, 0.1]))
    user = _lognormal(rng, 4.3, 0.8, n, 4, 1024)
    output = _lognormal(rng, 4.8, 0.7, n, 4, 1024)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = []
    for i in range(n):
        g = int(pick[i])
        plen = int(sys_len[g] + user[i])
        reqs.append(Request(f"r{i}", i, float(arrival[i]), plen, int(output[i]),
                            prefix_group=f"system-{g}", prefix_len=int(sys_len[g])))
    return Workload("shared-prefix", tuple(reqs), 4096, 1024,
                    "4 long system prompts (512-1535 tokens) under short user turns")


def _long_context(n: int, rng: np.random.Generator, rate: float) -> Workload:
    prompt = _lognormal(rng, 9.0, 0.6, n, 2048, 30000)
    output = _lognormal(rng, 5.5, 0.6, n, 16, 2048)
    arrival = _poisson_arrivals(rng, n, rate)
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("long-context", tuple(reqs), 32768, 2048,
                    "document QA: prompts 2k-30k tokens (median ~8k), outputs ~300")


def _bursty(n: int, rng: np.random.Generator, rate: float) -> Workload:
    prompt = _lognormal(rng, 4.6, 0.9, n, 4, 2044)
    output = np.minimum(_lognormal(rng, 5.4, 0.8, n, 4, 2048), 2048 - prompt)
    # bursts of ~400 steps' worth of arrivals at once (half to 1.5 times that),
    # then quiet until the mean rate catches up
    burst = max(1, int(round(rate * 400)))
    arrival = np.empty(n)
    t, i = 0.0, 0
    while i < n:
        k = min(n - i, int(rng.integers(burst // 2 + 1, burst + burst // 2 + 2)))
        arrival[i: i + k] = t
        i += k
        t += k / rate  # same mean rate as a Poisson stream
    reqs = [Request(f"r{i}", i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    return Workload("bursty", tuple(reqs), 2048, 2048,
                    "ShareGPT lengths arriving in bursts (hundreds at once, then quiet)")


class _Builtin(NamedTuple):
    make: Callable[[int, np.random.Generator, float], Workload]
    num_requests: int
    rate: float
    summary: str


#: Built-in workloads: name -> (generator, default request count, default arrivals per step, summary).
BUILTIN_WORKLOADS: dict[str, _Builtin] = {
    "sharegpt": _Builtin(_sharegpt, 1000, 0.5, "chat lengths like ShareGPT, Poisson arrivals"),
    "shared-prefix": _Builtin(_shared_prefix, 1000, 1.0, "a few long system prompts shared by many requests"),
    "long-context": _Builtin(_long_context, 100, 0.02, "prompts of 2k-30k tokens"),
    "bursty": _Builtin(_bursty, 1000, 0.5, "ShareGPT lengths arriving in bursts"),
}


def make_workload(name: str, num_requests: int | None = None, *, seed: int = 0,
                  rate: float | None = None) -> Workload:
    """A built-in workload (see :data:`BUILTIN_WORKLOADS`), deterministic in ``seed``.

    ``rate`` is the mean number of arrivals per decode step.
    """
    if name not in BUILTIN_WORKLOADS:
        raise ConfigError(f"unknown workload {name!r} (built-in: {', '.join(BUILTIN_WORKLOADS)})")
    spec = BUILTIN_WORKLOADS[name]
    n = spec.num_requests if num_requests is None else num_requests
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_requests must be a positive integer, got {num_requests!r}")
    r = spec.rate if rate is None else float(rate)
    if not r > 0 or math.isinf(r):
        raise ConfigError(f"rate must be a positive number of arrivals per step, got {rate!r}")
    return spec.make(n, np.random.default_rng(seed), r)


# --------------------------------------------------------------------- traces
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
    for key, scale in (("arrival", 1.0), ("arrival_s", 1000.0 / step_ms)):
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise where(f"{key!r} must be a finite number >= 0, got {v!r}")
            arrival = float(v) * scale
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
    if not step_ms > 0:
        raise ConfigError(f"step_ms must be positive, got {step_ms!r}")
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
