"""Asynchronous scheduling: the host prepares step t+1 while the device runs step t.

With ``EngineConfig(async_scheduling=True)`` a step does not wait for the
tokens it samples. :meth:`OverlapLoop._step_overlapped` runs, in order:

1. **schedule step t+1** while step t is still in flight
   (:meth:`~kvforge.engine.scheduler.Scheduler.schedule` with ``in_flight``):
   each decode whose input is the token step t is sampling gets a slot without
   an id (:meth:`~kvforge.storage.KVCache.reserve_tokens_batch`); a sequence
   that step t's token finishes by length for certain is left out;
2. **launch step t+1**: its inputs are built from the bookkeeping in one
   upload, and the ids still in flight are copied on the device from step t's
   sampled tokens into the uploaded inputs (no host round trip); the model
   runs and samples, and the tokens start their copy to the host;
3. **read step t's tokens** (the one wait, for work the device has finished
   or nearly: step t+1 is queued behind it) and apply them: append, stop and
   length checks, finishing; the ids of step t+1's in-flight slots are
   committed (:meth:`~kvforge.storage.KVCache.commit_token_ids`), which also
   registers the blocks they fill for prefix reuse; a sequence that step t
   finished gives its slot back (:meth:`~kvforge.storage.KVCache.truncate`)
   and step t+1's token for it is dropped when step t+1 is read.

So :meth:`~kvforge.engine.Engine.step` returns the tokens of the step before
the one it launched; the last call launches nothing and only reads.

A step is scheduled the usual way (after reading step t) whenever scheduling
ahead cannot be exact: step t forks ``n > 1`` completions, a sequence is
swapped out, the decodes do not fit without
preempting, speculative decoding is on, or the engine is tensor parallel or
its cache is split into layer groups. Greedy and seeded outputs equal the
synchronous engine's (``tests/test_async_scheduling.py`` runs both, with stop
tokens, length limits, preemption, ``n > 1``, aborts, compaction and faults).

A failed step undoes both steps in flight: their sequences are preempted (to
recompute from the tokens already read), and the cached blocks holding
tokens either step reserved are dropped, as :meth:`StepLoop._recover` does
for one. On the CPU everything runs synchronously, through this same code.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from kvforge.engine.model_runner import StepInputs
from kvforge.engine.request import Request, Sequence, SequenceStatus
from kvforge.engine.sampling import sample, to_device
from kvforge.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from kvforge.engine.step_loop import StepLoop

    _Base = StepLoop
else:
    _Base = object

__all__ = ["InFlightStep", "OverlapLoop"]


class InFlightStep:
    """A launched step whose sampled tokens are not read yet."""

    __slots__ = ("out", "targets", "forks", "tokens", "host", "ready", "started", "suspect")

    def __init__(self, out: SchedulerOutput, targets: list[Sequence], forks: list[Sequence], tokens: Tensor,
                 started: float) -> None:
        self.out = out
        self.targets = targets
        self.forks = forks
        #: int64 ``[len(targets)]`` on the device: what the next step's in-flight inputs copy
        self.tokens = tokens
        self.started = started
        #: blocks of its tokens that sequences aborted meanwhile left cached: dropped if it fails
        self.suspect: list[int] = []
        self.ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = tokens

    def read(self) -> list[int]:
        """The sampled ids (waits for the device to finish the step)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class OverlapLoop(_Base):
    """The asynchronous step of :class:`~kvforge.engine.Engine` (a mixin of
    :class:`~kvforge.engine.step_loop.StepLoop`'s attributes)."""

    _in_flight: InFlightStep | None

    def _step_overlapped(self, want_touched: bool) -> list[Request]:
        prev, self._in_flight = self._in_flight, None
        self._forked = []
        out: SchedulerOutput | None = None
        launched: InFlightStep | None = None
        ran = prev is not None
        result: list[Request] = []
        try:
            if prev is not None and self._can_schedule_ahead(prev):
                skip = {id(s) for s in prev.targets if len(s.token_ids) + 1 >= s.request.max_total_tokens}
                out = self.scheduler.schedule(in_flight={id(s) for s in prev.targets}, skip=skip)
            if out is None:  # scheduled the usual way, after reading the step in flight
                if prev is not None:
                    result = self._read_step(prev, None, want_touched)
                    prev = None
                out = self.scheduler.schedule()
                assert out is not None
            if not out.is_empty:
                launched = self._launch(out, prev)
                ran = True
            if prev is not None:
                result = self._read_step(prev, launched, want_touched)
                prev = None
            if launched is not None and launched.forks:  # n > 1: forked once its tokens are read
                result += self._read_step(launched, None, want_touched)
                launched = None
        except BaseException:
            steps = [o for o in (prev.out if prev is not None else None,
                                 launched.out if launched is not None else out) if o is not None]
            self._recover_steps(steps, out is None)
            if prev is not None and prev.suspect:
                self.cache.drop_cached_blocks(prev.suspect)
            raise
        if launched is not None and not any(s.status is SequenceStatus.RUNNING for s in launched.targets):
            launched = None  # nothing to read (its sequences finished, or none samples): not kept in flight
        self._in_flight = launched
        if len(result) > 1:  # a request read twice in one call (the step before, then a forking one)
            result = list({id(r): r for r in result}.values())
        if not ran:
            self._idle()
        self.cache.maybe_compact()
        return result

    @property
    def _busy(self) -> bool:
        """Whether anything waits, runs, or is still in flight."""
        step = self._in_flight
        return self.scheduler.has_work or (step is not None and any(s.status is SequenceStatus.RUNNING
                                                                     for s in step.targets))

    def _can_schedule_ahead(self, prev: InFlightStep) -> bool:
        return not prev.forks and self.cache.groups is None \
            and self.runner.tensor_parallel is None and not self.config.speculative_tokens

    def _launch(self, out: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        """Run ``out`` with the ids ``prev`` is still sampling copied in on the device; sample
        its tokens without waiting for them."""
        started = time.perf_counter()
        targets, rows, forks = self._targets(out)
        ahead: dict[int, int] = {}  # id(seq) -> its row in prev's tokens
        if prev is not None:
            ahead = {id(s): i for i, s in enumerate(prev.targets) if s.status is SequenceStatus.RUNNING}
        logits = self.runner.execute(out, self._inputs(out, prev, ahead) if ahead else None)
        if rows is not None:
            logits = logits[to_device(rows, torch.int64, logits.device)]
        batch = self._sampling_batch(targets, ahead)
        c = self._counters
        c["steps"] += 1
        c["overlapped_steps"] += prev is not None
        if not out.chunks:
            c["decode_steps"] += 1
            if self.runner.uses_graph(out):
                c["graph_steps"] += 1
        else:
            c["prompt_tokens"] += sum(ch.num_tokens for ch in out.chunks)
        return InFlightStep(out, targets, forks, sample(logits, batch), started)

    def _inputs(self, out: SchedulerOutput, prev: InFlightStep, ahead: dict[int, int]) -> StepInputs | None:
        """The step's input ids: the known ones on the host (0 where still in flight), and
        for each in-flight decode its row and the row of ``prev``'s tokens to copy there."""
        rows, src = [], []
        ids: list[int] = []
        for i, s in enumerate(out.decodes):
            j = ahead.get(id(s))
            if j is None:
                ids.append(s.token_ids[-1])
            else:
                ids.append(0)
                rows.append(i)
                src.append(j)
        if not rows:
            return None
        for ch in out.chunks:
            ids += ch.seq.token_ids[ch.start: ch.start + ch.num_tokens]
        dev = prev.tokens.device
        return StepInputs(np.asarray(ids, dtype=np.int64), to_device(rows, torch.int64, dev),
                          prev.tokens[to_device(src, torch.int64, dev)])

    def _read_step(self, prev: InFlightStep, launched: InFlightStep | None, want_touched: bool) -> list[Request]:
        """Apply ``prev``'s tokens; commit the ids of ``launched``'s slots that waited for them."""
        tokens = prev.read()
        now = time.perf_counter()
        forks = {id(s) for s in prev.forks}  # running once forked, below
        live = [(s, t) for s, t in zip(prev.targets, tokens) if s.status is SequenceStatus.RUNNING or id(s) in forks]
        targets = [s for s, _ in live]
        waiting = {id(s) for s in launched.out.decodes} if launched is not None else set()
        if prev.out.chunks and launched is None:  # timed alone: nothing was prepared behind it
            self.scheduler.policy.record_prefill(sum(ch.num_tokens for ch in prev.out.chunks), now - prev.started)
        self._give_back = tuple(s for s in targets if id(s) in waiting)  # read by _release_in_flight
        try:
            done = self._postprocess(targets, [t for _, t in live], now, prev.forks)
        finally:
            self._give_back = ()
        commit = [s for s in targets if id(s) in waiting and s.status is SequenceStatus.RUNNING]
        if commit:
            self.cache.commit_token_ids([s.seq_id for s in commit], [s.token_ids[-1] for s in commit])
        if want_touched:
            return list({s.request.request_id: s.request for s in targets}.values())
        return done

    def _release_in_flight(self, finished: list[Sequence]) -> None:
        """Before ``finished`` are freed: take back the slot the launched step reserved for each
        one's last token (that step's token for it is dropped when it is read)."""
        back = {id(s) for s in self._give_back}
        for s in finished:
            if id(s) in back:
                self.cache.truncate(s.seq_id, self.cache.seq_len(s.seq_id) - 1)

    def _abort_in_flight(self, seqs: list[Sequence]) -> list[Sequence]:
        """Of ``seqs`` (being aborted), those the step in flight computes: the blocks of their
        tokens in it are kept as suspect (dropped if the step fails), and the caller frees them
        without publishing (their keys and values are not known to be written yet)."""
        step = self._in_flight
        if step is None:
            return []
        ids = {id(s) for s in seqs}
        cache = self.cache
        hit: dict[int, Sequence] = {}
        for s in step.out.decodes:
            if id(s) in ids and s.seq_id in cache:
                n = cache.seq_len(s.seq_id)
                step.suspect += cache.blocks_of_tokens(s.seq_id, n - 1, n)
                hit[id(s)] = s
        for c in step.out.chunks:
            if id(c.seq) in ids and c.num_tokens and c.seq.seq_id in cache:
                step.suspect += cache.blocks_of_tokens(c.seq.seq_id, c.start, c.start + c.num_tokens)
                hit[id(c.seq)] = c.seq
        return list(hit.values())

    def _recover_steps(self, outs: list[SchedulerOutput], scheduling_failed: bool) -> None:
        """Undo every step in flight (see the module docstring)."""
        if scheduling_failed or not outs:
            self._recover(None)
        else:
            self._recover(outs[0], tuple(outs[1:]))
