"""Requests, their sequences, and what the engine hands back.

A :class:`Request` is one prompt with its :class:`SamplingParams`; it owns
``n`` :class:`Sequence` objects (one until its prompt is computed, then the
others are forked from it). A sequence's ``token_ids`` are the prompt and
the tokens generated so far: the request's record, kept while the sequence
waits outside the cache (before admission, after a preemption). How many of
them have keys/values is the cache's to say (``KVCache.seq_len``). The last
generated token is always uncomputed: the next step computes it and samples
the one after.

Results are immutable snapshots: :class:`RequestOutput` with one
:class:`CompletionOutput` per sequence and :class:`RequestMetrics`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvforge.engine.sampling import SamplingParams

__all__ = ["SequenceStatus", "Sequence", "Request", "CompletionOutput", "RequestMetrics", "RequestOutput"]


class SequenceStatus(enum.Enum):
    """Where a sequence is: waiting for admission, running (in the cache), swapped out to
    the host tier (its keys and values kept there), or finished."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class Sequence:
    """One completion of a request; its id is the cache's sequence id.

    ``admit_order`` increases with every admission and orders preemption
    (the highest goes first).
    """

    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt_tokens", "status", "finish_reason",
                 "seed", "admit_order", "token_times", "num_preemptions", "num_cached_tokens", "remote_fetch",
                 "ngram_index")

    def __init__(self, seq_id: int, request: Request, index: int, token_ids: list[int], seed: int) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.seed = seed
        self.admit_order = -1
        self.token_times: list[float] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        self.remote_fetch: Any = None  # the scheduler's prefetch from the remote tier (None: not asked)
        self.ngram_index: Any = None  # speculative decoding's n-gram index of token_ids (made on first use)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        """How many tokens were generated."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the sequence stopped (or was aborted)."""
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, {self.status.value}, tokens={self.num_tokens})"


class Request:
    """A prompt, its sampling parameters and its sequences."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "arrival_time", "seqs", "finish_time",
                 "stop_ids", "max_total_tokens", "reported")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time
        self.seqs: list[Sequence] = []
        self.finish_time: float | None = None
        #: a sampled token in here stops the sequence ("stop")
        self.stop_ids = (frozenset() if params.ignore_eos else eos_token_ids) | frozenset(params.stop_token_ids)
        #: a sequence this long stops ("length"): max_tokens, or the engine's max_model_len
        self.max_total_tokens = min(len(prompt_token_ids) + params.max_tokens, max_model_len)
        self.reported: list[int] = []  # output tokens already streamed, per sequence

    @property
    def is_finished(self) -> bool:
        """Every completion finished (all ``n`` exist and stopped)."""
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class CompletionOutput(NamedTuple):
    """One completion: ``token_ids`` so far, ``new_token_ids`` since the last
    report, decoded ``text`` (None without a tokenizer) and ``finish_reason``
    (``'stop'``, ``'length'``, ``'abort'`` or None while running)."""

    index: int
    token_ids: list[int]
    new_token_ids: list[int]
    text: str | None
    finish_reason: str | None


class RequestMetrics(NamedTuple):
    """Timings in seconds (``time.perf_counter`` clock) and cache facts of one request.

    ``ttft``: arrival to first token; ``inter_token_latencies``: gaps between
    consecutive tokens of completion 0; ``num_cached_tokens``: prompt tokens
    found in the prefix cache at first admission."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    ttft: float | None
    mean_inter_token_latency: float | None
    inter_token_latencies: list[float]
    num_cached_tokens: int
    num_preemptions: int


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A snapshot of one request: prompt, completions and metrics.

    For ``n == 1`` the shortcuts ``token_ids``, ``text`` and
    ``finish_reason`` read completion 0."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def token_ids(self) -> list[int]:
        """Completion 0's generated token ids."""
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        """Completion 0's text (None without a tokenizer)."""
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        """Completion 0's finish reason."""
        return self.outputs[0].finish_reason
