"""Requests and workloads: what the simulator replays.

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
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvforge.errors import ConfigError

__all__ = ["Request", "Workload", "WorkloadStats", "synthetic_token_ids"]

# Token-id spaces (int64): unique tokens of request i at position p are
# (i + 1) * 2**24 + p; shared tokens of a group are 2**60 + crc32(group) * 2**20 + p.
_UNIQUE_STRIDE = 1 << 24
_GROUP_BASE = 1 << 60
_GROUP_STRIDE = 1 << 20

#: Arrivals (in steps) lie in [0, 2**53): below it a float holds every whole step exactly.
MAX_ARRIVAL = 2.0**53


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

    Every arrival is a finite number of steps in [0, 2**53) (:data:`MAX_ARRIVAL`).
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
            # the simulator counts whole steps up to an arrival: floats must still tell them apart
            if isinstance(r.arrival, bool) or not isinstance(r.arrival, (int, float)) \
                    or not 0 <= r.arrival < MAX_ARRIVAL:
                raise ConfigError(f"request {r.request_id!r}: arrival must be a finite number of steps in "
                                  f"[0, 2**53), got {r.arrival!r:.40}")
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
