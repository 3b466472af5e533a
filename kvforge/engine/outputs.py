"""Snapshots of a request for the caller: completions so far and metrics."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvforge.engine.request import CompletionOutput, Request, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from kvforge.engine.loader import Tokenizer

__all__ = ["request_output"]


def request_output(tokenizer: Tokenizer | None, req: Request, detokenize: bool) -> RequestOutput:
    """A :class:`RequestOutput` of ``req`` now; ``new_token_ids`` are those since the
    last snapshot (which this call advances)."""
    comps = []
    for s in req.seqs:
        out = s.output_token_ids
        new = out[req.reported[s.index]:]
        req.reported[s.index] = len(out)
        text = tokenizer.decode(out) if detokenize and tokenizer is not None else None
        comps.append(CompletionOutput(s.index, out, new, text, s.finish_reason))
    s0 = req.seqs[0]
    first = s0.token_times[0] if s0.token_times else None
    gaps = np.diff(s0.token_times).tolist() if len(s0.token_times) > 1 else []
    metrics = RequestMetrics(req.arrival_time, first, req.finish_time,
                             None if first is None else first - req.arrival_time,
                             float(np.mean(gaps)) if gaps else None, gaps, s0.num_cached_tokens,
                             sum(s.num_preemptions for s in req.seqs))
    return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), comps, req.is_finished, metrics)
