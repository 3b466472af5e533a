"""Prompt-lookup speculative decoding: draft tokens from a sequence's own text, checked in one step.

A sequence that repeats itself (a summary quoting its source, code edited in
place, a list with a fixed pattern) often continues the way an earlier
occurrence of its last few tokens continued. :func:`propose_ngram` finds the
latest earlier occurrence of the last ``n`` tokens (``n`` from
``max_ngram`` down to 1) and proposes the up to ``k`` tokens that followed
it (continuing the copy over its own drafts when it reaches the end of the
text: a sequence in a loop gets ``k`` drafts, not the few tokens left before
its end); no second model is needed.

The engine (``EngineConfig(speculative_tokens=k)``) appends a decoding
sequence's drafts to the cache with their ids, computes the sequence's
input token and its ``k`` drafts in one step (as a short prefill over the
paged cache, every row's logits kept) and checks them greedily
(:func:`accept_greedy`): draft ``i`` stands when the model's own pick after
the tokens before it is that draft. The accepted drafts and one more token,
the model's pick after the last accepted one, are the step's output, so a
step yields 1 to ``k + 1`` tokens and the text is exactly what one-token
decoding gives (the same argmax at every position). The rejected drafts are
taken back with :meth:`~kvforge.storage.KVCache.truncate`. Only greedy
sequences draft (a sampled one would need rejection sampling): a sampled
sequence decodes one token a step beside them, sampled as without
speculation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NgramIndex", "accept_greedy", "propose_ngram"]


def propose_ngram(token_ids: Sequence[int] | np.ndarray, k: int, max_ngram: int = 3) -> list[int]:
    """``k`` draft tokens for the sequence ``token_ids``: what followed the latest earlier
    occurrence of its last ``n`` tokens, for the longest ``n <= max_ngram`` that occurs; where
    that runs into the end of the text, the copy continues over its own drafts (the text
    repeats with the period from that occurrence to the end, as in a loop). ``[]`` when no
    n-gram recurs (or ``k`` is 0)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    size = len(ids)
    if k <= 0 or size < 2:
        return []
    for n in range(min(max_ngram, size - 1), 0, -1):
        pattern = ids[size - n:]
        # windows starting at 0 .. size - n - 1: each is followed by at least one token
        windows = np.lib.stride_tricks.sliding_window_view(ids[:size - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            drafts = ids[start:start + k].tolist()
            period = size - start  # past the text's end the copy goes on over its own drafts: a loop
            while len(drafts) < k:
                drafts.append(drafts[len(drafts) - period])
            return drafts
    return []


class NgramIndex:
    """:func:`propose_ngram` for a growing sequence, in time independent of its length: for
    every ``n <= max_ngram`` it keeps where each n-gram last occurred with a token after it,
    and indexes only the tokens added since the last call. The engine keeps one per decoding
    sequence; its drafts are :func:`propose_ngram`'s."""

    __slots__ = ("max_ngram", "_last", "_indexed")

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self._indexed = 0  # positions < this end an n-gram already indexed (they have a follower)

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` drafts for ``token_ids`` (the sequence so far; it only grows between calls)."""
        ids = token_ids
        size = len(ids)
        if size < self._indexed + 1:  # shorter than before: not the same sequence; start over
            self.__init__(self.max_ngram)  # type: ignore[misc]
        for end in range(max(self._indexed, 0), size - 1):  # n-grams ending at `end` now have a follower
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._last[n][tuple(ids[end - n + 1:end + 1])] = end - n + 1
        self._indexed = max(self._indexed, size - 1)
        if k <= 0 or size < 2:
            return []
        for n in range(min(self.max_ngram, size - 1), 0, -1):
            start = self._last[n].get(tuple(ids[size - n:]))
            if start is not None:
                start += n
                drafts = list(ids[start:start + k])
                period = size - start
                while len(drafts) < k:
                    drafts.append(drafts[len(drafts) - period])
                return drafts
        return []


def accept_greedy(drafts: Sequence[int], picks: Sequence[int]) -> list[int]:
    """The tokens a speculative step yields: ``picks[i]`` is the model's greedy pick after the
    input token and the first ``i`` drafts (``len(picks) == len(drafts) + 1``). The drafts up to
    the first one that differs from the pick before it, then that pick."""
    if len(picks) != len(drafts) + 1:
        raise ValueError(f"{len(picks)} picks for {len(drafts)} drafts (one more pick than drafts expected)")
    out: list[int] = []
    for draft, pick in zip(drafts, picks):
        if draft != pick:
            break
        out.append(draft)
    out.append(int(picks[len(out)]))
    return out
