"""The engine's step loop: schedule, run, sample, update; and recovery from a failed step.

:class:`StepLoop` is the part of :class:`~kvforge.engine.Engine` that runs one
step: the scheduler reserves the step's slots in the cache, the runner builds
the step's inputs in one call of the cache and runs the model, the sampler
picks tokens on the device and the engine reads them back (the step's one
sync), then appends them to their sequences, forks ``n > 1`` completions,
frees finished sequences and, with ``auto_compact``, compacts. A step that
raises is undone by :meth:`StepLoop._recover`. With ``speculative_tokens``,
a step gives its greedy decodes prompt-lookup drafts
(:mod:`kvforge.engine.speculative`): they are appended with their ids,
computed with the step, kept as far as the model agrees, and truncated
away past that.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Collection

import numpy as np
import torch

from kvforge.engine.outputs import request_output
from kvforge.engine.overlap import InFlightStep, OverlapLoop
from kvforge.engine.request import Request, RequestOutput, Sequence, SequenceStatus
from kvforge.engine.sampling import SamplingBatch, sample, to_device
from kvforge.engine.scheduler import Scheduler, SchedulerOutput
from kvforge.engine.speculative import NgramIndex, accept_greedy
from kvforge.errors import KVForgeError, OutOfBlocksError
from kvforge.storage import KVCache

#: seconds a step with nothing to run waits for a remote prefetch before returning
FETCH_WAIT_S = 0.05

if TYPE_CHECKING:
    from kvforge.engine.config import EngineConfig
    from kvforge.engine.fetch_policy import RemoteFetchPolicy
    from kvforge.engine.loader import Tokenizer
    from kvforge.engine.model_runner import ModelRunner

__all__ = ["StepLoop"]

log = logging.getLogger("kvforge.engine.engine")


class StepLoop(OverlapLoop):
    """One engine step and its recovery (mixed into :class:`~kvforge.engine.Engine`,
    whose constructor sets every attribute below); the asynchronous step is
    :class:`~kvforge.engine.overlap.OverlapLoop`'s."""

    #: asynchronous scheduling: the sequences whose slot ahead goes back if they finish
    _give_back: tuple[Sequence, ...] = ()
    _in_flight: InFlightStep | None = None

    cache: KVCache
    scheduler: Scheduler
    runner: ModelRunner
    tokenizer: Tokenizer | None
    step_lock: threading.Lock
    _requests: dict[str, Request]
    _counters: dict[str, int]
    _forked: list[Sequence]
    _num_unforked: int
    _num_random: int
    remote_fetch: RemoteFetchPolicy | None
    config: EngineConfig
    model_config: Any
    max_model_len: int

    _new_sequence: Callable[[Request, int, int], Sequence]

    def step(self) -> list[RequestOutput]:
        """Run one step; snapshots of the requests that got tokens or finished."""
        outputs = [request_output(self.tokenizer, r, detokenize=True) for r in self._step(want_touched=True)]
        for o in outputs:
            if o.finished:
                self._requests.pop(o.request_id, None)
        return outputs

    def _step(self, want_touched: bool = False) -> list[Request]:
        """One step; returns the requests that got tokens (``want_touched``) or else
        only those that finished. Holds :attr:`step_lock`, so that a metrics
        scrape from another thread sees the cache between steps."""
        with self.step_lock:
            return self._step_locked(want_touched)

    def _step_locked(self, want_touched: bool) -> list[Request]:
        policy = self.remote_fetch
        if policy is not None and policy.mode == "auto" and not policy.calibrated:
            # once, before the first step admits anything: the fetch-or-compute rule's prefill rate
            longest = min(self.scheduler.max_num_batched_tokens, self.max_model_len)
            policy.calibrate(self.runner.logits, self.cache, longest, self.model_config.vocab_size)
        if self.config.async_scheduling:
            return self._step_overlapped(want_touched)
        self._forked = []
        out: SchedulerOutput | None = None
        drafts: dict[int, tuple[int, list[int]]] = {}
        try:
            out = self.scheduler.schedule()
            computed = time.perf_counter()  # the prefill rate leaves out admission (copies from the tiers)
            if not out.is_empty:
                targets, rows, forks = self._targets(out)
                if self.config.speculative_tokens and rows is None:
                    self._draft(out, drafts)
                extra: dict[int, list[int]] | None = None  # a speculative step's accepted runs
                if drafts:
                    tokens, extra = self._run_speculative(out, targets, drafts)
                else:
                    logits = self.runner.execute(out)
                    if rows is not None:
                        logits = logits[to_device(rows, torch.int64, logits.device)]
                    tokens = sample(logits, self._sampling_batch(targets)).tolist()
        except BaseException:
            suspect = self._undo_drafts(drafts)
            self._recover(out)
            self.cache.drop_cached_blocks(suspect)
            raise
        if out.is_empty:
            self._idle()
            return []
        now = time.perf_counter()
        c = self._counters
        c["steps"] += 1
        if not out.chunks:
            c["decode_steps"] += 1
            if not drafts and self.runner.uses_graph(out):
                c["graph_steps"] += 1
        else:
            num_prompt = sum(ch.num_tokens for ch in out.chunks)
            c["prompt_tokens"] += num_prompt
            self.scheduler.policy.record_prefill(num_prompt, now - computed)
        done = self._postprocess(targets, tokens, now, forks, extra)
        self.cache.maybe_compact()
        if want_touched:
            return list({s.request.request_id: s.request for s in targets}.values())
        return done

    def _idle(self) -> None:
        """A step with nothing to run: wait a little for remote prefetches, or report a prompt
        that can never be admitted."""
        if self.scheduler.num_fetching:  # prompts wait for the remote tier, nothing else can run
            self.scheduler.wait_for_fetches(FETCH_WAIT_S)
            return
        if self.scheduler.waiting and not self.scheduler.running:
            head = self.scheduler.waiting[0]
            raise KVForgeError(f"sequence {head.seq_id} of {head.num_tokens} tokens cannot be admitted into an "
                               f"idle cache of {self.cache.num_available_blocks} available blocks")

    def _draft(self, out: SchedulerOutput, drafts: dict[int, tuple[int, list[int]]]) -> None:
        """Prompt-lookup drafts for this step's decodes (:mod:`kvforge.engine.speculative`),
        appended to the cache with their ids, recorded in ``drafts`` as they are (so a failure
        midway can take them back): ``id(seq) -> (its cache length before them, the drafts)``.
        A sequence gets at most ``speculative_tokens``, no more than its request may still
        produce less one, none when the step's token budget or the cache has no room."""
        k, ngram = self.config.speculative_tokens, self.config.speculative_ngram
        room = self.scheduler.max_num_batched_tokens - out.num_tokens
        for s in out.decodes:
            if room <= 0:
                break
            if s.request.params.temperature > 0.0:
                continue  # a sampled sequence decodes one token (drafts would need rejection sampling)
            ids = s.token_ids
            if s.ngram_index is None:
                s.ngram_index = NgramIndex(ngram)
            proposed = s.ngram_index.propose(ids, min(k, room, s.request.max_total_tokens - len(ids) - 1))
            if not proposed:
                continue
            before = self.cache.seq_len(s.seq_id)
            try:
                self.cache.append_tokens(s.seq_id, len(proposed), proposed)
            except OutOfBlocksError:
                continue  # refused whole: nothing changed; this one decodes one token
            drafts[id(s)] = (before, proposed)
            room -= len(proposed)
            self._counters["draft_tokens"] += len(proposed)

    def _run_speculative(self, out: SchedulerOutput, targets: list[Sequence],
                         drafts: dict[int, tuple[int, list[int]]]) -> tuple[list[int], dict[int, list[int]]]:
        """Run a step whose decodes carry drafts: each such sequence computes its input token and
        its drafts as one short prefill, every row's logits kept; the tokens of each target (the
        greedy picks the drafts earned, :func:`~kvforge.engine.speculative.accept_greedy`; one
        sampled token for every other target). The rejected drafts are truncated away. Every
        drafting sequence is greedy. Returns each target's first token and, by ``id(seq)``,
        the tokens that follow it in a drafting sequence's accepted run."""
        plain = [s for s in out.decodes if id(s) not in drafts]
        spec = [s for s in out.decodes if id(s) in drafts]
        seq_ids = [s.seq_id for s in plain] + [s.seq_id for s in spec] + [ch.seq.seq_id for ch in out.chunks]
        q_lens = [1] * len(plain) + [1 + len(drafts[id(s)][1]) for s in spec] + [ch.num_tokens for ch in out.chunks]
        starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).tolist()
        rows = list(range(len(plain)))
        for i, s in enumerate(spec):
            lo = starts[len(plain) + i]
            rows += range(lo, lo + q_lens[len(plain) + i])
        chunk_row = {}
        for i, ch in enumerate(out.chunks):
            if ch.samples:
                j = len(plain) + len(spec) + i
                chunk_row[id(ch.seq)] = len(rows)
                rows.append(starts[j] + q_lens[j] - 1)
        batch = self.cache.prepare_step(seq_ids, q_lens, num_decodes=len(plain), logits_indices=rows)
        logits = self.runner.logits(batch)
        picks = logits.argmax(dim=-1).tolist()
        others = plain + [ch.seq for ch in out.chunks if ch.samples]  # one token each, sampled as usual
        other_rows = list(range(len(plain))) + list(chunk_row.values())
        sampled = sample(logits[to_device(other_rows, torch.int64, logits.device)],
                         self._sampling_batch(others)).tolist() if others else []
        first = {id(s): tok for s, tok in zip(others, sampled)}
        more: dict[int, list[int]] = {}
        lo = len(plain)
        accepted = 0
        for s in spec:
            before, proposed = drafts[id(s)]
            toks = accept_greedy(proposed, picks[lo:lo + len(proposed) + 1])
            lo += len(proposed) + 1
            accepted += len(toks) - 1
            self.cache.truncate(s.seq_id, before + len(toks) - 1)  # the rejected drafts go
            first[id(s)] = toks[0]
            if len(toks) > 1:
                more[id(s)] = toks[1:]
        self._counters["accepted_tokens"] += accepted
        return [first[id(s)] for s in targets], more

    def _undo_drafts(self, drafts: dict[int, tuple[int, list[int]]]) -> list[int]:
        """A step with drafts failed: take every sequence back to its length before them (then
        :meth:`_recover` treats the step as any failed one); return the blocks the drafts
        filled, whose keys/values the step may never have written (the caller drops those
        left cached once the step's sequences are preempted)."""
        suspect: list[int] = []
        if not drafts:
            return suspect
        for s in self.scheduler.running:
            if id(s) not in drafts:
                continue
            before, proposed = drafts[id(s)]
            try:
                n = self.cache.seq_len(s.seq_id)
                if n > before:  # every layer group's blocks of the drafts
                    suspect += self.cache.blocks_of_tokens(s.seq_id, before, min(n, before + len(proposed)))
                    self.cache.truncate(s.seq_id, before)
            except KVForgeError:  # the sequence is already gone or back where it was
                pass
        return suspect

    def _recover(self, out: SchedulerOutput | None, also: tuple[SchedulerOutput, ...] = ()) -> None:
        """Undo a step that raised after reserving slots (a kernel error, an
        interrupt): slots were reserved, and full blocks registered in the
        prefix index, for tokens that were never computed.

        The step's own sequences are preempted (they recompute on a later step),
        the cached blocks holding its never computed tokens are dropped, and
        forks made for it are undone; every other running sequence and every
        other cached block is kept, so one bad step does not empty the prefix
        cache. When the scheduler itself failed (``out`` is None) it is unknown
        which slots it reserved: then every running sequence is preempted and
        every unreferenced cached block dropped. ``also``: other steps in flight with ``out``
        (asynchronous scheduling), undone with it."""
        for req in {id(s.request): s.request for s in self._forked}.values():
            del req.seqs[1:]
            self._num_unforked += 1
        self._forked = []
        if out is None:
            num = len(self.scheduler.preempt_all())
            for seq_id in self.cache.seq_ids:  # reserved but never adopted as running
                self.cache.free_sequence(seq_id, publish=False)
            dropped = self.cache.reclaim_unused_blocks()
        else:
            steps = (out, *also)
            uncomputed = self._uncomputed_blocks(steps)
            seqs = {id(s): s for o in steps for s in [*o.decodes, *(c.seq for c in o.chunks)]}
            num = len(self.scheduler.preempt(list(seqs.values())))
            dropped = self.cache.drop_cached_blocks(uncomputed)
        log.warning("a step failed: %d sequence(s) preempted to recompute, %d cached block(s) dropped",
                    num, dropped)

    def _uncomputed_blocks(self, steps: tuple[SchedulerOutput, ...]) -> list[int]:
        """The blocks holding tokens that ``steps`` reserved (and so registered, when they
        filled) but whose keys/values the failed steps may never have written: a sequence
        that k of them decode has its last k tokens in question; chunks name their range."""
        cache = self.cache  # every layer group's blocks of those tokens (a window group's own too)
        decoded = Counter(id(s) for o in steps for s in o.decodes)
        seqs = {id(s): s for o in steps for s in o.decodes}
        blocks: list[int] = []
        for key, k in decoded.items():
            s = seqs[key]
            if s.status is SequenceStatus.RUNNING:
                n = cache.seq_len(s.seq_id)
                blocks += cache.blocks_of_tokens(s.seq_id, max(0, n - k), n)
        for o in steps:
            for c in o.chunks:
                if c.num_tokens and c.seq.status is SequenceStatus.RUNNING:
                    blocks += cache.blocks_of_tokens(c.seq.seq_id, c.start, c.start + c.num_tokens)
        return blocks

    def _targets(self, out: SchedulerOutput) -> tuple[list[Sequence], list[int] | None, list[Sequence]]:
        """The sequences that sample this step, in logits-row order (decodes, then
        prefill chunks that end their prompt), with the ``n - 1`` siblings of a
        request's first sample appended: they share its logits row (``rows``
        maps each target to one, None when no row is shared) and are forked from
        it once the step is done (``forks``)."""
        targets = list(out.decodes)
        targets += [c.seq for c in out.chunks if c.samples]
        rows: list[int] | None = None
        forks: list[Sequence] = []
        if not self._num_unforked:
            return targets, rows, forks
        for i, s in enumerate(list(targets)):
            req = s.request
            if req.params.n > 1 and len(req.seqs) == 1:
                if rows is None:
                    rows = list(range(len(targets)))
                self._num_unforked -= 1
                for j in range(1, req.params.n):
                    child = self._new_sequence(req, j, s.seed)
                    req.seqs.append(child)
                    self._forked.append(child)
                    targets.append(child)
                    forks.append(child)
                    rows.append(i)
        return targets, rows, forks

    def _sampling_batch(self, targets: list[Sequence], ahead: Collection[int] = ()) -> SamplingBatch | None:
        """``ahead``: ``id()`` of targets one token ahead of their record (its token still in
        flight), so that each sample draws the noise of its own position."""
        if not self._num_random or all(s.request.params.temperature == 0.0 for s in targets):
            return None
        ps = [s.request.params for s in targets]
        return SamplingBatch([p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps],
                             [s.seed for s in targets],
                             [s.num_output_tokens + (id(s) in ahead) for s in targets])

    def _postprocess(self, targets: list[Sequence], tokens: list[int], now: float,
                     forks: list[Sequence], extra: dict[int, list[int]] | None = None) -> list[Request]:
        """Give each target its token, then (``extra``, by ``id(seq)``) the rest of a speculative
        step's accepted run, each checked for a stop token and the length limit (the rest dropped
        once it finishes); fork ``n > 1`` completions first; finish what finished."""
        for s in forks:  # before the parent can finish and free its blocks
            parent = s.request.seqs[0]
            self.cache.fork(parent.seq_id, s.seq_id)
            s.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.add_running(s)
        finished: list[Sequence] = []
        generated = 0
        for s, tok in zip(targets, tokens):
            ids = s.token_ids
            req = s.request
            run = extra.get(id(s)) if extra else None
            for t in (tok,) if run is None else (tok, *run):
                ids.append(t)
                s.token_times.append(now)
                generated += 1
                if t in req.stop_ids:
                    s.finish_reason = "stop"
                elif len(ids) >= req.max_total_tokens:
                    s.finish_reason = "length"
                else:
                    continue
                break
            if s.finish_reason is None:
                continue
            s.status = SequenceStatus.FINISHED
            finished.append(s)
        self._counters["generated"] += generated
        done: list[Request] = []
        if finished:
            if self._give_back:  # asynchronous scheduling: slots reserved ahead for these go back first
                self._release_in_flight(finished)
            self.scheduler.finish(finished)
            for s in finished:
                if s.request.params.temperature > 0.0:
                    self._num_random -= 1
                if s.request.finish_time is None and s.request.is_finished:
                    self._finish_request(s.request, now)
                    done.append(s.request)
        return done

    def _finish_request(self, req: Request, now: float | None = None) -> None:
        if req.finish_time is None:
            req.finish_time = now if now is not None else time.perf_counter()
            self._counters["finished"] += 1
